"""8-bit attention over the 8-bit paged cache: prefill, prefill after a cached prefix, decode.

One program per (sequence, block of BLOCK_M queries, query head). The query block is
quantized in registers exactly as `sage_reference.quantized_scores` does (balance, per-row
INT8 with IEEE division, half away from zero); keys are read as INT8 codes from their pages
and Q·Kᵀ runs on INT8 tensor cores with int32 accumulation. The softmax is online (fp32);
P·V is FP16 (P times the per-token V scale, times INT8 V codes) or FP8 (P scaled per key
block of 64 relative to the block's largest V scale, times FP8 V codes). The causal mask is
aligned bottom-right: query i of a chunk of n sees keys 0 .. kv_len - n + i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_reference import PV_BLOCK

MIN_SCALE = tl.constexpr(2.0**-24)
LOG2E = tl.constexpr(1.4426950408889634)
# Page tables are read without masks (so the compiler sees each page's keys as contiguous
# and vectorizes): rows must cover every key block a program may touch, i.e. be padded with
# the null page to a multiple of KEY_ALIGN tokens past the longest sequence.
KEY_ALIGN = 128


@triton.jit
def _quantize_q(q, max_code: tl.constexpr):
    """q: [M, D] fp32 -> (int8 codes [M, D], fp32 scales [M]), per row."""
    scale = tl.maximum(tl.max(tl.abs(q), axis=1) / max_code, MIN_SCALE)
    y = tl.div_rn(q, tl.zeros_like(q) + scale[:, None])
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -max_code), max_code)
    return y.to(tl.int8), scale


@triton.jit
def _sage_attention_kernel(
    q_ptr, balance_ptr, out_ptr,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_table_ptr, q_start_ptr, q_len_ptr, kv_len_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
    sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BALANCE: tl.constexpr, PV_FP8: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    block = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    if block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(kv_len_ptr + seq)
    prefix = kv_len - q_len
    kv_head = head // group
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, head_dim)
    q_rows = (tl.load(q_start_ptr + seq) + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=row_ok[:, None], other=0.0,
    ).to(tl.float32)  # fmt: skip
    if HAS_BALANCE:
        q = q * tl.load(balance_ptr + kv_head * head_dim + d)[None, :]
    q_codes, q_scale = _quantize_q(q, 127.0)
    row_scale = q_scale * (sm_scale * LOG2E)  # scores in log2 units: exp2 below
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, head_dim], tl.float32)
    end = tl.minimum(kv_len, prefix + (block + 1) * BLOCK_M)  # last key any row here sees
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        page = tl.load(table + keys // page_size).to(tl.int64)
        # Keys of one page are contiguous in the cache: say so, so that loads vectorize.
        in_page = tl.max_contiguous(tl.multiple_of(keys % page_size, page_size), page_size)
        page_base = (page * num_kv_heads + kv_head) * page_size
        slot = page_base + in_page
        k_rows = tl.multiple_of(slot * head_dim, head_dim)
        # Unmasked: keys past the end read the null page or stale slots of this sequence's
        # last page; they are masked out of the scores, and their V scales are zeroed. (The
        # pool starts zeroed and the store never writes a non-finite code.)
        k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :])
        k_scale = tl.load(k_scale_ptr + slot).to(tl.float32)
        s = tl.dot(q_codes, tl.trans(k)).to(tl.float32)
        s = s * row_scale[:, None] * k_scale[None, :]
        allowed = (keys[None, :] <= prefix + rows[:, None]) & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Zeroed past the end: P·s_v must be 0 there even if a stale scale were not finite.
        v_scale = tl.where(key_ok, tl.load(v_scale_ptr + slot).to(tl.float32), 0.0)
        v_base = page_base * head_dim + in_page
        v = tl.load(v_cache_ptr + v_base[:, None] + d[None, :] * page_size)
        if PV_FP8:
            block_max = tl.maximum(tl.max(v_scale, axis=0), MIN_SCALE)
            p_codes = (p * (v_scale / block_max)[None, :] * 448.0).to(tl.float8e4nv)
            pv = tl.dot(p_codes, v) * (block_max / 448.0)
        else:
            pv = tl.dot((p * v_scale[None, :]).to(tl.float16), v.to(tl.float16))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = (tl.load(q_start_ptr + seq) + rows).to(tl.int64)
    tl.store(out_ptr + o_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


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
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """8-bit attention of every sequence's query chunk over its cached keys.

    q: [T, Hq, D] (the step's queries, sequences back to back); balance: [Hkv, D] fp32 or
    None. k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8 (FP16 P·V) or
    float8_e4m3fn (FP8 P·V); k_scale, v_scale: [P, Hkv, page] fp16. page_table: [B, pages]
    int32 from `padded_page_table` (rows padded with page 0 past KEY_ALIGN-aligned ends).
    q_start, q_len, kv_len: [B] int32 (the new tokens are already stored; kv_len counts them).
    max_q_len: the largest q_len (host int, sizes the grid).
    Returns [T, Hq, D] in q's dtype.
    """
    tokens, q_heads, dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    pv_fp8 = v_cache.dtype == torch.float8_e4m3fn
    _check_args(q, k_cache, v_cache, balance, page_table, pv_fp8, block_n)
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    grid = (page_table.shape[0], triton.cdiv(max_q_len, block_m), q_heads)
    num_warps = 8 if block_m >= 128 else 4
    _sage_attention_kernel[grid](
        q, balance if balance is not None else k_scale, out,
        k_cache, k_scale, v_cache, v_scale,
        page_table, q_start, q_len, kv_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        dim**-0.5 if sm_scale is None else sm_scale,
        num_kv_heads=kv_heads, group=q_heads // kv_heads, page_size=page_size, head_dim=dim,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BALANCE=balance is not None, PV_FP8=pv_fp8,
        num_warps=num_warps, num_stages=3,
    )  # fmt: skip
    return out


def padded_page_table(
    tables: list[tuple[int, ...]], kv_lens: list[int], page_size: int, device: torch.device
) -> torch.Tensor:
    """[B, width] int32: each sequence's pages, then the null page (0) up to a width that
    covers max(kv_lens) rounded up to KEY_ALIGN tokens (see KEY_ALIGN)."""
    aligned = -(-max(kv_lens) // KEY_ALIGN) * KEY_ALIGN
    width = -(-aligned // page_size)
    rows = []
    for table, kv_len in zip(tables, kv_lens, strict=True):
        used = list(table[: -(-kv_len // page_size)])
        rows.append(used + [0] * (width - len(used)))
    return torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)


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
    if block_n > KEY_ALIGN or KEY_ALIGN % block_n:
        raise ValueError(f"block_n must divide {KEY_ALIGN}, got {block_n}")
    if pv_fp8 and block_n != PV_BLOCK:
        raise ValueError(f"FP8 P·V scales P per {PV_BLOCK} keys: block_n must be {PV_BLOCK}")
