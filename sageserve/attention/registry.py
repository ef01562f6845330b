"""Attention backends by name, imported lazily so a CPU machine never imports GPU kernels."""

from __future__ import annotations

import importlib

from sageserve.attention.base import AttentionBackend

_BACKENDS: dict[str, str] = {
    "torch": "sageserve.attention.torch_native:TorchNativeBackend",
    "sage_attn": "sageserve.attention.sage:SageAttentionBackend",
    "triton": "sageserve.attention.triton_attn:TritonBackend",
}


def backend_names() -> list[str]:
    """Every name `--attention-backend` accepts."""
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    """The backend class registered as `name`; ValueError listing valid names otherwise."""
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid backends: {', '.join(backend_names())}"
        )
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def register_backend(name: str, target: str) -> None:
    """Register `module:Class` under `name` (tests use this for deliberately broken backends)."""
    _BACKENDS[name] = target
