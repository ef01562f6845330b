"""The exact reference backend: gathers each sequence's pages and calls torch SDPA.

Runs anywhere torch runs (CPU included). It is the oracle every other backend is compared
with, so it favours plainness over speed: prefill chunks are attended one sequence at a time
with an explicit bottom-right causal mask; decode tokens are attended together, padded to the
longest context with a key-padding mask.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sageserve.attention.base import AttentionBackend, AttentionShape, BackendOptions, KVCacheSpec
from sageserve.attention.batch import ForwardBatch, SequenceSlice
from sageserve.attention.paged_cache import PagedKVCache, resolve_kv_dtype
from sageserve.attention.torch_native.options import TorchOptions


@dataclass
class PrefillSeq:
    """One prefill chunk: its query rows, its key slots and its causal mask."""

    q_start: int
    q_end: int
    kv_slots: torch.Tensor  # [kv_len] int64
    mask: torch.Tensor | None  # [query_len, kv_len] bool, None when query_len == 1


@dataclass
class DecodeGroup:
    """All single-token queries of the step, attended in one padded call."""

    token_index: torch.Tensor  # [num_decode] rows of q that are decode tokens
    kv_slots: torch.Tensor  # [num_decode, max_kv_len] int64, padding points at the null page
    key_mask: torch.Tensor  # [num_decode, 1, 1, max_kv_len] bool, True = attend


@dataclass
class TorchNativeMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    prefills: list[PrefillSeq]
    decode: DecodeGroup | None


# cuDNN's attention gave run-to-run differences on identical decode steps (H100, torch
# 2.11, 2026-11-28; lab/gpu_determinism_probe.py): the reference must be repeatable,
# so on CUDA it is kept to the memory-efficient and math kernels.
_CUDA_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return sdpa_kernel(_CUDA_SDPA_BACKENDS)
    return contextlib.nullcontext()


class TorchNativeBackend(AttentionBackend):
    """Exact attention over a 16/32-bit paged cache (see module docstring)."""

    name = "torch"
    flags_class = TorchOptions

    @classmethod
    def unsupported_reasons(cls, shape: AttentionShape, options: BackendOptions) -> list[str]:
        try:
            resolve_kv_dtype(options.kv_cache_dtype, options.model_dtype)
        except ValueError as err:
            return [str(err)]
        return []

    def kernels(self) -> str:
        return "torch SDPA over the gathered pages"

    @property
    def kv_dtype(self) -> torch.dtype:
        return resolve_kv_dtype(self.options.kv_cache_dtype, self.options.model_dtype)

    def kv_cache_spec(self) -> KVCacheSpec:
        cfg = self.shape
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
        name = str(self.kv_dtype).removeprefix("torch.")
        return KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, name, per_token)

    def cuda_graph_unsupported_reason(self) -> str | None:
        return (
            "the torch backend is the exact reference, not a speed path: its decode pads the "
            "step's contexts to the longest one (shapes change from step to step)"
        )

    def allocate(self, num_pages: int, page_size: int) -> PagedKVCache:
        cfg = self.shape
        shape = (cfg.num_layers, num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
        device = self.options.device
        k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        return PagedKVCache(k, v, page_size)

    def build_metadata(self, batch: ForwardBatch) -> TorchNativeMetadata:
        device = batch.input_ids.device
        prefills: list[PrefillSeq] = []
        decodes: list[tuple[int, SequenceSlice]] = []
        q_start = 0
        for seq in batch.seqs:
            if seq.query_len == 1:
                decodes.append((q_start, seq))
            else:
                prefills.append(_prefill_seq(seq, q_start, batch.page_size, device))
            q_start += seq.query_len
        decode = _decode_group(decodes, batch.page_size, device) if decodes else None
        return TorchNativeMetadata(batch.slot_mapping, prefills, decode)

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: TorchNativeMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (exact softmax attention), into
        out when given."""
        k_layer, v_layer = kv_cache.k[layer_id], kv_cache.v[layer_id]
        k_layer[meta.slot_mapping] = k.to(k_layer.dtype)
        v_layer[meta.slot_mapping] = v.to(v_layer.dtype)
        out = torch.empty_like(q) if out is None else out
        with _sdpa_backends(q.device):
            for seq in meta.prefills:
                out[seq.q_start : seq.q_end] = _attend_prefill(q, k_layer, v_layer, seq)
            if meta.decode is not None:
                out[meta.decode.token_index] = _attend_decode(q, k_layer, v_layer, meta.decode)
        return out


def _page_slots(page_tables: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B, num_pages] page ids -> [B, num_pages * page_size] token slots."""
    offsets = torch.arange(page_size, device=page_tables.device)
    return (page_tables[:, :, None] * page_size + offsets).flatten(1)


def _padded_page_table(seq: SequenceSlice, num_pages: int, page_size: int) -> list[int]:
    used = list(seq.page_table[: -(-seq.kv_len // page_size)])
    # Padding points at the null page (page 0): real memory, always masked out.
    return used + [0] * (num_pages - len(used))


def _prefill_seq(
    seq: SequenceSlice, q_start: int, page_size: int, device: torch.device
) -> PrefillSeq:
    num_pages = -(-seq.kv_len // page_size)
    pages = torch.tensor([_padded_page_table(seq, num_pages, page_size)], device=device)
    kv_slots = _page_slots(pages, page_size)[0, : seq.kv_len]
    query_pos = torch.arange(seq.prefix_len, seq.kv_len, device=device)
    key_pos = torch.arange(seq.kv_len, device=device)
    mask = key_pos[None, :] <= query_pos[:, None]
    return PrefillSeq(q_start, q_start + seq.query_len, kv_slots, mask)


def _decode_group(
    decodes: list[tuple[int, SequenceSlice]], page_size: int, device: torch.device
) -> DecodeGroup:
    max_kv = max(seq.kv_len for _, seq in decodes)
    num_pages = -(-max_kv // page_size)
    tables = [_padded_page_table(seq, num_pages, page_size) for _, seq in decodes]
    slots = _page_slots(torch.tensor(tables, device=device), page_size)[:, :max_kv]
    lens = torch.tensor([seq.kv_len for _, seq in decodes], device=device)
    key_mask = torch.arange(max_kv, device=device)[None, :] < lens[:, None]
    # Masked keys still enter the product (weight 0 times value), so they must be finite:
    # point them all at the never-written null page rather than at stale slots.
    slots = torch.where(key_mask, slots, 0)
    return DecodeGroup(
        token_index=torch.tensor([i for i, _ in decodes], dtype=torch.int64, device=device),
        kv_slots=slots,
        key_mask=key_mask[:, None, None, :],
    )


def _attend_prefill(
    q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, seq: PrefillSeq
) -> torch.Tensor:
    """[query_len, Hq, D] for one sequence's chunk."""
    q_seq = q[seq.q_start : seq.q_end].transpose(0, 1).unsqueeze(0)
    k_seq = k_layer[seq.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
    v_seq = v_layer[seq.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=seq.mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _attend_decode(
    q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, group: DecodeGroup
) -> torch.Tensor:
    """[num_decode, Hq, D] for every single-token query of the step."""
    q_dec = q[group.token_index].unsqueeze(2)  # [B, Hq, 1, D]
    k_dec = k_layer[group.kv_slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, max_kv, D]
    v_dec = v_layer[group.kv_slots].to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q_dec, k_dec, v_dec, attn_mask=group.key_mask, enable_gqa=True
    )
    return out.squeeze(2)
