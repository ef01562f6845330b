"""Rotary embedding of q and k in one kernel, straight from the fused QKV projection.

One program per token: it gathers the token's cos/sin row once and rotates every query
head, then every key head ([HEADS, D/2] tiles), writing contiguous q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.kernel_launch import launch
from sageserve.launch_math import next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, stride_t, stride_h, num_heads, cos, sin,
    HALF: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    """Rotate num_heads heads of one token: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), each
    product and each sum rounded to the model dtype, as the torch ops store them."""
    dtype = out_ptr.dtype.element_ty
    heads = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    ok = heads < num_heads
    src = x_ptr + token * stride_t + heads * stride_h + d
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    x1c, x2s = (x1 * cos).to(dtype).to(tl.float32), (x2 * sin).to(dtype).to(tl.float32)
    x2c, x1s = (x2 * cos).to(dtype).to(tl.float32), (x1 * sin).to(dtype).to(tl.float32)
    dst = out_ptr + (token * num_heads + heads) * (2 * HALF) + d
    tl.store(dst, (x1c - x2s).to(dtype), mask=ok)
    tl.store(dst + HALF, (x2c + x1s).to(dtype), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, num_q_heads, num_kv_heads,
    HALF: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + position * (2 * HALF) + d).to(tl.float32)
    sin = tl.load(cos_sin_ptr + position * (2 * HALF) + HALF + d).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin,
                  HALF, Q_HEADS)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin,
                  HALF, KV_HEADS)  # fmt: skip


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions, as `apply_rotary` does (NeoX layout).

    q: [T, Hq, D], k: [T, Hkv, D], any token and head strides with contiguous head rows
    (views of the fused QKV output); positions: [T] int64; cos_sin: [max_positions, D]
    = cat(cos, sin) in q's dtype (`RotaryEmbedding.cos_sin`). Returns new contiguous q, k.
    """
    _check(q, k, positions, cos_sin)
    tokens, num_q_heads, dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens:
        launch(_rotary_kernel, (tokens,),
            q, k, positions, cos_sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), num_q_heads, k.shape[1],
            HALF=dim // 2, Q_HEADS=next_power_of_2(num_q_heads),
            KV_HEADS=next_power_of_2(k.shape[1]), num_warps=4,
            enable_fp_fusion=False,  # an FMA would skip the rounding of each product
        )  # fmt: skip
    return q_out, k_out


def _check(q, k, positions, cos_sin) -> None:
    dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != dim:
        raise ValueError(f"q [T, Hq, D] and k [T, Hkv, D] do not match: {q.shape}, {k.shape}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k heads must be contiguous rows of D values")
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"head_dim {dim} must be a power of two for the fused rotary")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{q.shape[0]}], got {positions.shape}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != dim or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be a contiguous [positions, {dim}] table")
    if cos_sin.dtype != q.dtype or k.dtype != q.dtype:
        dtypes = f"{q.dtype}, {k.dtype}, {cos_sin.dtype}"
        raise ValueError(f"q, k and cos_sin must share a dtype: {dtypes}")
