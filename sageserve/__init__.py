"""sageserve: an LLM inference server with pluggable attention, 8-bit SageAttention included."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from sageserve.engine.llm import LLM
    from sageserve.engine.request import RequestOutput
    from sageserve.engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "sageserve.engine.llm",
    "RequestOutput": "sageserve.engine.request",
    "SamplingParams": "sageserve.engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `sageserve --help` and the server's argument parsing don't import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sageserve' has no attribute {name!r}")
