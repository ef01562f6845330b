"""The `torch` backend's registration (it has no options of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from sageserve.attention.flags import BackendFlags
from sageserve.attention.registry import register_backend


@register_backend(
    "torch",
    "sageserve.attention.torch_native.backend:TorchNativeBackend",
    help="exact reference (any device)",
)
@dataclass(frozen=True)
class TorchOptions(BackendFlags):
    """The exact reference takes no options."""
