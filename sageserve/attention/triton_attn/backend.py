"""`triton`: 16-bit attention through Triton kernels over a 16-bit paged KV cache.

The 16-bit baseline the 8-bit backend is measured against. Its cache is the torch
backend's `PagedKVCache` ([layers, slots, Hkv, D], page 0 the null page), so both read and
write the same bytes. Per layer, `forward` stores the step's K/V (`paged_store`), then runs
the prefill kernel over every chunk of more than one query row (`paged_prefill`: causal
mask aligned bottom-right after a cached prefix) and the split-KV decode kernel over the
single-row ones (`paged_decode`), each writing its own rows of one output.

Metadata is built once per step on the host (no device sync) and shared by every layer,
including the decode kernel's split workspace, which is therefore allocated per step in
`build_metadata`, never in `forward`.

CUDA graphs: decode is captured per padded batch size over static metadata
(`graph_metadata`: page table of a fixed width, kv_len, the new tokens' slots, one
workspace), which `graph_update` fills in one host-to-device copy; padded rows have kv_len 0
(output 0) and slot -1 (the store skips them). The split count is planned for the padded
batch size in eager steps too (`graph_sizes`), so both paths compute the same attention.
The piecewise graphs of steps with prefill capture the store too (`piece_store`: a slot
table padded with -1) and launch only the prefill and decode kernels (`attend_stored`).

Runs on CUDA in fp16 or bf16. Without CUDA it runs only under Triton's interpreter
(TRITON_INTERPRET=1, as the tests do), in fp16 or fp32 — never a silent torch fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sageserve.attention.base import (
    AttentionBackend,
    AttentionShape,
    BackendOptions,
    GraphMetadata,
    KVCacheSpec,
    PieceStore,
)
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.graph_sizes import padded_batch_size
from sageserve.attention.paged_cache import PagedKVCache, resolve_kv_dtype
from sageserve.attention.static_metadata import (
    PATCHES_PER_ROW,
    StaticBuffers,
    table_width,
    write_decode_rows,
)
from sageserve.attention.triton_attn.kernels.decode import (
    DecodePlan,
    num_decode_splits,
    paged_decode,
    plan_decode,
)
from sageserve.attention.triton_attn.kernels.prefill import (
    PrefillPlan,
    paged_prefill,
    plan_prefill,
)
from sageserve.attention.triton_attn.kernels.store import store_kv
from sageserve.attention.triton_attn.options import TritonOptions
from sageserve.attention.triton_common import (
    HEAD_DIMS,
    KEY_ALIGN,
    SUPPORTED_DTYPES,
    interpreting,
)

_INTERPRETER_DTYPES = (torch.float16, torch.float32)


@dataclass
class TritonMetadata:
    """One step's kernel inputs: where new tokens go, and each kernel's plan (or None)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    prefill: PrefillPlan | None
    decode: DecodePlan | None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_reasons(device: torch.device, model_dtype: torch.dtype, kv: torch.dtype) -> list[str]:
    """The dtypes this device can run: 16-bit compiled, fp16/fp32 interpreted."""
    if device.type == "cuda":
        valid, where = SUPPORTED_DTYPES, "on CUDA the triton backend is 16-bit"
        hint = "; fp32 attention is served by --attention-backend torch"
    elif not interpreting():
        return [
            f"device {device.type}: the triton backend's kernels need CUDA; set "
            "TRITON_INTERPRET=1 to run them through Triton's CPU interpreter (slow, for "
            "tests) or choose --attention-backend torch"
        ]
    else:
        valid, where = _INTERPRETER_DTYPES, "under Triton's interpreter"
        hint = " (its bfloat16 arithmetic is wrong: it computes on the raw bits)"
    names = " or ".join(_dtype_name(t) for t in valid)
    reasons = []
    if model_dtype not in valid:
        reasons.append(f"model dtype {_dtype_name(model_dtype)}: {where}; choose --dtype {names}")
    if kv not in valid and kv != model_dtype:
        reasons.append(f"KV cache dtype {_dtype_name(kv)}: {where}; choose {names}")
    return [r + hint for r in reasons]


class TritonBackend(AttentionBackend):
    """16-bit paged attention in Triton (see module docstring)."""

    name = "triton"
    flags_class = TritonOptions

    @classmethod
    def unsupported_reasons(cls, shape: AttentionShape, options: BackendOptions) -> list[str]:
        try:
            kv_dtype = resolve_kv_dtype(options.kv_cache_dtype, options.model_dtype)
        except ValueError as err:
            return [str(err)]
        reasons = []
        if shape.head_dim not in HEAD_DIMS:
            reasons.append(
                f"head_dim {shape.head_dim}: the triton kernels support "
                f"{', '.join(map(str, HEAD_DIMS))} (--attention-backend torch runs any)"
            )
        return reasons + _dtype_reasons(options.device, options.model_dtype, kv_dtype)

    def __init__(self, shape: AttentionShape, options: BackendOptions) -> None:
        super().__init__(shape, options)
        self.kv_dtype = resolve_kv_dtype(options.kv_cache_dtype, options.model_dtype)
        # The longest context served: caps the decode split count (static, so CUDA-graph
        # safe); lowered to the pool's size once it is allocated.
        self.max_context = options.max_context or shape.max_position_embeddings

    def kernels(self) -> str:
        return "Triton kernels: paged store, varlen paged prefill, split-KV decode"

    def preferred_page_size(self) -> int:
        """128: the prefill kernel's 128-key blocks are then whole pages, read by TMA (one
        bulk copy per block instead of per-key gathers): 1.1-1.4x faster on an H100."""
        return 128

    def kv_cache_spec(self) -> KVCacheSpec:
        """K and V in the cache dtype: 2 * layers * Hkv * D * element bytes per token."""
        cfg = self.shape
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
        return KVCacheSpec(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, _dtype_name(self.kv_dtype), per_token
        )

    def allocate(self, num_pages: int, page_size: int) -> PagedKVCache:
        """k, v: [layers, num_pages * page_size, Hkv, D] zeros (page 0 is the null page)."""
        cfg = self.shape
        shape = (cfg.num_layers, num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
        device = self.options.device
        limit = self.options.max_context or cfg.max_position_embeddings
        self.max_context = min(limit, num_pages * page_size)
        k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        return PagedKVCache(k, v, page_size)

    def build_metadata(self, batch: ForwardBatch) -> TritonMetadata:
        """Once per step: split the sequences into prefill chunks (query_len > 1) and
        decodes (query_len == 1, the same computation as a one-token chunk) and plan both
        kernels (int32 tables on the device, the decode workspace). No device sync."""
        starts, start = [], 0
        for seq in batch.seqs:
            starts.append(start)
            start += seq.query_len
        pre = [i for i, s in enumerate(batch.seqs) if s.query_len > 1]
        dec = [i for i, s in enumerate(batch.seqs) if s.query_len == 1]
        prefill = self._plan_prefill(batch, pre, starts) if pre else None
        decode = self._plan_decode(batch, dec, starts) if dec else None
        return TritonMetadata(batch.slot_mapping, prefill, decode)

    def _plan_prefill(self, batch: ForwardBatch, idx: list[int], starts: list[int]) -> PrefillPlan:
        seqs = [batch.seqs[i] for i in idx]
        return plan_prefill(
            [s.page_table for s in seqs], [starts[i] for i in idx], [s.query_len for s in seqs],
            [s.kv_len for s in seqs], batch.page_size, self.shape.head_dim,
            batch.input_ids.device,
        )  # fmt: skip

    def _decode_splits(self, rows: int, device: torch.device) -> int:
        """Split count for `rows` decodes: planned for the CUDA-graph batch size they pad to
        (eager steps too), so a step splits its keys alike replayed or eager."""
        kv_heads = self.shape.num_kv_heads
        return num_decode_splits(padded_batch_size(rows), kv_heads, self.max_context, device)

    def _plan_decode(self, batch: ForwardBatch, idx: list[int], starts: list[int]) -> DecodePlan:
        cfg, device = self.shape, batch.input_ids.device
        splits = self._decode_splits(len(idx), device)
        seqs = [batch.seqs[i] for i in idx]
        return plan_decode(
            [s.page_table for s in seqs], [starts[i] for i in idx], [s.kv_len for s in seqs],
            batch.page_size, cfg.num_q_heads, cfg.head_dim, splits, device,
        )  # fmt: skip

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: TritonMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] in q's dtype (into out if given).

        Stores k, v at meta.slot_mapping, then attends: prefill rows and decode rows of a
        mixed step each by their kernel, into one output.
        """
        store_kv(k, v, meta.slot_mapping, kv_cache.k[layer_id], kv_cache.v[layer_id])
        out = torch.empty_like(q) if out is None else out
        return self.attend_stored(layer_id, q, kv_cache, meta, out)

    def attend_stored(
        self,
        layer_id: int,
        q: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: TritonMetadata,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """q, out: [T, Hq, D]: the prefill and decode kernels over K/V already stored."""
        k_layer, v_layer = kv_cache.k[layer_id], kv_cache.v[layer_id]
        if meta.prefill is not None:
            paged_prefill(q, k_layer, v_layer, meta.prefill, out)
        if meta.decode is not None:
            paged_decode(q, k_layer, v_layer, meta.decode, out)
        return out

    # ------------------------------------------------- K/V stores inside piecewise graphs

    def piece_store(self, kv_cache: PagedKVCache, rows: int) -> PieceStore:
        """slot [rows] int64, padding -1 (the store skips it)."""
        return PieceStore.allocate(rows, {"slot": -1}, self.options.device)

    def write_piece_store(self, store: PieceStore, batch: ForwardBatch, size: int) -> None:
        """Two launches on the device: the step's slots, then -1 on the padding rows."""
        n = batch.num_tokens
        store.first(size)["slot"][:n].copy_(batch.slot_mapping, non_blocking=True)
        store.pad(n, size)

    def store(
        self,
        layer_id: int,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: PagedKVCache,
        store: PieceStore,
        size: int,
    ) -> None:
        """k, v: [size, Hkv, D] into layer layer_id's cache at the first `size` slots."""
        store_kv(k, v, store.first(size)["slot"], kv_cache.k[layer_id], kv_cache.v[layer_id])

    # ------------------------------------------------------------ CUDA graphs

    def cuda_graph_unsupported_reason(self) -> str | None:
        """None: the store, decode and merge kernels make no host sync (see module doc)."""
        return None

    def graph_metadata(
        self, kv_cache: PagedKVCache, batch_size: int, max_context: int
    ) -> GraphMetadata:
        """Static tables (int32 page_table [bs, W], q_row [bs] = 0..bs-1, kv_len [bs]; int64
        slot [bs]) and a DecodePlan over them with its workspace acc [bs, Hq, S, D], ml
        [bs, Hq, S, 2] fp32, S planned for bs rows. Every row starts as padding."""
        if max_context > self.max_context:
            raise ValueError(f"max_context {max_context} exceeds this pool's {self.max_context}")
        cfg, device, bs = self.shape, self.options.device, batch_size
        page_size = kv_cache.page_size
        width = table_width(max_context, page_size, KEY_ALIGN)
        i32, i64 = torch.int32, torch.int64
        buffers = StaticBuffers(
            {"page_table": ((bs, width), i32), "q_row": ((bs,), i32), "kv_len": ((bs,), i32),
             "slot": ((bs,), i64)}, device, patched="page_table",
            patch_capacity=PATCHES_PER_ROW * bs,
        )  # fmt: skip
        buffers.host["q_row"][:] = np.arange(bs)
        buffers.host["slot"][:] = -1
        buffers.upload()
        view = buffers.device
        work = (bs, cfg.num_q_heads, self._decode_splits(bs, device))
        plan = DecodePlan(
            page_table=view["page_table"], q_row=view["q_row"], kv_len=view["kv_len"],
            acc=torch.empty(*work, cfg.head_dim, dtype=torch.float32, device=device),
            ml=torch.empty(*work, 2, dtype=torch.float32, device=device), page_size=page_size,
        )  # fmt: skip
        meta = TritonMetadata(view["slot"], prefill=None, decode=plan)
        return GraphMetadata(bs, max_context, page_size, meta, buffers)

    def graph_update(self, graph_meta: GraphMetadata, batch: ForwardBatch) -> None:
        """Tables of the step's rows, padding (null pages, kv_len 0, slot -1) after them."""
        host = graph_meta.buffers.host
        slots = write_decode_rows(batch, host["page_table"], host["kv_len"])
        host["slot"][: len(slots)] = slots
        host["slot"][len(slots) :] = -1
        graph_meta.buffers.upload()
