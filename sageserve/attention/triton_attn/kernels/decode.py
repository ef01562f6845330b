"""Split-KV decode over the 16-bit paged cache: one query token per sequence.

Decode is memory-bound: every step reads each sequence's cached K and V once. So one
program takes all query heads of a GQA group (K/V bytes are read once per group, not once
per query head; the group's rows are padded to 16 for tl.dot) over one split of the
context, and the context is cut into enough splits to fill the card even for one sequence:

    grid (sequence, KV head, split) -> partial (max, sum, un-normalized acc) per query head
    grid (sequence, query head)     -> merge the splits, normalize, write the output row

Every sequence is cut into the same number of splits, each a whole number of BLOCK_N keys:
split j covers keys [j * span, (j + 1) * span) with span = ceil(ceil(kv_len / S) / BLOCK_N)
* BLOCK_N, so short sequences leave their last splits empty (they write max -inf, sum 0,
acc 0, which the merge weighs as nothing).

CUDA graphs: the split count S comes from static quantities only (`num_decode_splits`:
batch size, KV heads, SM count, the pool's longest possible context); the workspace is
allocated once per step with the plan (`plan_decode`) and shared by every layer; the
forward pass makes no host sync and no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from sageserve.attention.page_tables import int32_on_device, padded_tables
from sageserve.attention.triton_common import (
    LOG2E,
    check_paged_args,
    decode_split_count,
    key_offsets,
    online_softmax_step,
    sm_count,
)
from sageserve.kernel_launch import launch
from sageserve.launch_math import next_power_of_2
from sageserve.layers.fused.pdl import pdl_supported

BLOCK_N = 64
# Programs to aim for per SM: several keep a memory-bound kernel's loads in flight.
PROGRAMS_PER_SM = 4
# Under the interpreter (CPU) pretend to have this many SMs, so splitting is exercised.
CPU_SMS = 8
# No split shorter than this many keys of the longest possible context (static cap).
MIN_SPLIT_KEYS = 256
# The merge holds all of a row's splits in one tile of this many rows.
MAX_SPLITS = 64


@dataclass
class DecodePlan:
    """The decode kernels' inputs for one step, shared by every layer.

    page_table: [B, W] int32 from `padded_tables`; q_row: [B] int32 (the row of each
    sequence's query in the step's q); kv_len: [B] int32 (counting the new token).
    Workspace, fp32: acc [B, Hq, S, D] (un-normalized P·V per split), ml [B, Hq, S, 2]
    (running max in log2 units, softmax sum). S = num_splits, a power of two.
    """

    page_table: torch.Tensor
    q_row: torch.Tensor
    kv_len: torch.Tensor
    acc: torch.Tensor
    ml: torch.Tensor
    page_size: int

    @property
    def num_splits(self) -> int:
        return self.acc.shape[2]


def num_decode_splits(
    batch: int, kv_heads: int, max_context: int, device: torch.device
) -> int:  # fmt: skip
    """Splits per sequence, from static quantities only (CUDA-graph safe): the shared rule
    `decode_split_count` with PROGRAMS_PER_SM, MIN_SPLIT_KEYS of max_context, MAX_SPLITS."""
    return decode_split_count(
        batch * kv_heads, max_context, sm_count(device, CPU_SMS),
        PROGRAMS_PER_SM, MIN_SPLIT_KEYS, MAX_SPLITS,
    )  # fmt: skip


def plan_decode(
    tables: list[tuple[int, ...]],
    q_rows: list[int],
    kv_lens: list[int],
    page_size: int,
    num_q_heads: int,
    head_dim: int,
    num_splits: int,
    device: torch.device,
) -> DecodePlan:
    """Build the plan on the host (no device sync) and allocate the split workspace.

    tables: each sequence's pages; q_rows, kv_lens: host ints per sequence (kv_len >= 1);
    num_splits: a power of two <= MAX_SPLITS (see `num_decode_splits`).
    """
    if num_splits < 1 or num_splits > MAX_SPLITS or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two in 1..{MAX_SPLITS}: {num_splits}")
    table = padded_tables(tables, kv_lens, page_size)
    table, rows, lens = int32_on_device([table, q_rows, kv_lens], device)
    work = (len(tables), num_q_heads, num_splits)
    return DecodePlan(
        page_table=table,
        q_row=rows,
        kv_len=lens,
        acc=torch.empty(*work, head_dim, dtype=torch.float32, device=device),
        ml=torch.empty(*work, 2, dtype=torch.float32, device=device),
        page_size=page_size,
    )


# The page table's width and the split count change with the step's batch (the split count
# with the batch size, the width with its longest sequence): specializing on them (1,
# divisible by 16, or not) would compile new variants while serving, after the warm-up.
@triton.jit(do_not_specialize=["stride_table", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, q_row_ptr, kv_len_ptr, acc_ptr, ml_ptr,
    stride_qt, stride_qh, stride_table, qk_scale, num_splits,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): the group's query heads over the split's keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + seq)
    span = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * span
    end = tl.minimum(kv_len, start + span)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < group  # rows past the group are padding (tl.dot needs >= 16 rows)
    heads = kv_head * group + h
    d = tl.arange(0, head_dim)
    q_row = tl.load(q_row_ptr + seq).to(tl.int64)
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None], other=0.0)  # fmt: skip
    q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, head_dim], tl.float32)
    table = table_ptr + seq.to(tl.int64) * stride_table
    for block_start in range(start, end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        rows = key_offsets(table, keys, page_size, num_kv_heads, kv_head, head_dim)[:, None]
        # Masked per row (the D-wide loads stay vectorized): slots past the end are stale.
        k = tl.load(k_ptr + rows + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + rows + d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    part = (seq * (num_kv_heads * group) + heads) * num_splits + split
    tl.store(acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=h_ok[:, None])
    tl.store(ml_ptr + part * 2, m_i, mask=h_ok)
    tl.store(ml_ptr + part * 2 + 1, l_i, mask=h_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    out_ptr, acc_ptr, ml_ptr, q_row_ptr, stride_ot, stride_oh, num_splits,
    num_q_heads: tl.constexpr, head_dim: tl.constexpr, SPLITS_TILE: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): weigh each split by exp2(its max - the max), normalize.

    The num_splits partials sit in a SPLITS_TILE-row tile (one compiled variant for every
    split count); rows past num_splits weigh nothing, like empty splits. LAUNCH_DEPENDENTS
    (sm_90+): the next kernel, if launched with programmatic dependent launch (o_proj's
    GEMV), may start at once; it waits for this one before reading the output."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.arange(0, SPLITS_TILE)
    used = split < num_splits
    part = (seq * num_q_heads + head) * num_splits + split
    m = tl.load(ml_ptr + part * 2, mask=used, other=float("-inf"))
    l = tl.load(ml_ptr + part * 2 + 1, mask=used, other=0.0)  # noqa: E741
    weight = tl.exp2(m - tl.max(m, axis=0))  # empty splits: exp2(-inf) = 0
    d = tl.arange(0, head_dim)
    acc = tl.load(acc_ptr + part[:, None] * head_dim + d[None, :], mask=used[:, None], other=0.0)
    num = tl.sum(acc * weight[:, None], axis=0)
    den = tl.sum(l * weight, axis=0)
    # An empty context (kv_len 0: a padded CUDA-graph row) gives 0 rather than NaN.
    out = tl.where(den > 0, num / den, 0.0)
    row = tl.load(q_row_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodePlan,
    out: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query token per planned sequence over its cached keys, into `out`.

    q: [T, Hq, D] (sequence b's query is row plan.q_row[b]; cast to the cache's dtype);
    k_cache, v_cache: [slots, Hkv, D] one layer of `PagedKVCache`, new tokens already
    stored. out: [T, Hq, D]: rows plan.q_row are written, others untouched. Returns out.
    """
    check_paged_args(q, k_cache, v_cache, out)
    _, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    batch, splits = plan.page_table.shape[0], plan.num_splits
    if plan.acc.shape != (batch, q_heads, splits, dim):
        raise ValueError(f"the plan's workspace {tuple(plan.acc.shape)} does not fit q {q.shape}")
    if batch == 0:
        return out
    group = q_heads // kv_heads
    scale = (dim**-0.5 if sm_scale is None else sm_scale) * LOG2E
    launch(_decode_split_kernel, (batch, kv_heads, splits),
        q, k_cache, v_cache, plan.page_table, plan.q_row, plan.kv_len, plan.acc, plan.ml,
        q.stride(0), q.stride(1), plan.page_table.stride(0), scale, splits,
        num_kv_heads=kv_heads, group=group, page_size=plan.page_size, head_dim=dim,
        BLOCK_H=max(16, next_power_of_2(group)), BLOCK_N=BLOCK_N,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    launch(_decode_merge_kernel, (batch, q_heads),
        out, plan.acc, plan.ml, plan.q_row, out.stride(0), out.stride(1), splits,
        num_q_heads=q_heads, head_dim=dim, SPLITS_TILE=MAX_SPLITS,
        LAUNCH_DEPENDENTS=pdl_supported(q.device), num_warps=4,
    )  # fmt: skip
    return out
