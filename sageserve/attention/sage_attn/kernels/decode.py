"""Split-KV decode over the 8-bit paged cache: one query token per sequence.

Decode is memory-bound: each step reads every cached key and value of every sequence once.
So one program handles all query heads of a GQA group (their K/V bytes are read once per
group, not once per query head) over one slice ("split") of the context, and the context is
cut into enough splits to fill the card even for a single sequence:

    grid (sequence, KV head, split) -> the group's rows over the split's keys; then the last
    program of a (sequence, KV head) to finish merges every split's partial (max, sum, acc)
    and writes the output rows (a sequence with one split writes them directly)

Numerics are those of `reference.py` (and of the prefill kernel): Q balanced and quantized
per row to INT8 with IEEE division, INT8 Q·Kᵀ in int32, online softmax in fp32 (log2 units),
P·V in FP16 (P times the V scale, times INT8 V codes) or FP8 (P scaled per absolute block of
PV_BLOCK keys relative to the block's largest V scale). Splits start at multiples of
KEY_ALIGN tokens, so the FP8 blocks stay aligned with the reference's.

Speed (v2, lab/KERNEL_NOTES.md "sage_decode v2"): at 3 stages Triton 3.6's key loop
waits for all of a block's copies before its math and loads nothing during it; the default
5 stages give two buffers, so block i+1's K/V copies are in flight while block i is
computed (64 keys an iteration keep 4 programs per SM; more keys an iteration cost one).
The per-token scales are read as fp16 pairs (4-byte words the pipeliner turns into
cp.async; 2-byte loads stay synchronous in the loop); page numbers once per page. Larger
iterations (`DecodeConfig.block_n`) run as sub_n-key softmax steps; FP8 P·V always steps
by PV_BLOCK keys (the reference's blocks).

CUDA graphs: the split count S comes from static quantities only (batch size, KV heads,
the planned width, the SM count); each sequence is cut into S splits of its own length
(ceil(ceil(kv_len / S) / KEY_ALIGN) · KEY_ALIGN keys, computed in the kernel), so a plan
for a long static width still spreads a shorter context over every split. The workspace
(partials and one arrival counter per (sequence, KV head), zeroed when allocated and
re-zeroed by the merging program) is allocated once per step with the metadata
(`DecodeWorkspace.allocate`), and no host sync happens in forward. The merge reads the
splits in a fixed order, so the output does not depend on which program finishes last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from sageserve.attention.sage_attn.kernels import PV_BLOCK
from sageserve.attention.sage_attn.kernels.prefill import (
    KEY_ALIGN,
    LOG2E,
    _check_q_levels,
    _quantize_q_levels,
    key_run,
    q_key_product,
    scaled_pv,
)
from sageserve.attention.sage_attn.kernels.rotate import (
    HadamardKernel,
    check_rotation,
    hadamard_tile,
)
from sageserve.attention.triton_common import decode_split_count, sm_count
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv, next_power_of_2
from sageserve.layers.fused.pdl import pdl_supported

# Every split starts at a multiple of this many keys (what plan_splits guarantees).
SPLIT_ALIGN = tl.constexpr(KEY_ALIGN)
# Programs to aim for per SM (the shared rule `decode_split_count`): the default config
# compiles to 114 registers (FP8 P·V: 128) and 37.5 KiB of shared memory on sm_90, so four
# 4-warp programs fit an SM (KERNEL_NOTES.md, "sage_decode v2").
PROGRAMS_PER_SM = 4
# No split shorter than this: one loop iteration of the default config, and KEY_ALIGN.
MIN_SPLIT_TOKENS = KEY_ALIGN
# Under the interpreter (CPU), pretend to have this many SMs so splitting is exercised.
CPU_SMS = 64
# Element offsets into one layer's cache need int64 from this many codes on.
WIDE_CODES = 2**31
# Upper bound of splits (the merge walks them in chunks; more only adds merge traffic).
MAX_SPLITS = 64
# fp32 elements of one merge step ([splits, group, D]): 32 registers a thread in a 4-warp
# program (8192 raised the kernel to 149 registers, 3 programs per SM instead of 4); 8 steps
# for 64 splits of a group of 4 at head_dim 128.
MERGE_ELEMENTS = 4096


@dataclass(frozen=True)
class DecodeConfig:
    """Launch knobs of the split kernel; every setting computes the same numerics.

    block_n: keys per loop iteration (a power of two, 16..256; FP8 P·V: a multiple of
    PV_BLOCK). fused_combine: the last program of each (sequence, KV head) merges the splits
    (one kernel); False: a separate combine kernel (two kernels, as v1). packed_scales: read
    the fp16 scales as 4-byte pairs when pages allow (even page sizes). fast_v_cvt: INT8 V to
    fp16 without the I2F unit (compiled kernels only; ignored under the interpreter).
    maxnreg: caps the registers a thread (None: the compiler's choice, 96-116 on sm_90), so
    that more programs share an SM: 96 fits five 4-warp programs, 80 six (both measured
    slower at 64 × 8k on an H100: 394 and 447 µs against 380; BENCHMARKS.md, 2026-12-07).

    Default: the fastest measured on an H100 (lab/KERNEL_NOTES.md, "sage_decode v2"):
    two buffers (5 stages) and the separate combine kernel: the fused merge was 1.7x slower
    at batch 1 (its last program merges 64 splits alone) and no faster at batch >= 16.
    """

    block_n: int = 64
    sub_n: int = 64
    num_warps: int = 4
    num_stages: int = 5
    maxnreg: int | None = None
    fused_combine: bool = False
    packed_scales: bool = True
    fast_v_cvt: bool = True

    def __post_init__(self) -> None:
        n = self.block_n
        if n < 16 or n > 256 or n & (n - 1):
            raise ValueError(f"block_n must be a power of two in 16..256, got {n}")
        if self.num_warps not in (1, 2, 4, 8) or self.num_stages < 1:
            raise ValueError(f"bad num_warps {self.num_warps} / num_stages {self.num_stages}")


DEFAULT_CONFIG = DecodeConfig()


@triton.jit
def _run_starts(
    table, first_key, end, kv_head,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, N: tl.constexpr, RUN: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """Keys first_key .. first_key + N (first_key a multiple of RUN) as N // RUN runs of RUN
    keys, each contiguous in one page -> (page_base, in_page) of each run's first key,
    [N // RUN] each: its slot is page_base + in_page, its V column page_base * D + in_page.

    One page-table read per run, masked past `end` (those runs read the null page): a block
    may reach past the table's KEY_ALIGN padding when N > KEY_ALIGN.
    """
    run_keys = first_key + tl.arange(0, N // RUN) * RUN
    page = tl.load(table + run_keys // page_size, mask=run_keys < end, other=0)
    if WIDE:
        page = page.to(tl.int64)
    return (page * num_kv_heads + kv_head) * page_size, run_keys % page_size


@triton.jit
def _expand_runs(run_first, N: tl.constexpr, RUN: tl.constexpr):
    """[N // RUN] first offsets of runs -> [N] offsets: run r holds run_first[r] + 0 .. RUN-1.

    Each run starts at a multiple of RUN; the hints say so after the reshape (which hides it
    from the compiler), so that the K and V loads vectorize. They are stated here, on values
    computed in the loop body: hints on values carried through a loop are lost.
    """
    if RUN == 1:
        return run_first
    offsets = tl.reshape(run_first[:, None] + tl.arange(0, RUN)[None, :], (N,))
    return tl.max_contiguous(tl.multiple_of(offsets, RUN), RUN)


@triton.jit
def _load_scales(scale_ptr, run_first, N: tl.constexpr, RUN: tl.constexpr,
                 PACKED: tl.constexpr):  # fmt: skip
    """fp16 scales of N keys -> [N] fp32. run_first: [N // RUN] slot of each run's first key.

    PACKED (RUN even): pairs of scales as one int32 word, so each load is >= 4 bytes and can
    be a pipelined cp.async; one fp16 per load (2 bytes) stays a synchronous load whose
    latency every loop iteration would wait for.
    """
    if PACKED:
        words = scale_ptr.to(tl.pointer_type(tl.int32))
        w = tl.load(words + (run_first // 2)[:, None] + tl.arange(0, RUN // 2)[None, :])
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)  # little-endian: key 2u
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (N,)).to(tl.float32)
    else:
        return tl.load(scale_ptr + _expand_runs(run_first, N, RUN)).to(tl.float32)


@triton.jit
def _attend_keys(
    q_codes, q_codes2, row_scale, m_i, l_i, acc, table, first_key, end, kv_head, d,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    N: tl.constexpr, RUN: tl.constexpr, WIDE: tl.constexpr, PACKED: tl.constexpr,
    PV_FP8: tl.constexpr, FAST_CVT: tl.constexpr, Q_LEVELS: tl.constexpr,
):  # fmt: skip
    """Fold keys first_key .. first_key + N (those before `end`) into the running softmax.

    q_codes, q_codes2: [H, D] int8, Q's two levels (Q_LEVELS 1: q_codes2 unused);
    row_scale: [H] (Q scale x sm_scale x log2 e, x 2^-7 with two levels); m_i, l_i: [H]; acc:
    [H, D] fp32, un-normalized. Needs a key before `end` in this block or an earlier one
    (m_i finite afterwards). Returns the updated (m_i, l_i, acc).
    """
    page_base, in_page = _run_starts(table, first_key, end, kv_head, num_kv_heads, page_size,
                                     N, RUN, WIDE)  # fmt: skip
    run_slot = page_base + in_page
    slot = _expand_runs(run_slot, N, RUN)
    # Unmasked code loads: keys past the end read the null page or stale (finite) slots of
    # the last page; their scores are masked and their V scales zeroed below.
    k = tl.load(k_cache_ptr + tl.multiple_of(slot * head_dim, head_dim)[:, None] + d[None, :])
    v_col = _expand_runs(page_base * head_dim + in_page, N, RUN)  # V pages are [D, page]
    v = tl.load(v_cache_ptr + v_col[:, None] + d[None, :] * page_size)
    k_scale = _load_scales(k_scale_ptr, run_slot, N, RUN, PACKED)
    v_scale = _load_scales(v_scale_ptr, run_slot, N, RUN, PACKED)
    key_ok = first_key + tl.arange(0, N) < end
    s = q_key_product(q_codes, q_codes2, k, Q_LEVELS).to(tl.float32)
    s = tl.where(key_ok[None, :], s * row_scale[:, None] * k_scale[None, :], float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_scale = tl.where(key_ok, v_scale, 0.0)  # stale slots may hold any scale, even NaN
    pv = scaled_pv(p, v, v_scale, PV_FP8, FAST_CVT)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _merge_splits(
    out_rows, part_acc_ptr, part_ml_ptr, first_part, used, d,
    num_splits, group: tl.constexpr, head_dim: tl.constexpr, GROUP_P2: tl.constexpr,
    MERGE_S: tl.constexpr,
):  # fmt: skip
    """Merge the `used` splits of one (sequence, KV head) in split order and write its rows.

    out_rows: [GROUP_P2, 1] pointers to each query head's output row; first_part: the
    partial index of (sequence, the group's first head, split 0); partials of head h, split
    s sit at first_part + h * num_splits + s. MERGE_S splits per step, their (max, sum) and
    acc loaded together (one round trip to L2 per step; no separate pass for the maximum).
    Loads bypass L1 (.cg): other SMs wrote the partials.
    """
    hh = tl.arange(0, GROUP_P2)
    head_ok = hh < group
    c = tl.arange(0, MERGE_S)
    m_run = tl.full([GROUP_P2], float("-inf"), tl.float32)
    den = tl.zeros([GROUP_P2], tl.float32)
    num = tl.zeros([GROUP_P2, head_dim], tl.float32)
    for chunk in range(0, used, MERGE_S):
        split = chunk + c
        part = first_part + hh[None, :] * num_splits + split[:, None]  # [MERGE_S, GROUP_P2]
        ok = (split[:, None] < used) & head_ok[None, :]
        m = tl.load(part_ml_ptr + part * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")  # noqa: E741
        acc = tl.load(part_acc_ptr + part[:, :, None] * head_dim + d[None, None, :],
                      mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_new = tl.where(head_ok, m_new, 0.0)  # padding heads see no split: keep it finite
        alpha = tl.exp2(m_run - m_new)  # 0 on the first step (m_run = -inf)
        w = tl.where(ok, tl.exp2(m - m_new[None, :]), 0.0)
        num = num * alpha[:, None] + tl.sum(acc * w[:, :, None], axis=0)
        den = den * alpha + tl.sum(l * w, axis=0)
        m_run = m_new
    out = num / tl.where(head_ok, den, 1.0)[:, None]
    tl.store(out_rows + d[None, :], out.to(out_rows.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def _merge_if_last(
    counter, out_rows, part_acc_ptr, part_ml_ptr, first_part, used, d,
    num_splits, group: tl.constexpr, head_dim: tl.constexpr, GROUP_P2: tl.constexpr,
    MERGE_S: tl.constexpr,
):  # fmt: skip
    """Count this program's split in (its partials are stored); the program that completes
    the count of `used` splits merges them (`_merge_splits`) and zeroes the counter again.

    The barrier puts every thread's partial stores before the counter's release; the
    acquire of the last arrival makes every split's partials visible to the merge.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == used - 1:
        _merge_splits(out_rows, part_acc_ptr, part_ml_ptr, first_part, used, d, num_splits,
                      group, head_dim, GROUP_P2, MERGE_S)  # fmt: skip
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _split_span(kv_len, num_splits):
    """Keys per split of a sequence of kv_len keys cut into num_splits splits: a multiple of
    SPLIT_ALIGN (so FP8 P·V blocks stay aligned with the reference's), at least SPLIT_ALIGN."""
    return tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), SPLIT_ALIGN), 1) * SPLIT_ALIGN


# Values that change from step to step are not specialized on (no recompiles mid-run).
@triton.jit(do_not_specialize=["stride_table", "num_splits"])
def _sage_decode_split_kernel(
    q_ptr, balance_ptr, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_table_ptr, q_row_ptr, kv_len_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, out_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, num_splits, sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
    RUN: tl.constexpr, WIDE: tl.constexpr, PACKED: tl.constexpr, HAS_BALANCE: tl.constexpr,
    PV_FP8: tl.constexpr, FAST_CVT: tl.constexpr, FUSED: tl.constexpr,
    GROUP_P2: tl.constexpr, MERGE_S: tl.constexpr, ROTATE: tl.constexpr, STAGES: tl.constexpr,
    Q_LEVELS: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): the group's query heads over the split's keys.

    ROTATE (a `HadamardKernel`): the group's query rows are rotated (`hadamard_tile`,
    STAGES = log2 D) after their load, in every split (a [BLOCK_H, D] tile: cheaper than a
    pass through memory)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + seq)
    q_row = tl.load(q_row_ptr + seq).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < group  # rows past the group are padding (tl.dot needs >= 16 rows)
    heads = kv_head * group + h
    d = tl.arange(0, head_dim)
    out_rows = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh
    # Issued before the kv_len test: the Q load then overlaps the kv_len round trip.
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=h_ok[:, None], other=0.0,
    )  # fmt: skip
    q = hadamard_tile(q, BLOCK_H, head_dim, STAGES, ROTATE, False)
    if HAS_BALANCE:
        q = q * tl.load(balance_ptr + kv_head * head_dim + d)[None, :]
    span = _split_span(kv_len, num_splits)
    start = tl.multiple_of(split * span, SPLIT_ALIGN)
    if start >= kv_len:
        if FUSED and split == 0:  # kv_len 0 (a padded CUDA-graph row): zeros, not 0/0
            zeros = tl.zeros([BLOCK_H, head_dim], tl.float32)
            tl.store(out_rows + d[None, :], zeros.to(out_ptr.dtype.element_ty),
                     mask=h_ok[:, None])  # fmt: skip
        return  # empty split: nothing reads its partials
    end = tl.minimum(kv_len, start + span)
    q_codes, q_codes2, q_scale = _quantize_q_levels(q, Q_LEVELS)
    row_scale = q_scale * (sm_scale * LOG2E)  # scores in log2 units: exp2 below
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, head_dim], tl.float32)
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    for block_start in range(start, end, BLOCK_N):
        # SUB_N < BLOCK_N only for FP8 P·V: one step per PV_BLOCK keys, the loads of the
        # whole iteration still issued together.
        for sub in tl.static_range(BLOCK_N // SUB_N):
            m_i, l_i, acc = _attend_keys(
                q_codes, q_codes2, row_scale, m_i, l_i, acc, table, block_start + sub * SUB_N,
                end, kv_head, d, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                num_kv_heads, page_size, head_dim, SUB_N, RUN, WIDE, PACKED, PV_FP8, FAST_CVT,
                Q_LEVELS,
            )  # fmt: skip
    used = tl.cdiv(kv_len, span)
    if FUSED and used == 1:  # the only split: normalize here, no partials, no merge
        tl.store(out_rows + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None])  # fmt: skip
    else:
        first_part = (seq * (num_kv_heads * group) + kv_head * group) * num_splits
        part = first_part + h * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=h_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=h_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_ok)
        if FUSED:
            hh = tl.arange(0, GROUP_P2)
            rows = out_ptr + q_row * stride_ot + (kv_head * group + hh)[:, None] * stride_oh
            _merge_if_last(counter_ptr + seq * num_kv_heads + kv_head, rows, part_acc_ptr,
                           part_ml_ptr, first_part, used, d, num_splits, group, head_dim,
                           GROUP_P2, MERGE_S)  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])
def _sage_decode_combine_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, q_row_ptr, kv_len_ptr,
    stride_ot, stride_oh, num_splits,
    num_q_heads: tl.constexpr, head_dim: tl.constexpr, SPLITS: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): merge its non-empty splits and normalize (unfused).
    LAUNCH_DEPENDENTS (sm_90+): the next kernel, if launched with programmatic dependent
    launch (o_proj's GEMV), may start at once and read its first weights meanwhile; it
    waits for this kernel to finish before reading the output (layers/fused/pdl.py)."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(kv_len_ptr + seq)
    s = tl.arange(0, SPLITS)
    used = s < tl.cdiv(kv_len, _split_span(kv_len, num_splits))
    part = (seq * num_q_heads + head) * num_splits + s
    m = tl.load(part_ml_ptr + part * 2, mask=used, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=used, other=0.0)  # noqa: E741
    weight = tl.where(used, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    d = tl.arange(0, head_dim)
    acc = tl.load(part_acc_ptr + part[:, None] * head_dim + d[None, :], mask=used[:, None],
                  other=0.0)  # fmt: skip
    num = tl.sum(acc * weight[:, None], axis=0)
    den = tl.sum(l * weight, axis=0)
    # An empty context (kv_len 0, e.g. a padded CUDA-graph row) gives 0, not 0/0.
    out = tl.where(den > 0, num / den, 0.0)
    row = tl.load(q_row_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@dataclass
class DecodeWorkspace:
    """Per-split partial results, allocated once per step and shared by every layer.

    acc: [B, Hq, splits, D] fp32 (un-normalized P·V); ml: [B, Hq, splits, 2] fp32 (running
    max in log2 units, softmax sum); counter: [B, Hkv] int32, zero between launches (the
    fused merge's arrival count; each merging program zeroes its own again).
    split_tokens: keys per split of a context as long as the planned width (informative:
    the kernel cuts each sequence into `num_splits` splits of its own length,
    ceil(ceil(kv_len / splits) / KEY_ALIGN) · KEY_ALIGN keys, so a workspace planned for a
    long static width still spreads a shorter context over every split).
    """

    acc: torch.Tensor
    ml: torch.Tensor
    counter: torch.Tensor
    split_tokens: int

    @property
    def num_splits(self) -> int:
        return self.acc.shape[2]

    @classmethod
    def allocate(
        cls,
        batch: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        max_tokens: int,
        device: torch.device,
        num_splits: int | None = None,
    ) -> DecodeWorkspace:
        """max_tokens: the longest context planned for (the page table's width in tokens,
        or a static maximum); num_splits: None = plan (`plan_splits`)."""
        splits, split_tokens = plan_splits(batch, kv_heads, max_tokens, device, num_splits)
        return cls(
            acc=torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=device),
            ml=torch.empty(batch, q_heads, splits, 2, dtype=torch.float32, device=device),
            counter=torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
            split_tokens=split_tokens,
        )


def plan_splits(
    batch: int,
    kv_heads: int,
    max_tokens: int,
    device: torch.device,
    num_splits: int | None = None,
    programs_per_sm: int | None = None,
) -> tuple[int, int]:
    """(num_splits, split_tokens) from static quantities only (CUDA-graph friendly).

    The count is the rule shared with the 16-bit decode (`decode_split_count`: about
    programs_per_sm programs per SM over batch × kv_heads, None = PROGRAMS_PER_SM; no split
    shorter than MIN_SPLIT_TOKENS; at most MAX_SPLITS; a power of two); the split length is
    then rounded up to KEY_ALIGN, which may leave fewer splits. num_splits forces a count.
    """
    if num_splits is None:
        pps = PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
        num_splits = decode_split_count(batch * kv_heads, max_tokens, sm_count(device, CPU_SMS),
                                        pps, MIN_SPLIT_TOKENS, MAX_SPLITS)  # fmt: skip
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    split_tokens = cdiv(cdiv(max_tokens, num_splits), KEY_ALIGN) * KEY_ALIGN
    return cdiv(max_tokens, split_tokens), split_tokens


def sage_decode_paged(
    q: torch.Tensor,
    balance: torch.Tensor | None,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    page_table: torch.Tensor,
    q_rows: torch.Tensor,
    kv_len: torch.Tensor,
    out: torch.Tensor,
    workspace: DecodeWorkspace,
    sm_scale: float | None = None,
    config: DecodeConfig = DEFAULT_CONFIG,
    rotation: HadamardKernel = HadamardKernel.OFF,
    q_levels: int = 1,
) -> None:
    """8-bit attention of one query token per sequence over its cached keys, into `out`.

    q: [T, Hq, D] (the step's queries; sequence b's token is row q_rows[b]); balance:
    [Hkv, D] fp32 or None. k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8
    (FP16 P·V) or float8_e4m3fn (FP8 P·V); k_scale, v_scale: [P, Hkv, page] fp16.
    page_table: [B, pages] int32 from `padded_page_table`; q_rows, kv_len: [B] int32
    (kv_len counts the new token, already stored). out: [T, Hq, D]; rows q_rows are written,
    others untouched. workspace: from `DecodeWorkspace.allocate` for this B and these heads.
    config: launch knobs (`DecodeConfig`). rotation: unless OFF, q is given unrotated and
    the kernel applies the Hadamard rotation, this way (`kernels/rotate.py`); sm_scale is
    then the rotated basis's. q_levels: Q in one INT8 level or two (`reference` module doc).
    """
    batch = page_table.shape[0]
    _, q_heads, dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    pv_fp8 = v_cache.dtype == torch.float8_e4m3fn
    _check_q_levels(q_levels, None)
    _check_decode_args(q, k_cache, balance, page_table, q_rows, kv_len, out, workspace)
    check_rotation(rotation, q.dtype, dim)
    if pv_fp8 and config.block_n % PV_BLOCK:
        raise ValueError(f"FP8 P·V scales P per {PV_BLOCK} keys: block_n must be a multiple")
    if batch == 0:
        return
    group = q_heads // kv_heads
    splits = workspace.num_splits
    sub_n = min(config.sub_n, config.block_n)
    if pv_fp8:
        sub_n = PV_BLOCK
    run = key_run(page_size, sub_n)
    group_p2 = next_power_of_2(group)
    launch(_sage_decode_split_kernel, (batch, kv_heads, splits),
        q, balance if balance is not None else k_scale,
        k_cache, k_scale, v_cache, v_scale, page_table, q_rows, kv_len,
        workspace.acc, workspace.ml, workspace.counter, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        splits, dim**-0.5 if sm_scale is None else sm_scale,
        num_kv_heads=kv_heads, group=group, page_size=page_size, head_dim=dim,
        BLOCK_H=max(16, group_p2), BLOCK_N=config.block_n, SUB_N=sub_n, RUN=run,
        WIDE=k_cache.numel() >= WIDE_CODES,
        PACKED=config.packed_scales and _pairs_aligned(run, k_scale, v_scale),
        HAS_BALANCE=balance is not None, PV_FP8=pv_fp8,
        FAST_CVT=config.fast_v_cvt and q.is_cuda, FUSED=config.fused_combine,
        GROUP_P2=group_p2, ROTATE=int(rotation), STAGES=dim.bit_length() - 1, Q_LEVELS=q_levels,
        MERGE_S=min(next_power_of_2(splits), max(1, MERGE_ELEMENTS // (group_p2 * dim))),
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg,
    )  # fmt: skip
    if not config.fused_combine:
        launch(_sage_decode_combine_kernel, (batch, q_heads),
            out, workspace.acc, workspace.ml, q_rows, kv_len,
            out.stride(0), out.stride(1), splits,
            num_q_heads=q_heads, head_dim=dim, SPLITS=next_power_of_2(splits),
            LAUNCH_DEPENDENTS=pdl_supported(q.device), num_warps=4,
        )  # fmt: skip


def _pairs_aligned(run: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> bool:
    """Scales can be read as int32 pairs: runs of an even number of keys (so every pair
    shares a page) and 4-byte aligned scale tensors."""
    return run % 2 == 0 and k_scale.data_ptr() % 4 == 0 and v_scale.data_ptr() % 4 == 0


def _check_decode_args(q, k_cache, balance, page_table, q_rows, kv_len, out, workspace) -> None:
    _, q_heads, dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    batch = page_table.shape[0]
    if q.stride(2) != 1 or q_heads % kv_heads:
        raise ValueError(f"q must be [T, Hq, D] with contiguous rows and Hq % Hkv == 0: {q.shape}")
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [T, Hq, D] like q {tuple(q.shape)}, got {out.shape}")
    if k_cache.dtype != torch.int8 or k_cache.shape[3] != dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} does not fit {q.shape}")
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {dim}")
    if balance is not None and (balance.shape != (kv_heads, dim) or balance.dtype != torch.float32):
        raise ValueError(f"balance must be fp32 [{kv_heads}, {dim}]")
    if page_table.dtype != torch.int32 or not page_table.is_contiguous():
        raise ValueError("page_table must be a contiguous int32 [B, pages] tensor")
    if page_table.shape[1] * page_size < KEY_ALIGN:
        raise ValueError("page_table rows must come from padded_page_table (KEY_ALIGN padding)")
    for name, t in (("q_rows", q_rows), ("kv_len", kv_len)):
        if t.dtype != torch.int32 or t.shape != (batch,):
            raise ValueError(f"{name} must be int32 [{batch}], got {t.dtype} {tuple(t.shape)}")
    splits = workspace.num_splits
    if (
        workspace.acc.shape != (batch, q_heads, splits, dim)
        or workspace.ml.shape != (batch, q_heads, splits, 2)
        or workspace.counter.shape != (batch, kv_heads)
    ):
        raise ValueError("workspace does not fit this batch and these heads: allocate it for them")
