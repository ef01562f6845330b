"""The 16-bit paged kernels (store, prefill, split-KV decode) and the `triton` backend.

On CPU the kernels run through Triton's interpreter (fp16 and fp32; its bf16 arithmetic is
wrong) at small shapes, against a dense reference. Caches are poisoned with NaN outside the
written slots, outputs with NaN before a kernel runs, pages are shuffled, and lengths are
not multiples of any block. The `gpu` tests run Llama-3.1-8B shapes, bf16 included, and a
CUDA-graph capture and replay of the decode path.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sageserve.attention.base import AttentionShape, BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.triton_attn.backend import TritonBackend
from sageserve.attention.triton_attn.kernels.decode import (
    MAX_SPLITS,
    num_decode_splits,
    paged_decode,
    plan_decode,
)
from sageserve.attention.triton_attn.kernels.prefill import (
    PrefillConfig,
    paged_prefill,
    plan_prefill,
)
from sageserve.attention.triton_attn.kernels.store import store_kv
from sageserve.attention.triton_common import decode_split_count

CPU = torch.device("cpu")
# (prefix_len, query_len): fresh prefills, chunks after a cached prefix, one-row chunks.
PREFILL_SPANS = [(0, 1), (0, 7), (0, 200), (0, 333), (120, 80), (16, 17), (332, 1)]
# Decode contexts (the new token included): below, at and past block and split edges.
DECODE_CONTEXTS = [1, 7, 64, 65, 129, 200, 333]


@dataclass
class Filled:
    """A poisoned cache holding some sequences' keys and values at shuffled pages."""

    k_cache: torch.Tensor  # [slots, Hkv, D]: NaN except written slots and the null page
    v_cache: torch.Tensor
    tables: list[tuple[int, ...]]
    keys: list[torch.Tensor]  # [kv_len, Hkv, D] per sequence, in the cache's dtype
    values: list[torch.Tensor]


def fill_cache(kv_lens, kv_heads, dim, page_size, dtype, gen, device=CPU) -> Filled:
    counts = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(counts) + 3  # the null page and two never used
    k_cache = torch.full((num_pages * page_size, kv_heads, dim), float("nan"), dtype=dtype)
    k_cache[:page_size] = 0
    v_cache = k_cache.clone()
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    bias = 3 * torch.randn(kv_heads, dim, generator=gen)  # real keys have a channel bias
    tables, keys, values = [], [], []
    for n, count in zip(kv_lens, counts, strict=True):
        table, order = tuple(order[:count]), order[count:]
        pos = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.int64)[pos // page_size] * page_size
        slots += pos % page_size
        k = (torch.randn(n, kv_heads, dim, generator=gen) + bias).to(dtype)
        v = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        k_cache[slots], v_cache[slots] = k, v
        tables.append(table)
        keys.append(k.to(device))
        values.append(v.to(device))
    return Filled(k_cache.to(device), v_cache.to(device), tables, keys, values)


def dense_reference(q, k, v, prefix_len, dtype=torch.float64, heads_per_chunk=8):
    """q: [n, Hq, D]; k, v: [kv_len, Hkv, D] -> [n, Hq, D] exact attention, causal mask
    aligned bottom-right, computed in `dtype` a few heads at a time."""
    group = q.shape[1] // k.shape[1]
    k = k.to(dtype).repeat_interleave(group, dim=1)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    q_pos = torch.arange(prefix_len, prefix_len + q.shape[0], device=q.device)
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    outs = []
    for h in range(0, q.shape[1], heads_per_chunk):
        hs = slice(h, h + heads_per_chunk)
        scores = torch.einsum("qhd,khd->hqk", q[:, hs].to(dtype), k[:, hs]) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v[:, hs]))
    return torch.cat(outs, dim=1)


def assert_close(out, ref, max_rel: float, min_cosine: float = 0.9999) -> None:
    """max |out - ref| / max |ref| <= max_rel, and the cosine of the flattened tensors."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output reads poisoned slots or unwritten rows"
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert err <= max_rel and cosine >= min_cosine, (err, cosine)


def tolerance(dtype: torch.dtype) -> float:
    """Rounding of P (to the cache dtype, for P·V) and of the output dominates the error."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


# ---------------------------------------------------------------------------- store


@pytest.mark.parametrize(("in_dtype", "cache_dtype"), [(torch.float16, torch.float16),
                                                       (torch.float32, torch.float16),
                                                       (torch.float32, torch.float32)])  # fmt: skip
def test_store_writes_its_slots_only(in_dtype, cache_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim, slots = 37, 4, 2, 64, 7 * 16
    # k and v as views of one fused QKV projection: strided rows, like the model passes.
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=gen).to(in_dtype)
    k, v = qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    slot_mapping = torch.randperm(slots, generator=gen)[:tokens]
    slot_mapping[5] = -1  # a padding row: stored nowhere
    k_cache = torch.full((slots, kv_heads, dim), float("nan"), dtype=cache_dtype)
    v_cache = k_cache.clone()
    store_kv(k, v, slot_mapping, k_cache, v_cache)
    keep = slot_mapping >= 0
    assert torch.equal(k_cache[slot_mapping[keep]], k[keep].to(cache_dtype))
    assert torch.equal(v_cache[slot_mapping[keep]], v[keep].to(cache_dtype))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot_mapping[keep]] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


def test_store_rejects_bad_arguments() -> None:
    k = torch.randn(3, 2, 64)
    cache = torch.zeros(16, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, torch.zeros(3, dtype=torch.float32), cache, cache)
    slots = torch.zeros(3, dtype=torch.int64)
    narrow = cache[..., :48].contiguous()
    with pytest.raises(ValueError, match=r"head_dim 48 .* choose one of"):
        store_kv(k[..., :48], k[..., :48], slots, narrow, narrow)
    with pytest.raises(ValueError, match="interpreter; choose one of: float16, float32"):
        store_kv(k, k, slots, cache.bfloat16(), cache.bfloat16())


# ---------------------------------------------------------------------------- prefill


def run_prefill(heads, kv_heads, dim, page_size, dtype, spans, config=None, seed=0, device=CPU):
    """Plan every span but the second (its rows must stay untouched); returns (out, refs)."""
    gen = torch.Generator().manual_seed(seed)
    filled = fill_cache([p + n for p, n in spans], kv_heads, dim, page_size, dtype, gen, device)
    starts = [sum(n for _, n in spans[:i]) for i in range(len(spans))]
    q = (2 * torch.randn(sum(n for _, n in spans), heads, dim, generator=gen)).to(dtype)
    q = q.to(device)
    planned = [i for i in range(len(spans)) if i != 1]
    plan = plan_prefill(
        [filled.tables[i] for i in planned], [starts[i] for i in planned],
        [spans[i][1] for i in planned], [sum(spans[i]) for i in planned],
        page_size, dim, device, config,
    )  # fmt: skip
    out = torch.full_like(q, float("nan"))
    paged_prefill(q, filled.k_cache, filled.v_cache, plan, out)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    results = []
    for i, ((p, n), start) in enumerate(zip(spans, starts, strict=True)):
        rows = out[start : start + n]
        if i not in planned:
            assert rows.isnan().all(), "rows of an unplanned sequence were written"
            continue
        ref = dense_reference(q[start : start + n], filled.keys[i], filled.values[i], p, ref_dtype)
        results.append((rows, ref))
    return results


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page_size", "dtype", "config"),
    [
        (4, 2, 64, 16, torch.float16, None),
        (8, 1, 128, 7, torch.float16, None),
        (4, 4, 32, 1, torch.float32, None),
        # Small tiles: many full and diagonal key blocks per query block.
        (6, 2, 64, 7, torch.float16, PrefillConfig(32, 32, 4, 1)),
        # More keys than query rows per step.
        (2, 1, 128, 16, torch.float16, PrefillConfig(64, 128, 4, 1)),
        # Pages that hold whole key blocks: tensor-descriptor (TMA) loads.
        (4, 2, 64, 64, torch.float16, None),
        (6, 2, 64, 32, torch.float16, PrefillConfig(32, 32, 4, 1)),
        (4, 4, 32, 128, torch.float32, None),
    ],
)
def test_prefill_matches_dense_reference(heads, kv_heads, dim, page_size, dtype, config) -> None:
    for out, ref in run_prefill(heads, kv_heads, dim, page_size, dtype, PREFILL_SPANS, config):
        assert_close(out, ref, tolerance(dtype))


# ---------------------------------------------------------------------------- decode


def run_decode(heads, kv_heads, dim, page_size, dtype, contexts, splits, seed=0, device=CPU):
    """Decode rows sit among other rows of the step (every other row); returns [(out, ref)]."""
    gen = torch.Generator().manual_seed(seed)
    filled = fill_cache(contexts, kv_heads, dim, page_size, dtype, gen, device)
    q = (2 * torch.randn(2 * len(contexts) + 1, heads, dim, generator=gen)).to(dtype).to(device)
    rows = [2 * i + 1 for i in range(len(contexts))]
    plan = plan_decode(filled.tables, rows, contexts, page_size, heads, dim, splits, device)
    plan.acc.fill_(float("nan"))  # every split, empty ones included, must write its partial
    plan.ml.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    paged_decode(q, filled.k_cache, filled.v_cache, plan, out)
    assert out[0::2].isnan().all(), "rows that are not decode rows were written"
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    return [
        (out[r : r + 1], dense_reference(q[r : r + 1], k, v, k.shape[0] - 1, ref_dtype))
        for r, k, v in zip(rows, filled.keys, filled.values, strict=True)
    ]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page_size", "dtype", "splits"),
    [
        (8, 2, 128, 16, torch.float16, 1),
        (8, 2, 128, 16, torch.float16, 8),  # several splits, empty ones for short contexts
        (4, 4, 64, 1, torch.float16, 4),
        (8, 1, 64, 7, torch.float32, 16),
        (3, 1, 32, 7, torch.float16, MAX_SPLITS),
    ],
)
def test_decode_matches_dense_reference(heads, kv_heads, dim, page_size, dtype, splits) -> None:
    for out, ref in run_decode(heads, kv_heads, dim, page_size, dtype, DECODE_CONTEXTS, splits):
        assert_close(out, ref, tolerance(dtype))


def test_decode_of_an_empty_context_is_zero() -> None:
    """kv_len 0 (a padded CUDA-graph row) must give zeros, not NaN from 0/0."""
    gen = torch.Generator().manual_seed(3)
    filled = fill_cache([5], 1, 32, 16, torch.float16, gen)
    q = torch.randn(2, 2, 32, generator=gen).half()
    plan = plan_decode([filled.tables[0], ()], [0, 1], [5, 0], 16, 2, 32, 4, CPU)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, filled.k_cache, filled.v_cache, plan, out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[:1], dense_reference(q[:1], filled.keys[0], filled.values[0], 4), 4e-3)


def test_split_count_depends_on_static_quantities_only() -> None:
    for batch in (1, 3, 8, 64, 512):
        for max_context in (16, 1000, 131072):
            splits = num_decode_splits(batch, 8, max_context, CPU)
            assert 1 <= splits <= MAX_SPLITS and splits & (splits - 1) == 0
            assert splits <= -(-max_context // 256)  # no split below 256 keys of the pool
    assert num_decode_splits(1, 1, 131072, CPU) > num_decode_splits(64, 8, 131072, CPU)
    with pytest.raises(ValueError, match="power of two"):
        plan_decode([(1,)], [0], [3], 16, 2, 32, 3, CPU)


def test_split_count_is_unchanged_by_the_shared_rule() -> None:
    """num_decode_splits now calls paged_common.decode_split_count (shared with the 8-bit
    decode); it must give what its own formula gave before, on CPU and for 132 SMs."""

    def before(batch: int, kv_heads: int, max_context: int, sms: int) -> int:
        wanted = -(-4 * sms // max(batch * kv_heads, 1))
        splits = max(1, min(wanted, -(-max_context // 256), 64))
        return 1 << (splits.bit_length() - 1)

    for batch in (0, 1, 2, 3, 5, 16, 33, 64, 200):
        for kv_heads in (1, 8):
            for max_context in (1, 300, 8192, 131072):
                assert num_decode_splits(batch, kv_heads, max_context, CPU) == before(
                    batch, kv_heads, max_context, 8
                )
                assert decode_split_count(batch * kv_heads, max_context, 132, 4, 256, 64) == (
                    before(batch, kv_heads, max_context, 132)
                )


# ---------------------------------------------------------------------------- backend


def _config(heads: int, kv_heads: int, dim: int, layers: int = 1) -> AttentionShape:
    return AttentionShape(
        num_layers=layers, num_q_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
        max_position_embeddings=8192, vocab_size=64,
    )  # fmt: skip


def _reasons(dim=64, kv="auto", dtype=torch.float16, device="cpu") -> str:
    options = BackendOptions(kv, dtype, torch.device(device))
    return "; ".join(TritonBackend.unsupported_reasons(_config(4, 2, dim), options))


def test_unsupported_configurations_name_the_valid_choices(monkeypatch) -> None:
    assert _reasons() == "" and _reasons(dtype=torch.float32) == ""  # interpreter, CPU
    assert _reasons(dtype=torch.bfloat16, device="cuda") == ""
    assert "float16 or bfloat16" in _reasons(dtype=torch.float32, device="cuda")
    assert "KV cache dtype float32" in _reasons(kv="fp32", dtype=torch.float16, device="cuda")
    assert "raw bits" in _reasons(dtype=torch.bfloat16)
    assert "32, 64, 128" in _reasons(dim=96)
    assert "choose one of: auto" in _reasons(kv="int8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _reasons()
    with pytest.raises(ValueError, match="need CUDA"):
        TritonBackend(_config(4, 2, 64), BackendOptions("auto", torch.float16, CPU))


def run_backend_step(backend, cache, spans, tables, page_size, kv_heads, gen, device):
    """One step of layer 0 over (prefix, new) spans whose prefixes are already cached."""
    cfg = backend.shape
    slices = [SequenceSlice(t, p, n) for t, (p, n) in zip(tables, spans, strict=True)]
    ids = [[1] * n for _, n in spans]
    batch = build_forward_batch(slices, ids, [], page_size, device)
    meta = backend.build_metadata(batch)
    tokens = batch.num_tokens
    dtype = backend.kv_dtype
    q = torch.randn(tokens, cfg.num_q_heads, cfg.head_dim, generator=gen).to(dtype).to(device)
    k = torch.randn(tokens, kv_heads, cfg.head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(tokens, kv_heads, cfg.head_dim, generator=gen).to(dtype).to(device)
    return meta, q, k, v, backend.forward(0, q, k, v, cache, meta)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        (CPU, torch.float16),
        pytest.param(torch.device("cuda"), torch.float16, marks=pytest.mark.gpu),
        pytest.param(torch.device("cuda"), torch.bfloat16, marks=pytest.mark.gpu),
    ],
    ids=str,
)
def test_backend_mixed_step_matches_dense_reference(device, dtype) -> None:
    """A 16-bit cache: a step writing cached prefixes, then one of decodes and chunks."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, page = 8, 2, 64, 16
    backend = TritonBackend(_config(heads, kv_heads, dim), BackendOptions("auto", dtype, device))
    spans = [(0, 1), (0, 57), (100, 1), (40, 30), (7, 1)]
    counts = [-(-(p + n) // page) for p, n in spans]
    cache = backend.allocate(sum(counts) + 1, page)
    cache.k[:, page:], cache.v[:, page:] = float("nan"), float("nan")
    order = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    tables = [tuple(order[sum(counts[:i]) : sum(counts[: i + 1])]) for i in range(len(spans))]
    prefixes = [(t, (0, p)) for t, (p, _) in zip(tables, spans, strict=True) if p]
    first = run_backend_step(backend, cache, [s for _, s in prefixes], [t for t, _ in prefixes],
                             page, kv_heads, gen, device)  # fmt: skip
    meta, q, k, v, out = run_backend_step(backend, cache, spans, tables, page, kv_heads, gen,
                                          device)  # fmt: skip
    assert first[0].decode is None and meta.prefill is not None and meta.decode is not None
    for step_meta, _, step_k, step_v, _ in (first, (meta, q, k, v, out)):
        assert torch.equal(cache.k[0][step_meta.slot_mapping], step_k)
        assert torch.equal(cache.v[0][step_meta.slot_mapping], step_v)
    start = 0
    for table, (p, n) in zip(tables, spans, strict=True):
        kv = torch.tensor([table[i // page] * page + i % page for i in range(p + n)])
        ref = dense_reference(q[start : start + n], cache.k[0][kv], cache.v[0][kv], p)
        assert_close(out[start : start + n], ref, tolerance(dtype))
        start += n


# ---------------------------------------------------------------------------- GPU

CUDA = torch.device("cuda")
# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim 128; SmolLM2: 9, 3, 64.
GPU_SHAPES = [(32, 8, 128, 16), (32, 8, 128, 1), (9, 3, 64, 16), (32, 8, 128, 64), (9, 3, 64, 128)]
GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"), GPU_SHAPES)
def test_prefill_on_gpu(heads, kv_heads, dim, page_size, dtype) -> None:
    spans = [(0, 8192), (0, 7), (4000, 1000), (0, 333), (7000, 1192), (8190, 1)]
    results = run_prefill(heads, kv_heads, dim, page_size, dtype, spans, device=CUDA)
    for out, ref in results:
        assert_close(out, ref, tolerance(dtype), 0.9999 if dtype == torch.float16 else 0.999)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("splits", [None, 1, MAX_SPLITS])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"), GPU_SHAPES)
def test_decode_on_gpu(heads, kv_heads, dim, page_size, splits, dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    contexts = [1, 7, 8192, 4096, 333, *torch.randint(1, 8193, (11,), generator=gen).tolist()]
    splits = splits or num_decode_splits(len(contexts), kv_heads, 8192, CUDA)
    results = run_decode(heads, kv_heads, dim, page_size, dtype, contexts, splits, device=CUDA)
    for out, ref in results:
        assert_close(out, ref, tolerance(dtype), 0.9999 if dtype == torch.float16 else 0.999)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_store_on_gpu(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(4099, 8, 128, generator=gen).to(dtype).to(CUDA)
    v = torch.randn(4099, 8, 128, generator=gen).to(dtype).to(CUDA)
    slot_mapping = torch.randperm(8192, generator=gen)[:4099].to(CUDA)
    k_cache = torch.full((8192, 8, 128), float("nan"), dtype=dtype, device=CUDA)
    v_cache = k_cache.clone()
    store_kv(k, v, slot_mapping, k_cache, v_cache)
    assert torch.equal(k_cache[slot_mapping], k) and torch.equal(v_cache[slot_mapping], v)
    assert k_cache.isnan().any(dim=(1, 2)).sum().item() == 8192 - 4099


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph() -> None:
    """Capture a decode forward pass (store + split + merge) and replay it with the next
    step's metadata copied into the captured buffers: a host sync or an allocation that
    depends on the data would fail the capture or give a different result."""
    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, page = 32, 8, 128, 16
    backend = TritonBackend(_config(heads, kv_heads, dim), BackendOptions("auto", torch.float16,
                                                                           CUDA))  # fmt: skip
    cache = backend.allocate(2048, page)
    lens = [300, 1000, 5, 2000]
    order = (torch.randperm(2047, generator=gen) + 1).tolist()
    tables = [tuple(order[i * 200 : i * 200 + 200]) for i in range(len(lens))]
    # Fill the prefixes through the backend itself, then decode one token per sequence.
    run_backend_step(backend, cache, [(0, n) for n in lens], tables, page, kv_heads, gen, CUDA)
    meta, q, k, v, _ = run_backend_step(
        backend, cache, [(n, 1) for n in lens], tables, page, kv_heads, gen, CUDA
    )
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = backend.forward(0, q, k, v, cache, meta)
    # The next step: one more token each, same batch size and table width.
    slices = [SequenceSlice(t, n + 1, 1) for t, n in zip(tables, lens, strict=True)]
    batch = build_forward_batch(slices, [[1]] * len(lens), [], page, CUDA)
    nxt = backend.build_metadata(batch)
    for name in ("page_table", "q_row", "kv_len"):
        getattr(meta.decode, name).copy_(getattr(nxt.decode, name))
    meta.slot_mapping.copy_(nxt.slot_mapping)
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    graph.replay()
    eager = backend.forward(0, q, k, v, cache, nxt)
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
