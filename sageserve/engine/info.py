"""What an Engine tells the outside: fixed facts (`EngineInfo`) and live counters (`EngineStats`).

Plain frozen dataclasses (no torch), so front ends such as the server's metrics can name
them without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryUsage:
    """What the engine allocated, measured from its tensors (bytes)."""

    weights_bytes: int  # parameters and buffers of the model
    # What one forward step reads of them whatever its batch: every parameter but an untied
    # input embedding table, of which a step looks up only its tokens' rows.
    step_weight_bytes: int
    kv_bytes_per_token: int  # over all layers, scales included
    kv_dtype: str
    pool_capacity_tokens: int  # tokens the KV pool holds (the null page excluded)
    pool_bytes: int  # every tensor of the KV pool, the null page included
    tokens_per_gib: int  # KV tokens one GiB holds


@dataclass(frozen=True)
class EngineInfo:
    """What does not change while the engine lives."""

    model_path: str  # as given (a short name, a directory or a file)
    model_source: str  # what was loaded: file name, format, stored tensor types
    attention_backend: str
    attention_kernels: str  # what computes it, as resolved (e.g. which prefill kernel)
    kv_cache_dtype: str
    dtype: str
    device: str
    page_size: int
    pool_capacity_tokens: int
    context_length: int
    vocab_size: int
    max_running_requests: int
    chunked_prefill_size: int
    max_prefill_tokens_while_decoding: int | None
    enable_prefix_cache: bool
    fused_layers: bool  # RMSNorm, rotary and SiLU-mul as fused Triton kernels
    fused_gemv: bool  # 1-4 row decode projections as a Triton GEMV (sm_90+, PDL)
    overlap_schedule: bool  # step N+1 prepared while the device runs step N
    memory: MemoryUsage


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters, taken between steps.

    max_batch_seen: the most requests one step has computed (prefill chunks and decodes).
    num_free_pages: pages an allocation can take now (free, or cached and evictable).
    num_cached_pages: pages holding a prefix-cache entry, in use or evictable.
    """

    num_steps: int
    num_running: int
    num_waiting: int
    max_batch_seen: int
    num_free_pages: int
    num_usable_pages: int
    num_cached_pages: int
    num_preemptions: int

    @property
    def num_unfinished(self) -> int:
        """Requests in flight: running or waiting for a running slot."""
        return self.num_running + self.num_waiting
