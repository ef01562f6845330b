"""Write a step's new keys and values into one layer of the 16-bit paged cache.

Layout: that of `paged_cache.PagedKVCache` (see `triton_common`). One program per block of
BLOCK_T tokens and one KV head: a [BLOCK_T, D] tile of K and of V, each row a contiguous,
vectorized store at the token's slot. Negative slots are skipped (padding rows, e.g. of a
CUDA-graph batch, may point nowhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.attention.triton_common import HEAD_DIMS, check_cache_dtype
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv

BLOCK_T = 16


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads: tl.constexpr, head_dim: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    in_batch = tokens < num_tokens
    slot = tl.load(slot_ptr + tokens, mask=in_batch, other=-1).to(tl.int64)
    ok = (slot >= 0)[:, None]
    d = tl.arange(0, head_dim)
    t = tokens.to(tl.int64)[:, None]
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + d[None, :], mask=ok)
    dst = tl.multiple_of((slot * num_kv_heads + head) * head_dim, head_dim)[:, None] + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Write T new tokens of one layer into the cache (cast to the cache's dtype).

    k, v: [T, Hkv, D] (any strides with contiguous rows, e.g. views of a fused QKV output);
    slot_mapping: [T] int64 (or int32) slot of each token, negative = skip;
    k_cache, v_cache: [slots, Hkv, D] contiguous (one layer of `PagedKVCache`).
    """
    tokens, heads, dim = k.shape
    _check_store_args(k, v, slot_mapping, k_cache, v_cache)
    if tokens == 0:
        return
    launch(_store_kv_kernel, (cdiv(tokens, BLOCK_T), heads),
        k, v, slot_mapping, k_cache, v_cache, tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads=heads, head_dim=dim, BLOCK_T=BLOCK_T, num_warps=4,
    )  # fmt: skip


def _check_store_args(k, v, slot_mapping, k_cache, v_cache) -> None:
    tokens, heads, dim = k.shape
    if v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"k and v must be [T, Hkv, D] with contiguous rows: {k.shape}, {v.shape}")
    if k_cache.shape != v_cache.shape or tuple(k_cache.shape[1:]) != (heads, dim):
        raise ValueError(
            f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit k {tuple(k.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the cache layers must be contiguous")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{tokens}], got {slot_mapping.shape}")
    if dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {dim} is not supported; choose one of {HEAD_DIMS}")
    check_cache_dtype(k_cache.dtype)
