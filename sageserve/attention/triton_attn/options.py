"""The `triton` backend's registration (it has no options of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from sageserve.attention.flags import BackendFlags
from sageserve.attention.registry import register_backend


@register_backend(
    "triton",
    "sageserve.attention.triton_attn.backend:TritonBackend",
    help="16-bit Triton kernels (CUDA, fp16/bf16)",
)
@dataclass(frozen=True)
class TritonOptions(BackendFlags):
    """The 16-bit kernels take no options: tile sizes follow the page size."""
