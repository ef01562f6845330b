"""The 8-bit KV store kernel against `sage_reference.quantize_kv`, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sageserve.attention.kernels.sage_store import store_kv
from sageserve.attention.sage_reference import quantize_kv


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(tokens: int, heads: int, dim: int, page_size: int, pv: str, smooth: bool, dev):
    gen = torch.Generator().manual_seed(tokens * 7 + dim)
    k = (torch.randn(tokens, heads, dim, generator=gen) * 3 + 2).to(dev)
    v = torch.randn(tokens, heads, dim, generator=gen).to(dev)
    mean = torch.randn(heads, dim, generator=gen).to(dev) if smooth else None
    balance = (torch.rand(heads, dim, generator=gen) + 0.5).to(dev) if smooth else None
    num_pages = -(-tokens // page_size) + 3
    slots = torch.randperm((num_pages - 1) * page_size, generator=gen)[:tokens] + page_size
    pages, offsets = (slots // page_size).to(dev), (slots % page_size).to(dev)
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.int8
    k_cache = torch.randint(-128, 128, (num_pages, heads, page_size, dim), dtype=torch.int8)
    v_cache = torch.zeros(num_pages, heads, dim, page_size, dtype=v_dtype, device=dev)
    k_scale = torch.full((num_pages, heads, page_size), float("nan"), dtype=torch.float16)
    v_scale = k_scale.clone()
    k_cache, k_scale, v_scale = k_cache.to(dev), k_scale.to(dev), v_scale.to(dev)
    store_kv(k, v, mean, balance, pages, offsets, k_cache, k_scale, v_cache, v_scale)
    expected = quantize_kv(k, v, mean, pv, balance)
    got = (
        k_cache[pages, :, offsets],
        k_scale[pages, :, offsets].float(),
        v_cache[pages, :, :, offsets],
        v_scale[pages, :, offsets].float(),
    )
    return got, expected


@pytest.mark.parametrize("tokens", [1, 7, 200])
@pytest.mark.parametrize(("heads", "dim", "page_size"), [(2, 64, 16), (1, 128, 7), (3, 64, 1)])
@pytest.mark.parametrize("smooth", [True, False])
def test_store_int8_matches_reference_bitwise(tokens, heads, dim, page_size, smooth) -> None:
    got, expected = _run(tokens, heads, dim, page_size, "fp16", smooth, _device())
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.cpu(), e.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 333])
def test_store_fp8_matches_reference_bitwise(tokens: int) -> None:
    # FP8 casts are wrong in the Triton interpreter: this path is checked on the GPU only.
    got, expected = _run(tokens, 2, 128, 16, "fp8", True, torch.device("cuda"))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.float().cpu(), e.float().cpu())


def test_bad_arguments_are_rejected() -> None:
    k = torch.randn(4, 2, 48)
    cache = torch.zeros(2, 2, 16, 48, dtype=torch.int8)
    scales = torch.zeros(2, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"power of two|cache shapes"):
        store_kv(k, k, None, None, torch.zeros(4, dtype=torch.int64), torch.arange(4),
                 cache, scales, cache.transpose(2, 3).contiguous(), scales)  # fmt: skip
