"""The sage Triton path's host-side memos: each layer's cache views and the prefill's TMA
descriptors are made once per cache and reused, with outputs equal to building them anew
(interpreter on CPU)."""

from __future__ import annotations

import torch

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.kernels.prefill import cache_descriptors
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.bench.kernels_common import model_config

PAGE = 64


def _mixed_step(device: torch.device):
    """3 decodes at 100 tokens and a 37-token chunk over 60 cached ones."""
    tables = [(1, 2), (3, 4), (5, 6), (7, 8)]
    slices = [SequenceSlice(t, 99, 1) for t in tables[:3]] + [SequenceSlice(tables[3], 60, 37)]
    ids = [[0] * s.query_len for s in slices]
    return build_forward_batch(slices, ids, [], PAGE, device)


def test_memos_are_built_once_and_change_nothing() -> None:
    cpu = torch.device("cpu")
    options = BackendOptions("auto", torch.float32, cpu, SageOptions(impl="triton"))
    backend = SageAttentionBackend(model_config(4, 2, 64), options)
    cache = backend.allocate(9, PAGE)
    batch = _mixed_step(cpu)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(40, h, 64, generator=gen) for h in (4, 2, 2))
    meta = backend.build_metadata(batch)
    first = backend.forward(0, q, k, v, cache, meta).clone()
    assert len(cache.descriptor_memo) == 1 and set(cache._layer_views) == {0}
    held = next(iter(cache.descriptor_memo.values()))
    views = cache.layer(0)
    assert all(a is b for a, b in zip(views, cache.layer(0), strict=True))
    fresh = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(views, fresh, strict=True))
    again = backend.forward(0, q, k, v, cache, meta)
    assert next(iter(cache.descriptor_memo.values())) is held  # reused, not rebuilt
    cache.descriptor_memo.clear()
    cache._layer_views.clear()
    rebuilt = backend.forward(0, q, k, v, cache, meta)
    assert torch.equal(first, again) and torch.equal(first, rebuilt)


def test_descriptor_memo_keys_by_tensors_and_block() -> None:
    """Another block width or another layer's tensors get their own descriptors."""
    k = torch.zeros(3, 2, PAGE, 64, dtype=torch.int8)
    scale = torch.zeros(3, 2, PAGE, dtype=torch.float16)
    v = torch.zeros(3, 2, 64, PAGE, dtype=torch.int8)
    memo: dict = {}
    a = cache_descriptors(k, scale, v, scale, 64, memo)
    assert cache_descriptors(k, scale, v, scale, 64, memo) is a
    assert cache_descriptors(k, scale, v, scale, 32, memo) is not a
    other = torch.zeros_like(k)
    assert cache_descriptors(other, scale, v, scale, 64, memo) is not a
    assert len(memo) == 3
    assert cache_descriptors(k, scale, v, scale, 64) is not a  # no memo: built anew
