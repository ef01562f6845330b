"""Quantize new keys and values and write them into the 8-bit paged cache, in one pass.

Numerics are those of `sage_reference.quantize_kv`: the key is smoothed and balanced,
((k - mean) / c), then INT8 with a per-token, per-head scale rounded to fp16; the value is
INT8 (pv="fp16") or FP8 e4m3 (pv="fp8") likewise. Divisions are IEEE-rounded (`div_rn`) so
the codes equal the reference's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_SCALE = tl.constexpr(2.0**-24)


@triton.jit
def _int8_codes(x, max_code: tl.constexpr):
    """x: [D] fp32 -> (codes int8 [D], scale fp32) with the scale rounded through fp16."""
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / max_code, MIN_SCALE).to(tl.float16).to(tl.float32)
    y = tl.div_rn(x, tl.zeros_like(x) + scale)
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -max_code), max_code)
    return y.to(tl.int8), scale


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, mean_ptr, balance_ptr, pages_ptr, offsets_ptr,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_BALANCE: tl.constexpr, V_FP8: tl.constexpr,
):  # fmt: skip
    """One program per (token, KV head): quantize its key and value, store them."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, head_dim)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d).to(tl.float32)
    if HAS_MEAN:
        k = k - tl.load(mean_ptr + h * head_dim + d)
    if HAS_BALANCE:
        k = tl.div_rn(k, tl.load(balance_ptr + h * head_dim + d))
    k_codes, k_scale = _int8_codes(k, 127.0)
    page = tl.load(pages_ptr + t).to(tl.int64)
    off = tl.load(offsets_ptr + t)
    slot = (page * num_kv_heads + h) * page_size + off  # [page, head, offset] of the scales
    tl.store(k_cache_ptr + slot * head_dim + d, k_codes)
    tl.store(k_scale_ptr + slot, k_scale.to(tl.float16))
    v_base = v_cache_ptr + (page * num_kv_heads + h) * head_dim * page_size + off
    if V_FP8:
        amax = tl.max(tl.abs(v), axis=0)
        v_scale = tl.maximum(amax / 448.0, MIN_SCALE).to(tl.float16).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(v, tl.zeros_like(v) + v_scale), -448.0), 448.0)
        tl.store(v_base + d * page_size, y.to(tl.float8e4nv))
    else:
        v_codes, v_scale = _int8_codes(v, 127.0)
        tl.store(v_base + d * page_size, v_codes)
    tl.store(v_scale_ptr + slot, v_scale.to(tl.float16))


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_mean: torch.Tensor | None,
    balance: torch.Tensor | None,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """Write T new tokens of one layer into the 8-bit cache.

    k, v: [T, Hkv, D] (any float dtype, last dim contiguous); k_mean, balance: [Hkv, D]
    fp32 or None; pages, offsets: [T] int64 (where each token goes).
    k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8 or float8_e4m3fn;
    k_scale, v_scale: [P, Hkv, page] fp16. All contiguous, on one device.
    """
    tokens, heads, dim = k.shape
    _check_store_args(k, v, k_cache, v_cache, k_scale, v_scale, k_mean, balance)
    if tokens == 0:
        return
    dummy = k_scale  # never read when the matching flag is off
    _store_kv_kernel[(tokens, heads)](
        k, v,
        k_mean if k_mean is not None else dummy,
        balance if balance is not None else dummy,
        pages, offsets, k_cache, k_scale, v_cache, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads=heads, page_size=k_cache.shape[2], head_dim=dim,
        HAS_MEAN=k_mean is not None, HAS_BALANCE=balance is not None,
        V_FP8=v_cache.dtype == torch.float8_e4m3fn,
    )  # fmt: skip


def _check_store_args(k, v, k_cache, v_cache, k_scale, v_scale, k_mean, balance) -> None:
    _, heads, dim = k.shape
    if v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(
            f"k and v must share a shape with contiguous rows, got {k.shape}, {v.shape}"
        )
    if k_cache.dtype != torch.int8 or v_cache.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(
            f"cache dtypes must be int8 / int8|fp8, got {k_cache.dtype}, {v_cache.dtype}"
        )
    pages, _, page_size, _ = k_cache.shape
    if k_cache.shape != (pages, heads, page_size, dim) or v_cache.shape != (
        pages,
        heads,
        dim,
        page_size,
    ):
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit {k.shape}"
        )
    for t in (k_cache, v_cache, k_scale, v_scale):
        if not t.is_contiguous():
            raise ValueError("the cache tensors must be contiguous")
    for t in (k_mean, balance):
        if t is not None and (t.shape != (heads, dim) or t.dtype != torch.float32):
            raise ValueError(f"mean and balance must be fp32 [{heads}, {dim}]")
    if dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two for the kernels, got {dim}")
