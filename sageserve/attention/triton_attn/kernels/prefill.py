"""Varlen prefill attention over the 16-bit paged cache, after any cached prefix.

Each sequence's query chunk (q_len rows, the last q_len of its kv_len keys, already stored)
attends to its keys with a causal mask aligned bottom-right: query i sees keys
0 .. kv_len - q_len + i. One program per (query head, block of BLOCK_M query rows); the
blocks to run are listed by `plan_prefill` (sequence, first row), heaviest first, so a step
with one long and many short chunks launches no idle programs. Heads vary fastest in the
grid, so the query heads of a GQA group run side by side and share K/V through L2.

Per block, keys are visited in two loops: those before the block's first query position
(seen by every row: no mask, no bounds), then the diagonal blocks (causal and length mask,
V masked so that stale slots past the end cannot reach P·V). Scores are fp32 from a 16-bit
tl.dot, scaled into log2 units so the online softmax uses exp2; P is cast back to the cache
dtype for P·V, accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sageserve.attention.page_tables import int32_on_device, padded_tables
from sageserve.attention.triton_common import (
    KEY_ALIGN,
    LOG2E,
    check_paged_args,
    key_offsets,
    online_softmax_step,
)
from sageserve.kernel_launch import launch


@dataclass(frozen=True)
class PrefillConfig:
    """Query rows and keys per program step, the compiler's warps and pipeline stages, a
    register cap per thread (None: the compiler's choice), and whether key blocks that lie
    inside one page (page_size % block_n == 0) are read through tensor descriptors (TMA)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    tma: bool = True

    def uses_tma(self, page_size: int) -> bool:
        """Whether key blocks of this page size go through tensor descriptors."""
        return self.tma and page_size % self.block_n == 0


def prefill_config(head_dim: int, page_size: int) -> PrefillConfig:
    """Tile shapes: 128 query rows on two warpgroups (Hopper's wgmma takes 64 rows per
    warpgroup); 128 keys per step when a page holds them (one TMA box), else 64. Fastest
    of the settings tried on an H100 at head_dim 128 (lab/KERNEL_NOTES.md, "TMA");
    no spills at head_dim <= 128. The interpreter uses the same: its cost is per operation,
    so large tiles are also its fastest (and the tests run the GPU's tiling)."""
    if page_size % 128 == 0:
        return PrefillConfig(128, 128, 8, 2)
    return PrefillConfig(128, 64, 8, 3)


@dataclass
class PrefillPlan:
    """The prefill kernel's inputs for one step (int32, on the device), shared by layers.

    page_table: [B, W] from `padded_tables`; q_start, q_len, kv_len: [B] (q_start: the
    sequence's first row in the step's q); block_seq, block_row: [NB] the query blocks to
    run (sequence index, first row within its chunk); page_size: tokens per page;
    config: the tiles the blocks were cut with.
    """

    page_table: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_len: torch.Tensor
    block_seq: torch.Tensor
    block_row: torch.Tensor
    page_size: int
    config: PrefillConfig


def plan_prefill(
    tables: list[tuple[int, ...]],
    q_starts: list[int],
    q_lens: list[int],
    kv_lens: list[int],
    page_size: int,
    head_dim: int,
    device: torch.device,
    config: PrefillConfig | None = None,
) -> PrefillPlan:
    """Build the plan on the host (no device sync): one entry per sequence's chunk.

    tables: each sequence's pages (at least ceil(kv_len / page_size)); q_starts, q_lens,
    kv_lens: host ints per sequence, q_len <= kv_len.
    """
    config = config or prefill_config(head_dim, page_size)
    blocks = [
        (kv - q + row + config.block_m, seq, row)
        for seq, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True))
        for row in range(0, q, config.block_m)
    ]
    blocks.sort(reverse=True)  # longest key range first: the tail of the grid is short work
    table = padded_tables(tables, kv_lens, page_size)
    parts = [table, q_starts, q_lens, kv_lens, [b[1] for b in blocks], [b[2] for b in blocks]]
    return PrefillPlan(*int32_on_device(parts, device), page_size, config)


@triton.jit
def _attend_key_block(
    q, q_pos, k_ptr, v_ptr, table, start, kv_len, m_i, l_i, acc, qk_scale,
    kv_head, num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Keys start .. start + BLOCK_N of one sequence folded into the running softmax.

    TMA: k_ptr and v_ptr are descriptors of the cache as [slots, Hkv * D] with
    [BLOCK_N, D] boxes, and the block lies inside one page: one bulk copy each.
    """
    keys = start + tl.arange(0, BLOCK_N)
    if TMA:
        page = tl.load(table + start // page_size)
        slot = page * page_size + start % page_size
        k = k_ptr.load([slot, kv_head * head_dim])
        v = v_ptr.load([slot, kv_head * head_dim])
    else:
        rows = key_offsets(table, keys, page_size, num_kv_heads, kv_head, head_dim)[:, None]
        d = tl.arange(0, head_dim)[None, :]
        k = tl.load(k_ptr + rows + d)
        v = tl.load(v_ptr + rows + d)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        key_ok = keys < kv_len
        s = tl.where((keys[None, :] <= q_pos[:, None]) & key_ok[None, :], s, float("-inf"))
        # Slots past kv_len are stale or never written: 0 * NaN would still poison P·V.
        v = tl.where(key_ok[:, None], v, 0.0)
    return online_softmax_step(s, v, m_i, l_i, acc)


# The page table's width (its row stride) changes with the step's longest sequence:
# specializing on it would compile new variants while serving, after the warm-up.
@triton.jit(do_not_specialize=["stride_table"])
def _paged_prefill_kernel(
    q_ptr, out_ptr, k_ptr, v_ptr,
    table_ptr, q_start_ptr, q_len_ptr, kv_len_ptr, block_seq_ptr, block_row_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, qk_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One program per (query head, planned block); TMA: k_ptr, v_ptr are descriptors."""
    head = tl.program_id(0)
    seq = tl.load(block_seq_ptr + tl.program_id(1))
    row0 = tl.load(block_row_ptr + tl.program_id(1))
    q_len = tl.load(q_len_ptr + seq)
    kv_len = tl.load(kv_len_ptr + seq)
    prefix = kv_len - q_len
    kv_head = head // group
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = (rows < q_len)[:, None]
    d = tl.arange(0, head_dim)[None, :]
    tokens = (tl.load(q_start_ptr + seq) + rows).to(tl.int64)[:, None]
    q = tl.load(q_ptr + tokens * stride_qt + head * stride_qh + d, mask=row_ok, other=0.0)
    q = q.to(k_ptr.dtype if TMA else k_ptr.dtype.element_ty)  # a descriptor's dtype: its element
    q_pos = prefix + rows
    table = table_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, head_dim], tl.float32)
    # Keys up to the block's first query position are visible to every row of the block.
    full_end = (prefix + row0 + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_key_block(
            q, q_pos, k_ptr, v_ptr, table, start, kv_len, m_i, l_i, acc, qk_scale,
            kv_head, num_kv_heads, page_size, head_dim, BLOCK_N, False, TMA,
        )  # fmt: skip
    end = tl.minimum(kv_len, prefix + row0 + BLOCK_M)
    for start in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _attend_key_block(
            q, q_pos, k_ptr, v_ptr, table, start, kv_len, m_i, l_i, acc, qk_scale,
            kv_head, num_kv_heads, page_size, head_dim, BLOCK_N, True, TMA,
        )  # fmt: skip
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + tokens * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PrefillPlan,
    out: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of every planned chunk over its sequence's cached keys, into `out`.

    q: [T, Hq, D] (the step's queries, any dtype; cast to the cache's); k_cache, v_cache:
    [slots, Hkv, D] one layer of `PagedKVCache`, the step's keys already stored.
    out: [T, Hq, D]: the planned sequences' rows are written, other rows are untouched.
    Returns out.
    """
    check_paged_args(q, k_cache, v_cache, out)
    _, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    cfg = plan.config
    if KEY_ALIGN % cfg.block_n:
        raise ValueError(f"block_n must divide {KEY_ALIGN}, got {cfg.block_n}")
    num_blocks = plan.block_seq.shape[0]
    if num_blocks == 0:
        return out
    scale = (dim**-0.5 if sm_scale is None else sm_scale) * LOG2E
    tma = cfg.uses_tma(plan.page_size)
    caches = (k_cache, v_cache)
    if tma:
        caches = tuple(_descriptor(t, cfg.block_n) for t in caches)
    launch(_paged_prefill_kernel, (q_heads, num_blocks),
        q, out, *caches,
        plan.page_table, plan.q_start, plan.q_len, plan.kv_len, plan.block_seq, plan.block_row,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), plan.page_table.stride(0),
        scale,
        num_kv_heads=kv_heads, group=q_heads // kv_heads, page_size=plan.page_size, head_dim=dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    return out


def _descriptor(cache: torch.Tensor, block_n: int) -> TensorDescriptor:
    """One layer's K or V cache [slots, Hkv, D] as [slots, Hkv * D], [block_n, D] boxes."""
    slots, heads, dim = cache.shape
    flat = cache.view(slots, heads * dim)
    return TensorDescriptor(flat, [slots, heads * dim], [heads * dim, 1], [block_n, dim])
