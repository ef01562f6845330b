"""8-bit attention over the 8-bit paged cache: prefill and prefill after a cached prefix.

(Single-row sequences, i.e. decodes, go to the split-KV kernel in `decode.py`; this
kernel also computes them correctly, e.g. in tests.)

One program per (block of BLOCK_M queries, query head, sequence), longest blocks first. The
query block is quantized in registers exactly as `reference.quantized_scores` does
(balance, per-row INT8 with IEEE division, half away from zero); keys are read as INT8 codes
from their pages and Q·Kᵀ runs on INT8 tensor cores with int32 accumulation (with
q_levels=2, two INT8 products per block, `q_key_product`). The softmax is
online (fp32, exp2); P·V is FP16 (P times the per-token V scale, times INT8 V codes) or FP8
(P scaled per key block of 64 relative to the block's largest V scale, times FP8 V codes).
The causal mask is aligned bottom-right: query i of a chunk of n sees keys
0 .. kv_len - n + i; keys every row of a block sees run in a loop without mask work, the
diagonal blocks in a second one. Tuning history and measurements: lab/KERNEL_NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sageserve.attention.sage_attn.kernels import PV_BLOCK
from sageserve.attention.sage_attn.kernels.rotate import (
    HadamardKernel,
    check_rotation,
    hadamard_tile,
)

# Page tables are read without masks (so the compiler sees each page's keys as contiguous
# and vectorizes): rows are padded with the null page to a multiple of KEY_ALIGN tokens past
# the longest sequence, as for the 16-bit kernels.
from sageserve.attention.triton_common import KEY_ALIGN
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv

MIN_SCALE = tl.constexpr(2.0**-24)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _quotients(q, max_code: tl.constexpr):
    """q: [M, D] fp32 -> (q / scale [M, D] by IEEE division, fp32 row scales [M]), scale =
    max|q| / max_code floored at MIN_SCALE."""
    scale = tl.maximum(tl.max(tl.abs(q), axis=1) / max_code, MIN_SCALE)
    return tl.div_rn(q, tl.zeros_like(q) + scale[:, None]), scale


@triton.jit
def _quantize_q(q, max_code: tl.constexpr):
    """q: [M, D] fp32 -> (int8 codes [M, D], fp32 scales [M]), per row."""
    y, scale = _quotients(q, max_code)
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -max_code), max_code)
    return y.to(tl.int8), scale


@triton.jit
def _quantize_q_levels(q, LEVELS: tl.constexpr):
    """q: [M, D] fp32 -> (first codes, second codes [M, D] int8, fp32 scale of one unit of
    `q_key_product` [M]) as `reference.quantize_q_two_levels`: the second level is the
    first's rounding residual in codes of 2^-7 of the scale, so one unit of the combined
    product is 2^-7 of it (LEVELS 1: the first codes twice, the second goes unused)."""
    if LEVELS == 1:
        codes, scale = _quantize_q(q, 127.0)
        return codes, codes, scale
    y, scale = _quotients(q, 127.0)
    first = _round_clamped(y, 127.0)
    second = _round_clamped((y - first) * 128.0, 127.0)
    return first.to(tl.int8), second.to(tl.int8), scale * (1.0 / 128.0)


@triton.jit
def _round_clamped(y, max_code: tl.constexpr):
    """Half away from zero, to integers in [-max_code, max_code] (fp32)."""
    y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int32).to(tl.float32)
    return tl.minimum(tl.maximum(y, -max_code), max_code)


@triton.jit
def _int8_to_fp16(v):
    """INT8 codes -> fp16, exactly, without the slow I2F conversion unit (which converts 4
    lanes per clock per SM quarter, and took as long as the exp2 work here).

    Per 4 codes: flip the sign bits (x + 128 as unsigned bytes), place each byte under an
    fp16 exponent byte 0x64 (fp16 1024 + byte), subtract 1152 = 1024 + 128 two lanes at a
    time. Inline PTX: compiled kernels only (the interpreter has no inline asm).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, e, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 e, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, e, 0x5140;
        prmt.b32 $1, t, e, 0x5342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r",
        args=[v],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _block_pages(table, start, page_size: tl.constexpr, BLOCK_N: tl.constexpr):
    """The page number of each key start .. start + BLOCK_N: [BLOCK_N] int32."""
    if page_size < BLOCK_N and page_size & (page_size - 1) == 0:
        # Whole pages per block: read each page number once and repeat it for its keys (a
        # load per key is repeated by each layout that uses the keys' slots).
        pages = tl.load(table + start // page_size + tl.arange(0, BLOCK_N // page_size))
        page = tl.reshape(tl.broadcast_to(pages[:, None], (BLOCK_N // page_size, page_size)),
                          (BLOCK_N,))  # fmt: skip
        return tl.max_constancy(page, page_size)  # (the reshape hides it from the compiler)
    else:
        return tl.load(table + (start + tl.arange(0, BLOCK_N)) // page_size)


@triton.jit
def _load_block(
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr, page, start, kv_head, d,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_RUN: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """Keys start .. start + BLOCK_N (a multiple of BLOCK_N) in pages `page` -> K codes
    [BLOCK_N, D], K scales [BLOCK_N], V codes [BLOCK_N, D], V scales [BLOCK_N].

    Unmasked: keys past the end read the null page or stale slots of this sequence's last
    page; the caller masks them out of the scores and zeroes their V scales. (The pool
    starts zeroed and the store never writes a non-finite code.)
    """
    keys = tl.multiple_of(start + tl.arange(0, BLOCK_N), BLOCK_N)
    in_page = keys % page_size
    if WIDE:
        page = page.to(tl.int64)
    page_base = (page * num_kv_heads + kv_head) * page_size
    if KEY_RUN > 1:
        # Runs of KEY_RUN keys share a page and are contiguous in it: saying so lets the
        # loads vectorize (V is contiguous along keys). Stated here, on values computed
        # here: hints on values carried through a loop are lost.
        page_base = tl.max_constancy(page_base, KEY_RUN)
        in_page = tl.max_contiguous(tl.multiple_of(in_page, KEY_RUN), KEY_RUN)
    slot = page_base + in_page
    k = tl.load(k_cache_ptr + tl.multiple_of(slot * head_dim, head_dim)[:, None] + d[None, :])
    k_scale = tl.load(k_scale_ptr + slot)
    v_rows = page_base * head_dim + in_page  # V pages are [D, page]: keys contiguous
    v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :] * page_size)
    v_scale = tl.load(v_scale_ptr + slot)
    return k, k_scale, v, v_scale


@triton.jit
def _load_block_tma(
    k_desc, k_scale_desc, v_desc, v_scale_desc, table, start, kv_head,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Keys start .. start + BLOCK_N through tensor descriptors (TMA), when a key block lies
    inside one page (page_size % BLOCK_N == 0): one bulk copy per operand, no per-key
    addresses. Returns what `_load_block` does; unmasked in the same way.

    k_desc: [P * Hkv * page, D] int8 boxes [BLOCK_N, D]; v_desc: [P * Hkv * D, page] boxes
    [D, BLOCK_N] (V pages are transposed); scale descriptors [P * Hkv, page] boxes [1, BLOCK_N].
    """
    page = tl.load(table + start // page_size)
    base = page * num_kv_heads + kv_head  # the (page, head) tile
    in_page = start % page_size
    k = k_desc.load([base * page_size + in_page, 0])
    k_scale = tl.reshape(k_scale_desc.load([base, in_page]), [BLOCK_N])
    v = tl.trans(v_desc.load([base * head_dim, in_page]))
    v_scale = tl.reshape(v_scale_desc.load([base, in_page]), [BLOCK_N])
    return k, k_scale, v, v_scale


@triton.jit
def _softmax_pv(
    acc, l_i, m_i, q_codes, q_codes2, row_scale, rows, prefix, start, end, k, k_scale, v,
    v_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PV_FP8: tl.constexpr, FAST_CVT: tl.constexpr, Q_LEVELS: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: returns (acc, l_i, m_i).

    MASK: mask keys past the end (keys >= end) and, if CAUSAL, those after the row (query row
    r sees keys <= prefix + r); off for blocks every row sees in full, which skip that work.
    Scores stay in INT8-product units times the key scale; the row scale (with sm_scale and
    log2 e) is applied inside exp2's argument by one FMA, and m_i is in scaled log2 units.
    Q_LEVELS 2: q_codes2 is Q's second level, and the INT32 scores are 128 times the first
    level's product plus the second's (row_scale carries the 2^-7).
    """
    s = q_key_product(q_codes, q_codes2, k, Q_LEVELS).to(tl.float32)
    s = s * k_scale.to(tl.float32)[None, :]
    v_scale = v_scale.to(tl.float32)
    if MASK:
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        if CAUSAL:
            allowed = (keys[None, :] <= prefix + rows[:, None]) & key_ok[None, :]
        else:
            allowed = key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        # Zeroed past the end: P·s_v must be 0 there even if a stale scale were not finite.
        v_scale = tl.where(key_ok, v_scale, 0.0)
    # row_scale > 0, so the row maximum of s times row_scale is that of the scores.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * row_scale[:, None] - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = scaled_pv(p, v, v_scale, PV_FP8, FAST_CVT)
    return acc * alpha[:, None] + pv, l_i, m_new


@triton.jit
def q_key_product(q_codes, q_codes2, k, Q_LEVELS: tl.constexpr):
    """INT32 Q·Kᵀ of INT8 codes: q [M, D], k [N, D] -> [M, N]; Q_LEVELS 2: 128 (q·k) +
    q2·k, exact (|.| < 2^28 at D = 128)."""
    s = tl.dot(q_codes, tl.trans(k))
    if Q_LEVELS == 2:
        s = s * 128 + tl.dot(q_codes2, tl.trans(k))
    return s


@triton.jit
def scaled_pv(p, v, v_scale, PV_FP8: tl.constexpr, FAST_CVT: tl.constexpr):
    """P·V over one key block with per-key V scales: p [M, N] fp32, v [N, D] 8-bit codes,
    v_scale [N] fp32 (0 for keys past the end) -> [M, D] fp32.

    FP16: P times each key's scale, rounded to fp16, times the INT8 codes. FP8: P scaled by
    the keys' scales relative to the block's largest and by 448, rounded to e4m3, times the
    FP8 codes (`reference`'s PV_BLOCK blocks). Shared by the prefill and decode kernels.
    """
    if PV_FP8:
        block_max = tl.maximum(tl.max(v_scale, axis=0), MIN_SCALE)
        p_codes = (p * (v_scale / block_max)[None, :] * 448.0).to(tl.float8e4nv)
        return tl.dot(p_codes, v) * (block_max / 448.0)
    else:
        v16 = _int8_to_fp16(v) if FAST_CVT else v.to(tl.float16)
        return tl.dot((p * v_scale[None, :]).to(tl.float16), v16)


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q_codes, q_codes2, row_scale, rows, prefix, lo, hi, end, kv_head, d,
    table, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_RUN: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PV_FP8: tl.constexpr, PREFETCH: tl.constexpr, WIDE: tl.constexpr, FAST_CVT: tl.constexpr,
    TMA: tl.constexpr, Q_LEVELS: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks lo, lo + BLOCK_N, .. < hi: (acc, l_i, m_i).

    TMA: the four cache arguments are tensor descriptors (see `_load_block_tma`).

    PREFETCH: load block i + 1 into registers (and its page numbers a block earlier) before
    computing block i, so that the loads overlap the math; otherwise leave the loads to
    Triton's software pipeliner (num_stages).
    """
    if PREFETCH:
        if lo < hi:
            # Prefetches past the last block re-read the last block: never out of bounds.
            last = lo + (hi - lo - 1) // BLOCK_N * BLOCK_N
            page = _block_pages(table, lo, page_size, BLOCK_N)
            k, ks, v, vs = _load_block(k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr, page,
                                       lo, kv_head, d, num_kv_heads, page_size, head_dim,
                                       BLOCK_N, KEY_RUN, WIDE)  # fmt: skip
            page = _block_pages(table, tl.minimum(lo + BLOCK_N, last), page_size, BLOCK_N)
            for start in tl.range(lo, hi, BLOCK_N, num_stages=1):
                start = tl.multiple_of(start, BLOCK_N)
                nxt = tl.minimum(start + BLOCK_N, last)
                k_n, ks_n, v_n, vs_n = _load_block(k_cache_ptr, k_scale_ptr, v_cache_ptr,
                                                   v_scale_ptr, page, nxt, kv_head, d,
                                                   num_kv_heads, page_size, head_dim, BLOCK_N,
                                                   KEY_RUN, WIDE)  # fmt: skip
                page = _block_pages(table, tl.minimum(start + 2 * BLOCK_N, last), page_size,
                                    BLOCK_N)  # fmt: skip
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, q_codes, q_codes2, row_scale, rows,
                                            prefix, start, end, k, ks, v, vs, BLOCK_N, MASK,
                                            CAUSAL, PV_FP8, FAST_CVT, Q_LEVELS)  # fmt: skip
                k, ks, v, vs = k_n, ks_n, v_n, vs_n
    else:
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            if TMA:
                k, ks, v, vs = _load_block_tma(k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                                               table, start, kv_head, num_kv_heads, page_size,
                                               head_dim, BLOCK_N)  # fmt: skip
            else:
                page = _block_pages(table, start, page_size, BLOCK_N)
                k, ks, v, vs = _load_block(k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                                           page, start, kv_head, d, num_kv_heads, page_size,
                                           head_dim, BLOCK_N, KEY_RUN, WIDE)  # fmt: skip
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, q_codes, q_codes2, row_scale, rows, prefix,
                                        start, end, k, ks, v, vs, BLOCK_N, MASK, CAUSAL,
                                        PV_FP8, FAST_CVT, Q_LEVELS)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _query_tile(q_ptr, q_scale_ptr, balance_ptr, q_rows, row_ok, head, kv_head, d, stride_qt,
                stride_qh, stride_st, sm_scale, BLOCK_M: tl.constexpr, head_dim: tl.constexpr,
                STAGES: tl.constexpr, ROTATE: tl.constexpr, HAS_BALANCE: tl.constexpr,
                Q_LEVELS: tl.constexpr):  # fmt: skip
    """The tile's INT8 codes [BLOCK_M, D] (twice: the second level's, or the first's again
    when Q_LEVELS is 1) and row scales [BLOCK_M] (with sm_scale and log2 e: scores in log2
    units, exp2 below; and 2^-7 with two levels). INT8 q: the codes and scales `quantize_q`
    made (one level); otherwise the 16-bit rows, rotated, balanced and quantized here."""
    offsets = q_rows[:, None] * stride_qt + head * stride_qh + d[None, :]
    if q_ptr.dtype.element_ty == tl.int8:
        q_codes = tl.load(q_ptr + offsets, mask=row_ok[:, None], other=0)
        q_codes2 = q_codes
        row_scale = tl.load(q_scale_ptr + q_rows * stride_st + head, mask=row_ok, other=1.0)
    else:
        q = tl.load(q_ptr + offsets, mask=row_ok[:, None], other=0.0)
        q = hadamard_tile(q, BLOCK_M, head_dim, STAGES, ROTATE, True)
        if HAS_BALANCE:
            q = q * tl.load(balance_ptr + kv_head * head_dim + d)[None, :]
        q_codes, q_codes2, q_scale = _quantize_q_levels(q, Q_LEVELS)
        row_scale = q_scale * (sm_scale * LOG2E)
    return q_codes, q_codes2, row_scale


# The page table's width (its row stride) changes with the longest sequence of a step:
# specializing on it (divisible by 16 or not) would recompile the kernel mid-run.
@triton.jit(do_not_specialize=["stride_table"])
def _sage_attention_kernel(
    q_ptr, q_scale_ptr, balance_ptr, out_ptr,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_table_ptr, q_start_ptr, q_len_ptr, kv_len_ptr,
    stride_qt, stride_qh, stride_st, stride_ot, stride_oh, stride_table,
    sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KEY_RUN: tl.constexpr, SPLIT_MASK: tl.constexpr, PREFETCH: tl.constexpr,
    WIDE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BALANCE: tl.constexpr, PV_FP8: tl.constexpr,
    FAST_CVT: tl.constexpr, TMA: tl.constexpr, ROTATE: tl.constexpr, STAGES: tl.constexpr,
    Q_LEVELS: tl.constexpr,
):  # fmt: skip
    """One program per (block of BLOCK_M query rows, query head, sequence).

    ROTATE (a `HadamardKernel`): the query tile is rotated (`hadamard_tile`, STAGES =
    log2 D) right after its load, before the balance and the INT8 codes: once per tile, so
    its cost is spread over the whole key loop, and the rotated queries never travel through
    memory.

    TMA: the cache arguments are tensor descriptors (`cache_descriptors`), read a page-aligned
    key block at a time; otherwise pointers, read by per-key gathers.

    Blocks run last to first (the grid's first programs get the longest causal rows, so
    the short ones fill the tail). SPLIT_MASK: keys every row of the block sees run
    without mask work, then the diagonal blocks with it. CAUSAL off: every row sees all
    kv_len keys (benchmarks against non-causal attention; the server is always causal).
    """
    seq = tl.program_id(2)
    head = tl.program_id(1)
    q_len = tl.load(q_len_ptr + seq)
    block = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0)
    if block < 0:
        return
    kv_len = tl.load(kv_len_ptr + seq)
    prefix = kv_len - q_len
    kv_head = head // group
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, head_dim)
    q_rows = (tl.load(q_start_ptr + seq) + rows).to(tl.int64)
    q_codes, q_codes2, row_scale = _query_tile(q_ptr, q_scale_ptr, balance_ptr, q_rows, row_ok,
                                               head, kv_head, d, stride_qt, stride_qh,
                                               stride_st, sm_scale, BLOCK_M, head_dim, STAGES,
                                               ROTATE, HAS_BALANCE, Q_LEVELS)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, head_dim], tl.float32)
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    if CAUSAL:
        end = tl.minimum(kv_len, prefix + (block + 1) * BLOCK_M)  # past the last key seen
        seen_by_all = prefix + block * BLOCK_M + 1  # keys 0 .. prefix + the block's first row
    else:
        end = kv_len
        seen_by_all = kv_len
    full = seen_by_all // BLOCK_N * BLOCK_N if SPLIT_MASK else 0
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q_codes, q_codes2, row_scale, rows, prefix, 0, full, end, kv_head, d,
        table, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
        num_kv_heads, page_size, head_dim, BLOCK_N, KEY_RUN, False, CAUSAL, PV_FP8, PREFETCH,
        WIDE, FAST_CVT, TMA, Q_LEVELS,
    )  # fmt: skip
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q_codes, q_codes2, row_scale, rows, prefix, full, end, end, kv_head, d,
        table, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
        num_kv_heads, page_size, head_dim, BLOCK_N, KEY_RUN, True, CAUSAL, PV_FP8, PREFETCH,
        WIDE, FAST_CVT, TMA, Q_LEVELS,
    )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


@dataclass(frozen=True)
class PrefillConfig:
    """Launch choices of the prefill kernel (tuned on an H100: lab/KERNEL_NOTES.md).

    block_m query rows and block_n keys per tile; FP8 P·V needs block_n == PV_BLOCK.
    split_mask: run the keys every row sees without mask work, then the diagonal blocks.
    prefetch: load the next key block into registers before computing the current one
    (instead of leaving the loads to Triton's pipeliner). maxnreg: cap registers per thread
    (more programs per SM, at the risk of spills; applied for head_dim <= 128, where it was
    tuned); None: the compiler's choice. fast_v_cvt: convert INT8 V to fp16 with integer
    and half ops instead of the slow conversion unit (same values; compiled kernels only,
    the interpreter always casts).

    tma: read key blocks through tensor descriptors (TMA) when a block lies inside one page
    (page_size % block_n == 0, no prefetch); other page sizes gather per key.

    The default (64 x 64 tiles, 4 warps, 3 stages, 168 registers: three programs per SM)
    was the fastest at 1k-16k tokens, FP16 and FP8 P·V, head_dim 128 (KERNEL_NOTES v3).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_mask: bool = True
    prefetch: bool = False
    maxnreg: int | None = 168
    fast_v_cvt: bool = True
    tma: bool = True

    def uses_tma(self, page_size: int) -> bool:
        """Whether key blocks of this page size go through tensor descriptors."""
        return self.tma and not self.prefetch and page_size % self.block_n == 0


def sage_attention_paged(
    q: torch.Tensor,
    balance: torch.Tensor | None,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    page_table: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_len: torch.Tensor,
    max_q_len: int,
    sm_scale: float | None = None,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
    causal: bool = True,
    rotation: HadamardKernel = HadamardKernel.OFF,
    q_scale: torch.Tensor | None = None,
    descriptor_memo: dict | None = None,
    q_levels: int = 1,
) -> torch.Tensor:
    """8-bit attention of every sequence's query chunk over its cached keys.

    q: [T, Hq, D] (the step's queries, sequences back to back); balance: [Hkv, D] fp32 or
    None. k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8 (FP16 P·V) or
    float8_e4m3fn (FP8 P·V); k_scale, v_scale: [P, Hkv, page] fp16. page_table: [B, pages]
    int32 from `padded_page_table` (rows padded with page 0 past KEY_ALIGN-aligned ends).
    q_start, q_len, kv_len: [B] int32 (the new tokens are already stored; kv_len counts them).
    max_q_len: the largest q_len (host int, sizes the grid). config: None = PrefillConfig().
    out: [T, Hq, D] to write into (rows of other sequences untouched); None: a new tensor.
    causal: False lets every query see all kv_len keys (for benchmarks).
    rotation: unless OFF, q is given unrotated and the kernel applies the Hadamard rotation
    to it, this way (`kernels/rotate.py`); sm_scale is then the rotated basis's.
    q_scale: with INT8 q, q holds the codes `quantize_q` made (rotated and balanced there)
    and q_scale [T, Hq] fp32 their row scales, sm_scale folded in; rotation must be OFF,
    balance None and out given (its dtype is the result's).
    descriptor_memo: where the cache's tensor descriptors are kept (`cache_descriptors`).
    q_levels: Q in one INT8 level or two (`reference` module doc); two need 16-bit q (the
    kernel quantizes it), not `quantize_q`'s codes.
    Returns out, in q's dtype when allocated here.
    """
    config = config or PrefillConfig()
    tokens, q_heads, dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    pv_fp8 = v_cache.dtype == torch.float8_e4m3fn
    _check_q_levels(q_levels, q_scale)
    _check_args(q, k_cache, v_cache, balance, page_table, pv_fp8, config.block_n)
    _check_codes(q, q_scale, balance, rotation, out)
    check_rotation(rotation, q.dtype, dim)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [T, Hq, D] like q {tuple(q.shape)}, got {out.shape}")
    if tokens == 0:
        return out
    tma = config.uses_tma(page_size)
    caches = (k_cache, k_scale, v_cache, v_scale)
    if tma:
        caches = cache_descriptors(*caches, config.block_n, descriptor_memo)
    # Query blocks first (adjacent programs share a head's keys in L2), then heads, sequences.
    grid = (cdiv(max_q_len, config.block_m), q_heads, page_table.shape[0])
    launch(_sage_attention_kernel, grid,
        q, q_scale if q_scale is not None else k_scale,
        balance if balance is not None else k_scale, out, *caches,
        page_table, q_start, q_len, kv_len,
        q.stride(0), q.stride(1), q_scale.stride(0) if q_scale is not None else 0,
        out.stride(0), out.stride(1), page_table.stride(0),
        dim**-0.5 if sm_scale is None else sm_scale,
        num_kv_heads=kv_heads, group=q_heads // kv_heads, page_size=page_size, head_dim=dim,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, KEY_RUN=key_run(page_size, config.block_n),
        SPLIT_MASK=config.split_mask, PREFETCH=config.prefetch, WIDE=_needs_int64(k_cache),
        CAUSAL=causal, FAST_CVT=config.fast_v_cvt and q.is_cuda,
        HAS_BALANCE=balance is not None, PV_FP8=pv_fp8, TMA=tma,
        ROTATE=int(rotation), STAGES=dim.bit_length() - 1, Q_LEVELS=q_levels,
        num_warps=config.num_warps, num_stages=config.num_stages,
        maxnreg=config.maxnreg if dim <= 128 else None,
    )  # fmt: skip
    return out


def cache_descriptors(
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    block_n: int,
    memo: dict | None = None,
) -> tuple[TensorDescriptor, ...]:
    """Tensor descriptors of one layer's 8-bit cache for `_load_block_tma`: (K codes, K
    scales, V codes, V scales), each a 2-D view whose box is one key block of one page.

    k_cache: [P, Hkv, page, D]; v_cache: [P, Hkv, D, page]; scales: [P, Hkv, page].
    memo: a dict owned by the cache (so that what it holds lives as long as the pool, never
    longer), keyed by the four tensors' addresses and block_n; building four descriptors
    took ~25 µs of host time a layer (`lab/host_wrapper_probe.py`). None: built every call.
    """
    key = (k_cache.data_ptr(), k_scale.data_ptr(), v_cache.data_ptr(), v_scale.data_ptr(),
           tuple(k_cache.shape), block_n)  # fmt: skip
    if memo is not None and (built := memo.get(key)) is not None:
        return built
    built = _descriptors(k_cache, k_scale, v_cache, v_scale, block_n)
    if memo is not None:
        memo[key] = built
    return built


def _descriptors(
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    block_n: int,
) -> tuple[TensorDescriptor, ...]:
    pages, heads, page_size, dim = k_cache.shape
    tiles = pages * heads
    views = (
        (k_cache, (tiles * page_size, dim), (block_n, dim)),
        (k_scale, (tiles, page_size), (1, block_n)),
        (v_cache, (tiles * dim, page_size), (dim, block_n)),
        (v_scale, (tiles, page_size), (1, block_n)),
    )
    return tuple(
        TensorDescriptor(t.view(shape), list(shape), [shape[1], 1], list(box))
        for t, shape, box in views
    )


def _check_q_levels(q_levels: int, q_scale: torch.Tensor | None) -> None:
    """ValueError unless q_levels is 1 or 2, and 1 where q comes as `quantize_q`'s codes."""
    if q_levels not in (1, 2):
        raise ValueError(f"q_levels={q_levels!r} is not valid; choose one of: 1, 2")
    if q_levels == 2 and q_scale is not None:
        raise ValueError("q_levels=2 needs 16-bit q: quantize_q's codes have one level")


def _needs_int64(k_cache: torch.Tensor) -> bool:
    """Element offsets into one layer's cache overflow int32 past 2^31 codes."""
    return k_cache.numel() >= 2**31


def key_run(page_size: int, block_n: int) -> int:
    """Keys of a block_n-aligned key block that are contiguous (and aligned) in the cache:
    a power-of-two page holds runs of min(page, block_n); other page sizes promise none."""
    return min(page_size, block_n) if page_size & (page_size - 1) == 0 else 1


def _check_codes(q, q_scale, balance, rotation, out) -> None:
    """ValueError unless q is 16-bit rows (q_scale None) or INT8 codes with their [T, Hq]
    fp32 row scales, unrotated and unbalanced here, and an out to write."""
    if (q.dtype == torch.int8) != (q_scale is not None):
        raise ValueError("q_scale goes with INT8 q codes (from quantize_q), and only with them")
    if q_scale is None:
        return
    if q_scale.shape != q.shape[:2] or q_scale.dtype != torch.float32 or q_scale.stride(1) != 1:
        raise ValueError(f"q_scale must be fp32 {tuple(q.shape[:2])} with contiguous rows")
    if rotation != HadamardKernel.OFF or balance is not None or out is None:
        raise ValueError("INT8 q codes come rotated and balanced by quantize_q: rotation OFF, "
                         "balance None, and out given")  # fmt: skip


def _check_args(q, k_cache, v_cache, balance, page_table, pv_fp8: bool, block_n: int) -> None:
    _, q_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if q.stride(2) != 1 or q_heads % kv_heads:
        raise ValueError(f"q must be [T, Hq, D] with contiguous rows and Hq % Hkv == 0: {q.shape}")
    if k_cache.dtype != torch.int8 or k_cache.shape[3] != dim or v_cache.shape[2] != dim:
        raise ValueError(
            f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit {q.shape}"
        )
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {dim}")
    if balance is not None and (balance.shape != (kv_heads, dim) or balance.dtype != torch.float32):
        raise ValueError(f"balance must be fp32 [{kv_heads}, {dim}]")
    if page_table.dtype != torch.int32 or not page_table.is_contiguous():
        raise ValueError("page_table must be a contiguous int32 [B, pages] tensor")
    page_size = k_cache.shape[2]
    if page_table.shape[1] * page_size < KEY_ALIGN:
        raise ValueError("page_table rows must come from padded_page_table (KEY_ALIGN padding)")
    if block_n < 16 or block_n > KEY_ALIGN or KEY_ALIGN % block_n:
        raise ValueError(f"block_n must be a power of two in 16..{KEY_ALIGN}, got {block_n}")
    if pv_fp8 and block_n != PV_BLOCK:
        raise ValueError(f"FP8 P·V scales P per {PV_BLOCK} keys: block_n must be {PV_BLOCK}")
