"""What an engine holds in memory: weights, KV bytes per token, pool size (tensor bytes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from sageserve.engine.info import MemoryUsage

if TYPE_CHECKING:
    from sageserve.engine.model_runner import ModelRunner
    from sageserve.models.llama import LlamaForCausalLM


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in `obj`, a tensor or a dataclass of them (recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def step_weight_bytes(model: LlamaForCausalLM) -> int:
    """Parameter bytes one forward step reads: all but an untied input embedding table."""
    total = sum(tensor_bytes(p) for p in model.parameters())
    if model.config.tie_word_embeddings:
        return total  # the LM head reads the whole table
    return total - tensor_bytes(model.model.embed_tokens.weight)


def static_memory(runner: ModelRunner) -> MemoryUsage:
    """What the runner allocated: weights, KV cache per token and pool (all measured)."""
    model = runner.model
    weights = sum(tensor_bytes(p) for p in model.parameters())
    weights += sum(tensor_bytes(b) for b in model.buffers())
    spec = runner.kv_spec
    return MemoryUsage(
        weights_bytes=weights,
        step_weight_bytes=step_weight_bytes(model),
        kv_bytes_per_token=spec.bytes_per_token,
        kv_dtype=spec.dtype_name,
        pool_capacity_tokens=runner.pool_capacity_tokens,
        pool_bytes=tensor_bytes(runner.kv_cache),
        tokens_per_gib=2**30 // spec.bytes_per_token,
    )
