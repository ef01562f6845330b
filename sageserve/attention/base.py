"""The attention backend contract.

A backend owns its KV cache layout (dtype, page shape, any scale tensors) because the 8-bit
backend stores different things than the 16-bit ones. Per step the engine asks it for
metadata once (`build_metadata`), then every layer calls `forward` with that metadata.

A backend whose decode is CUDA-graph safe also keeps static metadata per captured batch
size (`graph_metadata`) and writes each replayed step into it (`graph_update`); see
`sageserve/engine/cuda_graph.py` for how the engine captures and replays.

A backend may also split `forward` in two for the piecewise graphs of steps with prefill
(`sageserve/engine/piecewise_graph.py`): `store` writes the step's K/V through static
tables (`piece_store`, filled per step by `write_piece_store`), so that it is captured in
the graphed piece before attention, and `attend_stored` attends over keys already stored,
the only part left to launch eagerly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sageserve.attention.batch import ForwardBatch
from sageserve.attention.flags import BackendFlags
from sageserve.attention.static_metadata import StaticBuffers

KV_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token costs in the cache, over all layers, K and V, scales included."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_name: str
    bytes_per_token: int

    def describe(self) -> str:
        return (
            f"{self.dtype_name}, {self.bytes_per_token} bytes/token over {self.num_layers} layers"
        )


@dataclass(frozen=True)
class AttentionShape:
    """What a backend knows of the model: plain values, read from the model's config by
    the engine (attention imports no model code)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int


@dataclass(frozen=True)
class BackendOptions:
    """Launch-time choices a backend may read (resolved, no "auto").

    flags: the backend's own options (its `flags_class`; None: that class's defaults).
    max_context: the longest sequence the engine serves (its context length; None: the
    model's limit). Decode split plans are made for it, from static quantities only.
    """

    kv_cache_dtype: str
    model_dtype: torch.dtype
    device: torch.device
    flags: BackendFlags | None = None
    max_context: int | None = None


@dataclass
class GraphMetadata:
    """A backend's static decode metadata for one CUDA-graph batch size.

    meta: what `forward` reads for a decode step of batch_size rows (one query token each;
    row i of q is sequence i); its tensors are views of `buffers`, at fixed addresses for
    the graph to read at every replay. The tables hold contexts of up to max_context keys
    in pages of page_size tokens. Rows past a step's sequences are padding.
    """

    batch_size: int
    max_context: int
    page_size: int
    meta: Any
    buffers: StaticBuffers


@dataclass
class PieceStore:
    """Where the new K/V rows of a piecewise step go, at fixed addresses for the captured
    pieces (`AttentionBackend.piece_store`).

    tables: name -> [rows] int64 device tensor: row t names where token t of the step goes
    (backend-specific: a slot, or a page and an offset). Rows past the step's tokens hold
    the table's `padding` value, which stores nothing (or into a scratch slot nothing
    reads). A step padded to `size` tokens stores its first `size` rows. exact: the store
    of the layers a backend hands to another backend (sage_attn's exact layers), or None.
    """

    tables: dict[str, torch.Tensor]
    padding: dict[str, int]
    exact: PieceStore | None = None

    @property
    def rows(self) -> int:
        """How many tokens a step may store through these tables."""
        return len(next(iter(self.tables.values())))

    @classmethod
    def allocate(
        cls, rows: int, padding: dict[str, int], device: torch.device,
        exact: PieceStore | None = None,
    ) -> PieceStore:  # fmt: skip
        """One table per name of padding, every row padding."""
        tables = {
            name: torch.full((rows,), value, dtype=torch.int64, device=device)
            for name, value in padding.items()
        }
        return cls(tables, padding, exact)

    def first(self, size: int) -> dict[str, torch.Tensor]:
        """Each table's first `size` rows (views at the tables' own addresses)."""
        if not 0 < size <= self.rows:
            raise ValueError(f"a piece store of {self.rows} rows has no first {size}")
        return {name: table[:size] for name, table in self.tables.items()}

    def pad(self, start: int, size: int) -> None:
        """Rows start .. size - 1 of every table back to padding: a step of fewer tokens
        than the last one must not store its padding rows at that step's slots."""
        for name, table in self.first(size).items():
            table[start:].fill_(self.padding[name])


class AttentionBackend(ABC):
    """One attention implementation over its own paged KV cache."""

    name: ClassVar[str]
    flags_class: ClassVar[type[BackendFlags]] = BackendFlags

    def __init__(self, shape: AttentionShape, options: BackendOptions) -> None:
        reasons = self.unsupported_reasons(shape, options)
        if reasons:
            raise ValueError(
                f"attention backend {self.name!r} cannot run this model: " + "; ".join(reasons)
            )
        self.shape = shape
        self.options = options
        self.flags = self.flags_of(options)

    @classmethod
    def flags_of(cls, options: BackendOptions) -> Any:
        """options.flags, or the defaults of `flags_class` when None; ValueError when they
        belong to another backend."""
        if options.flags is None:
            return cls.flags_class()
        if not isinstance(options.flags, cls.flags_class):
            raise ValueError(
                f"attention backend {cls.name!r} takes {cls.flags_class.__name__}, "
                f"got {type(options.flags).__name__}"
            )
        return options.flags

    @classmethod
    def unsupported_reasons(cls, shape: AttentionShape, options: BackendOptions) -> list[str]:
        """Why this backend cannot serve this configuration; empty when it can."""
        return []

    def prepare(self, model: torch.nn.Module, tokenizer: Any | None) -> None:  # noqa: B027
        """Run once after the weights are loaded, before the first step (e.g. calibration).

        Optional: the default does nothing.
        """

    @abstractmethod
    def kv_cache_spec(self) -> KVCacheSpec:
        """Bytes per token and dtype of this backend's cache for the model."""

    def kernels(self) -> str:
        """What computes this backend's attention, as configured (after `allocate`, which
        may still change it): recorded in `EngineInfo`, so a benchmark says what it timed."""
        return self.name

    def preferred_page_size(self) -> int:
        """Tokens per page when the user names none (`--page-size`): what this backend's
        kernels run fastest with. Any page size >= 1 must still work."""
        return 16

    @abstractmethod
    def allocate(self, num_pages: int, page_size: int) -> Any:
        """Allocate the whole KV pool: num_pages pages of page_size tokens, every layer."""

    @abstractmethod
    def build_metadata(self, batch: ForwardBatch) -> Any:
        """Everything `forward` needs about the step, computed once per step."""

    def cuda_graph_unsupported_reason(self) -> str | None:
        """Why this backend's decode cannot be captured in a CUDA graph; None when it can.

        A backend returning None implements `graph_metadata` and `graph_update`, and its
        `forward` over that metadata makes no host sync and no data-dependent allocation or
        shape (the engine captures it per batch size and replays it).
        """
        return f"the {self.name} backend does not implement CUDA-graph decode"

    def graph_metadata(self, kv_cache: Any, batch_size: int, max_context: int) -> GraphMetadata:
        """Allocate the static metadata of decode steps over kv_cache (from `allocate`),
        padded to batch_size rows, whose contexts (kv_len, the new token included) hold at
        most max_context keys.

        Tables are at their largest shape: e.g. page_table [batch_size, W] int32 with W the
        pages of max_context rounded up to the kernels' key alignment, kv_len [batch_size];
        the decode workspace is planned for batch_size rows from static quantities only, as
        for an eager step of that size. Every row starts as padding. Only called when
        `cuda_graph_unsupported_reason()` is None.
        """
        raise NotImplementedError(f"{self.name}: {self.cuda_graph_unsupported_reason()}")

    def graph_update(self, graph_meta: GraphMetadata, batch: ForwardBatch) -> None:
        """Write a decode-only step into `graph_meta`'s static buffers, in one host-to-device
        copy, for a replay of the graph captured over it.

        batch: is_decode_only, num_seqs <= batch_size, every kv_len <= max_context (the
        caller checks). Sequence i takes row i; rows past num_seqs become padding: kv_len 0
        (attention output 0) and no K/V store. The step's q, k, v rows follow the same order.
        """
        raise NotImplementedError(f"{self.name}: {self.cuda_graph_unsupported_reason()}")

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: Any,
        meta: Any,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store this step's k, v in the cache, then attend over each sequence's keys.

        q: [num_tokens, num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        out: where to write the result (q's shape and dtype), or None for a new tensor.
        Returns [num_tokens, num_q_heads, head_dim] in q's dtype (out itself when given).
        """

    # ------------------------------------------------- K/V stores inside piecewise graphs

    def piece_store(self, kv_cache: Any, rows: int) -> PieceStore | None:
        """Static store tables for steps of up to `rows` tokens, every row padding, or None
        (the default): this backend stores only inside `forward`, so a piecewise step
        launches its store eagerly with its attention.

        A backend returning tables implements `write_piece_store`, `store` (no host sync,
        no allocation: captured in a CUDA graph) and `attend_stored`.
        """
        return None

    def write_piece_store(self, store: PieceStore, batch: ForwardBatch, size: int) -> None:
        """Point the first `size` rows of `store` at the step's new slots (row t: token t,
        from batch.slot_mapping), rows num_tokens.. size - 1 at padding, without a host sync.
        size: the step's padded token count, >= batch.num_tokens."""
        raise NotImplementedError(f"the {self.name} backend stores only inside forward")

    def store(
        self,
        layer_id: int,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: Any,
        store: PieceStore,
        size: int,
    ) -> None:
        """Store k, v [size, num_kv_heads, head_dim] of layer layer_id where the first `size`
        rows of `store` say (padding rows store nothing anyone reads)."""
        raise NotImplementedError(f"the {self.name} backend stores only inside forward")

    def attend_stored(
        self, layer_id: int, q: torch.Tensor, kv_cache: Any, meta: Any, out: torch.Tensor
    ) -> torch.Tensor:
        """`forward` without its store: the step's K/V are already in the cache (`store`).
        q, out: [num_tokens, num_q_heads, head_dim]; returns out."""
        raise NotImplementedError(f"the {self.name} backend stores only inside forward")


class StepAttention:
    """The `AttentionContext` a model sees for one step: backend + cache + metadata."""

    def __init__(self, backend: AttentionBackend, kv_cache: Any, meta: Any) -> None:
        self.backend = backend
        self.kv_cache = kv_cache
        self.meta = meta

    def attend(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (into out when given)."""
        return self.backend.forward(layer_id, q, k, v, self.kv_cache, self.meta, out)

    def attend_stored(self, layer_id: int, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """q, out: [T, Hq, D]: attention over K/V that `AttentionBackend.store` wrote."""
        return self.backend.attend_stored(layer_id, q, self.kv_cache, self.meta, out)
