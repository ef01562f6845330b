"""Split-KV decode over the 8-bit paged cache: one query token per sequence.

Decode is memory-bound: each step reads every cached key and value of every sequence once.
So one program handles all query heads of a GQA group (their K/V bytes are read once per
group, not once per query head) over one slice ("split") of the context, and the context is
cut into enough splits to fill the card even for a single sequence:

    grid (sequence, KV head, split) -> partial (max, sum, acc) per query head and split
    grid (sequence, query head)     -> combine the splits, normalize, write the output row

Numerics are those of `sage_reference` (and of the prefill kernel): Q balanced and quantized
per row to INT8 with IEEE division, INT8 Q·Kᵀ in int32, online softmax in fp32 (log2 units),
P·V in FP16 (P times the V scale, times INT8 V codes) or FP8 (P scaled per absolute block of
PV_BLOCK keys relative to the block's largest V scale). Splits start at multiples of
KEY_ALIGN tokens, so the FP8 blocks stay aligned with the reference's.

CUDA graphs: the split count and split length come from static quantities only (batch
size, KV heads, the page table's width, the SM count), the workspace is allocated once per
step with the metadata (`DecodeWorkspace.allocate`), and no host sync happens in forward.
Empty splits (past a short sequence's end) write nothing; the combine never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sageserve.attention.kernels.sage_attention import (
    KEY_ALIGN,
    LOG2E,
    MIN_SCALE,
    _int8_to_fp16,
    _quantize_q,
    key_run,
)
from sageserve.attention.sage_reference import PV_BLOCK

# Keys per loop iteration: one FP8 P·V scaling block, and a divisor of KEY_ALIGN so that the
# unmasked page-table reads stay inside `padded_page_table`'s padding.
BLOCK_N = PV_BLOCK
# Every split starts at a multiple of this many keys (what plan_splits guarantees).
SPLIT_ALIGN = tl.constexpr(KEY_ALIGN)
# Programs to aim for per SM. Few sequences: 4 (more, shorter splits: 1 x 32k and 8 x 8k
# contexts ran 20% faster than with 2); once batch x KV heads alone fills the SMs, 2 (3 splits
# of 32 x 4k ran 14% slower than 2). H100 measurements, KERNEL_NOTES.md decode v1.
PROGRAMS_PER_SM_FEW = 4
PROGRAMS_PER_SM = 2
# Under the interpreter (CPU), pretend to have this many SMs so splitting is exercised.
CPU_SMS = 64
# Upper bound of splits: the combine kernel holds all of a row's splits in one tile.
MAX_SPLITS = 64


# Values that change from step to step are not specialized on (no recompiles mid-run).
@triton.jit(do_not_specialize=["stride_table", "split_tokens", "num_splits"])
def _sage_decode_split_kernel(
    q_ptr, balance_ptr, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_table_ptr, q_row_ptr, kv_len_ptr, part_acc_ptr, part_ml_ptr,
    stride_qt, stride_qh, stride_table, split_tokens, num_splits,
    sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    KEY_RUN: tl.constexpr, HAS_BALANCE: tl.constexpr, PV_FP8: tl.constexpr,
    FAST_CVT: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): the group's query heads over split_tokens keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + seq)
    # split_tokens is a multiple of KEY_ALIGN: saying so lets the compiler see each page's
    # keys as one aligned run (otherwise V, contiguous along keys, loads byte by byte).
    start = tl.multiple_of(split * split_tokens, SPLIT_ALIGN)
    if start >= kv_len:
        return  # empty split: the combine kernel reads only cdiv(kv_len, split_tokens)
    end = tl.minimum(kv_len, start + split_tokens)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < group  # rows past the group are padding (tl.dot needs >= 16 rows)
    heads = kv_head * group + h
    d = tl.arange(0, head_dim)
    q_row = tl.load(q_row_ptr + seq).to(tl.int64)
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=h_ok[:, None], other=0.0,
    ).to(tl.float32)  # fmt: skip
    if HAS_BALANCE:
        q = q * tl.load(balance_ptr + kv_head * head_dim + d)[None, :]
    q_codes, q_scale = _quantize_q(q, 127.0)
    row_scale = q_scale * (sm_scale * LOG2E)  # scores in log2 units: exp2 below
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, head_dim], tl.float32)
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    for block_start in range(start, end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        # Unmasked: rows come from `padded_page_table`, and block_start < kv_len keeps every
        # read inside the KEY_ALIGN padding.
        page = tl.load(table + keys // page_size).to(tl.int64)
        in_page = keys % page_size
        if KEY_RUN > 1:
            # Power-of-two pages: runs of KEY_RUN keys are contiguous in the cache (and start
            # aligned); saying so lets the K and V loads vectorize.
            in_page = tl.max_contiguous(tl.multiple_of(in_page, KEY_RUN), KEY_RUN)
        page_base = (page * num_kv_heads + kv_head) * page_size
        slot = page_base + in_page
        # Unmasked code loads: keys past the end read the null page or stale (finite) slots
        # of the last page; their scores are masked and their V scales zeroed below.
        k = tl.load(k_cache_ptr + tl.multiple_of(slot * head_dim, head_dim)[:, None] + d[None, :])
        k_scale = tl.load(k_scale_ptr + slot).to(tl.float32)
        s = tl.dot(q_codes, tl.trans(k)).to(tl.float32)
        s = s * row_scale[:, None] * k_scale[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_scale = tl.where(key_ok, tl.load(v_scale_ptr + slot).to(tl.float32), 0.0)
        v_rows = page_base * head_dim + in_page  # V pages are [D, page]: keys contiguous
        v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :] * page_size)
        if PV_FP8:
            block_max = tl.maximum(tl.max(v_scale, axis=0), MIN_SCALE)
            p_codes = (p * (v_scale / block_max)[None, :] * 448.0).to(tl.float8e4nv)
            pv = tl.dot(p_codes, v) * (block_max / 448.0)
        else:
            v16 = _int8_to_fp16(v) if FAST_CVT else v.to(tl.float16)
            pv = tl.dot((p * v_scale[None, :]).to(tl.float16), v16)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    part = (seq * (num_kv_heads * group) + heads) * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=h_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=h_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_ok)


@triton.jit(do_not_specialize=["split_tokens", "num_splits"])
def _sage_decode_combine_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, q_row_ptr, kv_len_ptr,
    stride_ot, stride_oh, split_tokens, num_splits,
    num_q_heads: tl.constexpr, head_dim: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): merge its non-empty splits and normalize."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(kv_len_ptr + seq)
    s = tl.arange(0, SPLITS)
    used = s < tl.cdiv(kv_len, split_tokens)
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
    max in log2 units, softmax sum). split_tokens: keys per split, a multiple of KEY_ALIGN.
    """

    acc: torch.Tensor
    ml: torch.Tensor
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
        """max_tokens: the page table's width in tokens (static); num_splits: None = plan."""
        splits, split_tokens = plan_splits(batch, kv_heads, max_tokens, device, num_splits)
        return cls(
            acc=torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=device),
            ml=torch.empty(batch, q_heads, splits, 2, dtype=torch.float32, device=device),
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

    Enough splits for programs_per_sm programs per SM over batch × kv_heads (None:
    PROGRAMS_PER_SM_FEW while batch × kv_heads < SMs, else PROGRAMS_PER_SM), no split
    shorter than KEY_ALIGN tokens, at most MAX_SPLITS. num_splits forces a count (tests).
    """
    if num_splits is None:
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else CPU_SMS
        )
        pairs = max(batch * kv_heads, 1)
        if programs_per_sm is None:
            programs_per_sm = PROGRAMS_PER_SM_FEW if pairs < sms else PROGRAMS_PER_SM
        wanted = triton.cdiv(programs_per_sm * sms, pairs)
        num_splits = min(wanted, triton.cdiv(max_tokens, KEY_ALIGN), MAX_SPLITS)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, num_splits), KEY_ALIGN) * KEY_ALIGN
    return triton.cdiv(max_tokens, split_tokens), split_tokens


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
    num_stages: int = 3,
    fast_v_cvt: bool = True,
) -> None:
    """8-bit attention of one query token per sequence over its cached keys, into `out`.

    q: [T, Hq, D] (the step's queries; sequence b's token is row q_rows[b]); balance:
    [Hkv, D] fp32 or None. k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8
    (FP16 P·V) or float8_e4m3fn (FP8 P·V); k_scale, v_scale: [P, Hkv, page] fp16.
    page_table: [B, pages] int32 from `padded_page_table`; q_rows, kv_len: [B] int32
    (kv_len counts the new token, already stored). out: [T, Hq, D]; rows q_rows are written,
    others untouched. workspace: from `DecodeWorkspace.allocate` for this B and table width.
    num_stages: software-pipelining depth of the key loop (tuning). fast_v_cvt: INT8 V to
    fp16 without the I2F unit (as in the prefill kernel; compiled kernels only).
    """
    batch = page_table.shape[0]
    _, q_heads, dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    _check_decode_args(q, k_cache, balance, page_table, q_rows, kv_len, out, workspace)
    if batch == 0:
        return
    group = q_heads // kv_heads
    splits = workspace.num_splits
    _sage_decode_split_kernel[(batch, kv_heads, splits)](
        q, balance if balance is not None else k_scale,
        k_cache, k_scale, v_cache, v_scale,
        page_table, q_rows, kv_len, workspace.acc, workspace.ml,
        q.stride(0), q.stride(1), page_table.stride(0), workspace.split_tokens, splits,
        dim**-0.5 if sm_scale is None else sm_scale,
        num_kv_heads=kv_heads, group=group, page_size=page_size, head_dim=dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        KEY_RUN=key_run(page_size, BLOCK_N), HAS_BALANCE=balance is not None,
        PV_FP8=v_cache.dtype == torch.float8_e4m3fn, FAST_CVT=fast_v_cvt and q.is_cuda,
        num_warps=4, num_stages=num_stages,
    )  # fmt: skip
    _sage_decode_combine_kernel[(batch, q_heads)](
        out, workspace.acc, workspace.ml, q_rows, kv_len,
        out.stride(0), out.stride(1), workspace.split_tokens, splits,
        num_q_heads=q_heads, head_dim=dim, SPLITS=triton.next_power_of_2(splits), num_warps=4,
    )  # fmt: skip


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
    splits, span = workspace.num_splits, workspace.split_tokens
    if workspace.acc.shape != (batch, q_heads, splits, dim) or splits * span < (
        page_table.shape[1] * page_size
    ):
        raise ValueError("workspace does not fit this batch and page table: allocate it for them")
