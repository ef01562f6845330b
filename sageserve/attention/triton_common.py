"""Triton pieces shared by the 16-bit kernels (`triton_attn/kernels`: store, prefill,
decode) and, for the split rule and key alignment, the 8-bit ones (`sage_attn/kernels`).

Cache layout: that of `paged_cache.PagedKVCache`, one layer at a time:

    k, v  [num_pages * page_size, Hkv, D]   fp16 / bf16 (fp32 only under the interpreter)

Token slot s = page * page_size + offset; page 0 is the null page (zeros, never written).
One key's D values are contiguous (128-256 bytes at D 64-128), so a tile of keys loads as
one vectorized row per key whatever the page size; the rows of one page are Hkv * D apart.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sageserve.launch_math import cdiv

LOG2E = 1.4426950408889634
# Page tables are read without masks in the prefill kernel (a block of keys never reads
# past the padding): rows are padded with the null page to cover the longest sequence
# rounded up to KEY_ALIGN tokens, and key blocks must divide KEY_ALIGN.
KEY_ALIGN = 128
# Head dims the kernels are built and tested for (tl.arange needs powers of two, tl.dot >= 16).
HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def sm_count(device: torch.device, cpu_sms: int) -> int:
    """The device's SM count; off CUDA (the interpreter) `cpu_sms`, so splitting is exercised."""
    if device.type != "cuda":
        return cpu_sms
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    # Cached here: get_device_properties took ~14 µs a call on an H100 machine, and an eager
    # step's store and decode wrappers ask for it every layer (lab/host_wrapper_probe.py).
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_split_count(
    pairs: int,
    max_tokens: int,
    sms: int,
    programs_per_sm: int,
    min_split_tokens: int,
    max_splits: int,
) -> int:
    """Splits per sequence of a split-KV decode, from static quantities only (CUDA-graph safe).

    The one rule of both decode kernels (`paged_decode`, `sage_decode`): enough splits for
    about `programs_per_sm` programs per SM over `pairs` = batch x KV heads, none shorter than
    `min_split_tokens` of `max_tokens` (the longest context the plan covers), at most
    `max_splits`, rounded down to a power of two. Rounding down keeps the grid within whole
    waves for power-of-two batch x KV heads: e.g. 128 pairs on 132 SMs x 4 give 4 splits (512
    programs, one wave), where 5 would leave a second wave of 112 programs.
    """
    wanted = cdiv(programs_per_sm * sms, max(pairs, 1))
    splits = max(1, min(wanted, cdiv(max_tokens, min_split_tokens), max_splits))
    return 1 << (splits.bit_length() - 1)


@triton.jit
def key_offsets(table, keys, page_size: tl.constexpr, num_kv_heads: tl.constexpr, kv_head,
                head_dim: tl.constexpr):  # fmt: skip
    """[N] key positions of one sequence -> [N] int64 offsets of their rows for `kv_head`.

    table points at the sequence's page-table row; it is read unmasked (see KEY_ALIGN).
    """
    page = tl.load(table + keys // page_size).to(tl.int64)
    slot = page * page_size + keys % page_size
    # Rows start at multiples of head_dim elements: lets the D-wide loads vectorize.
    return tl.multiple_of((slot * num_kv_heads + kv_head) * head_dim, head_dim)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one block of keys into a running softmax.

    s: [M, N] fp32 scores in log2 units (-inf where masked; every row needs at least one
    finite score over the blocks seen so far); v: [N, D]; m_i, l_i: [M]; acc: [M, D] fp32.
    Returns the updated (m_i, l_i, acc); acc stays un-normalized.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


def check_paged_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor) -> None:  # fmt: skip
    """Shapes and dtypes shared by the prefill and decode wrappers (ValueError otherwise)."""
    _, q_heads, dim = q.shape
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[2] != dim:
        raise ValueError(
            f"caches must be [slots, Hkv, D] of one layer with D = {dim}, got "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if q.stride(2) != 1 or q_heads % k_cache.shape[1]:
        raise ValueError(f"q must be [T, Hq, D] with contiguous rows, Hq % Hkv == 0: {q.shape}")
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [T, Hq, D] like q {tuple(q.shape)}, got {out.shape}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the cache layers must be contiguous")
    if dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {dim} is not supported; choose one of {HEAD_DIMS}")
    check_cache_dtype(k_cache.dtype)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k and v caches differ in dtype: {k_cache.dtype}, {v_cache.dtype}")


def check_cache_dtype(dtype: torch.dtype) -> None:
    """fp16 / bf16 compiled; under the interpreter fp16 / fp32 (its bf16 math is wrong)."""
    valid = (torch.float16, torch.float32) if interpreting() else SUPPORTED_DTYPES
    if dtype not in valid:
        names = ", ".join(str(t).removeprefix("torch.") for t in valid)
        where = "under Triton's interpreter" if interpreting() else "on the GPU"
        raise ValueError(f"cache dtype {dtype} is not supported {where}; choose one of: {names}")
