"""What an engine holds in memory: weights, KV bytes per token, pool size (tensor bytes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sageserve.engine.engine import Engine


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in `obj`, a tensor or a dataclass of them (recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def static_memory(engine: Engine) -> dict[str, Any]:
    """What the engine allocated: weights, KV cache per token and pool (all measured)."""
    model = engine.runner.model
    weights = sum(tensor_bytes(p) for p in model.parameters())
    weights += sum(tensor_bytes(b) for b in model.buffers())
    spec = engine.runner.kv_spec
    return {
        "weights_bytes": weights,
        "kv_bytes_per_token": spec.bytes_per_token,
        "kv_dtype": spec.dtype_name,
        "pool_capacity_tokens": engine.runner.pool_capacity_tokens,
        "pool_bytes": tensor_bytes(engine.runner.kv_cache),
        "tokens_per_gib": 2**30 // spec.bytes_per_token,
    }
