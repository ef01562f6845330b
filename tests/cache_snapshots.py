"""Snapshots of a KV cache (a dataclass of tensors) for tests that run one step two ways
and compare what each wrote: the 16-bit `PagedKVCache` and the 8-bit `SageKVCache`."""

from __future__ import annotations

import dataclasses

import torch


def token_rows(cache) -> list[torch.Tensor]:
    """Every pool tensor of a cache as [layers, slots, values of one token] (the sage
    scratch page left out): a token's K, V and scales, one row per slot."""
    if not hasattr(cache, "scratch_page"):
        return [t.view(t.shape[0], t.shape[1], -1) for t in (cache.k, cache.v)]
    pool = cache.scratch_page
    k = cache.k[:, :pool].permute(0, 1, 3, 2, 4)  # [L, P, page, H, D]
    v = cache.v[:, :pool].permute(0, 1, 4, 2, 3)  # V pages are [H, D, page]
    scales = [s[:, :pool].permute(0, 1, 3, 2) for s in (cache.k_scale, cache.v_scale)]
    return [t.reshape(t.shape[0], t.shape[1] * t.shape[2], -1) for t in (k, v, *scales)]


def tensor_fields(cache) -> list[str]:
    return [name for name, value in vars(cache).items() if isinstance(value, torch.Tensor)]


def snapshot(cache):
    """A copy of the cache (a dataclass of tensors)."""
    return dataclasses.replace(
        cache, **{n: getattr(cache, n).clone() for n in tensor_fields(cache)}
    )


def restore(cache, saved) -> None:
    for name in tensor_fields(cache):
        getattr(cache, name).copy_(getattr(saved, name))


def assert_same_pool(cache, want) -> None:
    for now, then in zip(token_rows(cache), token_rows(want), strict=True):
        assert torch.equal(now, then)


def assert_written_only(cache, before, slots: list[int]) -> None:
    """Slots other than `slots` hold what they held before (nothing else was written)."""
    for now, then in zip(token_rows(cache), token_rows(before), strict=True):
        keep = torch.ones(now.shape[1], dtype=torch.bool, device=now.device)
        keep[slots] = False
        assert torch.equal(now[:, keep], then[:, keep])
