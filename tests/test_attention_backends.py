"""One parity test for every attention backend against a dense fp64 reference.

Covers grouped-query attention, a mixed batch of prefill chunks and decodes, page tables
whose pages are shuffled, lengths that are not multiples of any block size (1, 7, 200, 333),
a chunk following a cached prefix (bottom-right causal mask) and several layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from tiny_models import tiny_llama_config

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.registry import backend_names, get_backend_class
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.rotation import hadamard_rotate
from sageserve.models.config import ModelConfig


@dataclass(frozen=True)
class Variant:
    """A backend with its options and how close each sequence's output must be."""

    name: str
    sage: SageOptions | None = None
    min_cosine: float = 1.0
    max_rel_l1: float = 0.0
    max_abs_rel: float = 2e-5  # for exact layers: max |error| / max |reference|
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def exact_layer(self, layer: int) -> bool:
        exact_math = self.sage is None or layer in self.sage.skip_layers
        return exact_math and self.dtype == torch.float32

    def __str__(self) -> str:
        name = self.name if self.sage is None else f"{self.name}-{self.sage}"
        return name if self.device == "cpu" else f"{name}-{self.device}-{self.dtype}"


_TC_CPU = SageOptions(impl="triton", rotation_kernel="tensor_core")  # fp16 only, interpreted
# The FP8 P·V mode is looser: e4m3 V alone costs about 2% relative L1 (sage_reference.py).
VARIANTS = [
    Variant("torch"),
    Variant("sage_attn", SageOptions(), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(smooth_k=False), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(balance_qk=True), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(rotate_qk=False), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(rotate_qk=False, balance_qk=True), 0.999, 0.03),
    Variant("sage_attn", SageOptions(pv="fp8"), min_cosine=0.998, max_rel_l1=0.05),
    Variant("sage_attn", SageOptions(skip_layers=(1,)), min_cosine=0.999, max_rel_l1=0.03),
    # The Triton kernels (through the interpreter on CPU).
    Variant("sage_attn", SageOptions(impl="triton"), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(impl="triton", rotate_qk=False), 0.999, 0.03),
    # Layer 1 exact through the triton backend's kernels, beside the 8-bit ones.
    Variant("sage_attn", SageOptions(impl="triton", skip_layers=(1,)), 0.999, 0.03),
    Variant("sage_attn", _TC_CPU, 0.999, 0.03, dtype=torch.float16),
    # Prefill queries rotated and quantized by one pass before the prefill kernel.
    Variant("sage_attn", SageOptions(impl="triton", rotation_kernel="prepass"), 0.999, 0.03),
    # Q in two INT8 levels: the reference, and the Triton kernels (prefill and decode).
    Variant("sage_attn", SageOptions(q_levels=2), min_cosine=0.999, max_rel_l1=0.03),
    Variant("sage_attn", SageOptions(impl="triton", q_levels=2), 0.999, 0.03),
    # The 16-bit Triton kernels, in fp32 through the interpreter on CPU: exact up to rounding.
    Variant("triton"),
]

# The same step on a GPU, in the 16-bit dtypes the kernels serve. Inputs are rounded to that
# dtype before the fp64 reference sees them, so the bounds measure the kernels alone: 16-bit
# P and output rounding (about 0.3% relative L1) for the exact-math backends.
_BF16, _FP16 = torch.bfloat16, torch.float16
_TENSOR_CORE = SageOptions(rotation_kernel="tensor_core")
_PREPASS = SageOptions(rotation_kernel="prepass")
_GLUON = SageOptions(impl="gluon")
_GLUON_FP8 = SageOptions(impl="gluon", pv="fp8")
_GLUON_NOROT = SageOptions(impl="gluon", rotate_qk=False)
_GLUON_EXACT_1 = SageOptions(impl="gluon", skip_layers=(1,))
GPU_VARIANTS = [
    Variant("torch", min_cosine=0.9999, max_rel_l1=0.01, dtype=_BF16, device="cuda"),
    Variant("triton", min_cosine=0.9999, max_rel_l1=0.01, dtype=_BF16, device="cuda"),
    Variant("triton", min_cosine=0.9999, max_rel_l1=0.01, dtype=_FP16, device="cuda"),
    Variant("sage_attn", SageOptions(), 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", SageOptions(), 0.999, 0.03, dtype=_FP16, device="cuda"),
    Variant("sage_attn", SageOptions(pv="fp8"), 0.998, 0.05, dtype=_BF16, device="cuda"),
    Variant("sage_attn", SageOptions(smooth_k=False), 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", SageOptions(rotate_qk=False), 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", _TENSOR_CORE, 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", _TENSOR_CORE, 0.999, 0.03, dtype=_FP16, device="cuda"),
    Variant("sage_attn", _PREPASS, 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", SageOptions(skip_layers=(1,)), 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", SageOptions(q_levels=2), 0.999, 0.03, dtype=_BF16, device="cuda"),
    # Prefill chunks through the warp-specialized Hopper kernel (sm_90, pages of 64 keys).
    Variant("sage_attn", _GLUON, 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", _GLUON, 0.999, 0.03, dtype=_FP16, device="cuda"),
    Variant("sage_attn", _GLUON_FP8, 0.998, 0.05, dtype=_BF16, device="cuda"),
    Variant("sage_attn", _GLUON_NOROT, 0.999, 0.03, dtype=_BF16, device="cuda"),
    Variant("sage_attn", _GLUON_EXACT_1, 0.999, 0.03, dtype=_BF16, device="cuda"),
]

# (num_q_heads, num_kv_heads, head_dim, page_size): GQA, MHA and MQA; pages of one key, of an
# odd size, and (GPU) of whole key blocks, which the prefill kernels read by TMA.
SHAPES = [(6, 2, 32, 16), (4, 4, 64, 1), (8, 1, 64, 7), (4, 2, 128, 16)]
GPU_SHAPES = [(4, 4, 64, 1), (8, 1, 64, 7), (4, 2, 128, 16), (8, 2, 64, 64), (8, 2, 128, 128),
              (8, 2, 128, 64)]  # fmt: skip

# (prefix_len, query_len) per sequence of the mixed step.
MIXED_STEP = [(0, 1), (0, 7), (0, 200), (0, 333), (120, 80), (332, 1), (7, 1), (16, 17)]


def _model_config(num_q_heads: int, num_kv_heads: int, head_dim: int) -> ModelConfig:
    return tiny_llama_config(num_q_heads, num_kv_heads, head_dim, vocab_size=32,
                             intermediate_size=64, max_position_embeddings=4096)  # fmt: skip


@dataclass
class Seq:
    page_table: tuple[int, ...]
    k: torch.Tensor  # [num_layers, kv_len, Hkv, D], every key this sequence will ever have
    v: torch.Tensor


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Dense attention in fp64. q: [n, Hq, D]; k, v: [kv_len, Hkv, D] -> [n, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(prefix_len, prefix_len + q.shape[0])
    allowed = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# Rows a piecewise step pads its tokens with: their K/V (random here) must store nothing
# that a sequence reads.
PIECE_PADDING = 5


def _run_step(backend, kv_cache, seqs, spans, page_size, num_q_heads, gen):
    """Run one step of every layer; returns [(queries, outputs on the CPU)] per layer.

    Layer 0 goes through `forward`; layer 1 too when the backend has no piece store, else
    as a piecewise graph runs it: `store` over the rows padded by PIECE_PADDING, then
    `attend_stored`. Both write into a given output poisoned with NaN."""
    options = backend.options
    slices = [SequenceSlice(s.page_table, p, n) for s, (p, n) in zip(seqs, spans, strict=True)]
    ids = [[0] * n for _, n in spans]
    batch = build_forward_batch(slices, ids, [], page_size, options.device)
    meta = backend.build_metadata(batch)
    size = batch.num_tokens + PIECE_PADDING
    store = backend.piece_store(kv_cache, size)
    if store is not None:
        backend.write_piece_store(store, batch, size)
    results = []
    for layer in range(2):
        k = torch.cat([s.k[layer, p : p + n] for s, (p, n) in zip(seqs, spans, strict=True)])
        v = torch.cat([s.v[layer, p : p + n] for s, (p, n) in zip(seqs, spans, strict=True)])
        head_dim = k.shape[-1]
        q = torch.randn(k.shape[0], num_q_heads, head_dim, generator=gen).to(options.model_dtype)
        q, k, v = (t.to(options.device, options.model_dtype) for t in (q, k, v))
        poisoned = torch.full_like(q, float("nan"))
        if layer == 1 and store is not None:
            padded_k, padded_v = (_pad_rows(t, PIECE_PADDING, gen) for t in (k, v))
            backend.store(layer, padded_k, padded_v, kv_cache, store, size)
            out = backend.attend_stored(layer, q, kv_cache, meta, poisoned)
        else:
            out = backend.forward(layer, q, k, v, kv_cache, meta, out=poisoned)
        assert out is poisoned
        results.append((q.float().cpu(), out.cpu()))
    return results


def _pad_rows(x: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """x [T, H, D] with `rows` random rows after it."""
    extra = torch.randn(rows, *x.shape[1:], generator=gen).to(x.device, x.dtype)
    return torch.cat([x, extra])


def _check_output(variant: Variant, layer: int, out: torch.Tensor, ref: torch.Tensor) -> None:
    out, where = out.double(), (str(variant), layer, tuple(ref.shape))
    if variant.exact_layer(layer):
        err = (out - ref).abs().max().item()
        assert err <= variant.max_abs_rel * max(1.0, ref.abs().max().item()), (where, err)
        return
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    rel_l1 = ((out - ref).abs().sum() / ref.abs().sum()).item()
    assert cosine >= variant.min_cosine and rel_l1 <= variant.max_rel_l1, (where, cosine, rel_l1)


def _check_step(results, seqs, spans, variant: Variant):
    for layer, (q, out) in enumerate(results):
        assert torch.isfinite(out).all(), "output reads unwritten (poisoned) cache slots"
        start = 0
        for seq, (prefix, n) in zip(seqs, spans, strict=True):
            ref = _reference(
                q[start : start + n], seq.k[layer, : prefix + n], seq.v[layer, : prefix + n], prefix
            )
            _check_output(variant, layer, out[start : start + n], ref)
            start += n


def _poison(kv_cache, page_size: int) -> None:
    """Every page but the null page (page 0) holds garbage until written.

    A read of an unwritten slot that reaches the output shows up as NaN (float tensors) or
    as a large error (integer and FP8 codes).
    """
    caches = [kv_cache] if not hasattr(kv_cache, "exact") else [kv_cache, kv_cache.exact]
    for cache in filter(None, caches):
        for name, tensor in vars(cache).items():
            if not isinstance(tensor, torch.Tensor):
                continue
            pages = (
                tensor[:, page_size:] if name in ("k", "v") and tensor.dim() == 4 else tensor[:, 1:]
            )
            if tensor.dtype == torch.int8:
                pages.copy_(torch.randint_like(pages, -127, 128))
            elif tensor.dtype.itemsize == 1:
                # FP8 codes: garbage but finite, as every code the store writes (the pool
                # starts zeroed); masked keys' P is 0, and 0 x NaN would not be.
                garbage = torch.empty(pages.shape, device=pages.device).uniform_(-448, 448)
                pages.copy_(garbage.to(tensor.dtype))
            else:
                pages.fill_(float("nan"))


def _make_backend(variant: Variant, config: ModelConfig):
    flags = variant.sage
    options = BackendOptions("auto", variant.dtype, torch.device(variant.device), flags)
    return get_backend_class(variant.name)(config.attention_shape(), options)


def test_every_registered_backend_is_covered() -> None:
    assert {v.name for v in VARIANTS} == set(backend_names())


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim", "page_size"), SHAPES)
def test_backend_matches_dense_reference(
    variant: Variant, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int
) -> None:
    uses_kernels = variant.name == "triton" or (variant.sage and variant.sage.impl == "triton")
    if uses_kernels and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("fp32 CPU tensors need Triton's interpreter; test_..._on_gpu runs these")
    _check_backend(variant, num_q_heads, num_kv_heads, head_dim, page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=str)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim", "page_size"), GPU_SHAPES)
def test_backend_matches_dense_reference_on_gpu(
    variant: Variant, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int
) -> None:
    if variant.sage is not None and variant.sage.impl == "gluon":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Gluon prefill runs on sm_90 only")
        if page_size != 64:
            pytest.skip(
                "the Gluon prefill reads whole pages of 64 keys (refusal: test_gluon_prefill)"
            )
    _check_backend(variant, num_q_heads, num_kv_heads, head_dim, page_size)


def _check_backend(
    variant: Variant, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int
) -> None:
    """Cached prefixes written in one step, then the mixed step over them, against fp64."""
    gen = torch.Generator().manual_seed(1234 + page_size)
    config = _model_config(num_q_heads, num_kv_heads, head_dim)
    backend = _make_backend(variant, config)
    pages_per_seq = [-(-(p + n) // page_size) for p, n in MIXED_STEP]
    num_pages = sum(pages_per_seq) + 1
    kv_cache = backend.allocate(num_pages, page_size)
    _poison(kv_cache, page_size)
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    seqs = []
    # Real keys carry a per-(layer, head, channel) bias shared by every sequence; so do these.
    bias = 3 * torch.randn(2, 1, num_kv_heads, head_dim, generator=gen)
    for count, (p, n) in zip(pages_per_seq, MIXED_STEP, strict=True):
        table, order = tuple(order[:count]), order[count:]
        shape = (2, p + n, num_kv_heads, head_dim)
        k, v = torch.randn(shape, generator=gen) + bias, torch.randn(shape, generator=gen)
        seqs.append(Seq(table, *(t.to(variant.dtype).float() for t in (k, v))))
    if variant.sage is not None:
        backend.set_calibration(*_calibration(seqs, variant.sage, num_q_heads, gen))
    # Step 1 writes the cached prefixes; step 2 is the mixed batch over them.
    with_prefix = [(s, (0, p)) for s, (p, _) in zip(seqs, MIXED_STEP, strict=True) if p > 0]
    prefix_seqs, prefix_spans = zip(*with_prefix, strict=True)
    results = _run_step(backend, kv_cache, prefix_seqs, prefix_spans, page_size, num_q_heads, gen)
    _check_step(results, prefix_seqs, prefix_spans, variant)
    results = _run_step(backend, kv_cache, seqs, MIXED_STEP, page_size, num_q_heads, gen)
    _check_step(results, seqs, MIXED_STEP, variant)


def _calibration(seqs: list[Seq], sage: SageOptions, num_q_heads: int, gen: torch.Generator):
    """(k_mean, channel_scale), each [num_layers, Hkv, D] or None, as calibration would give.

    The mean is that of all keys plus noise (calibration sees other tokens); the balance
    compares the keys' channel ranges with those of fresh queries. Both are of the rotated
    keys and queries when the rotation is on, as calibration takes them.
    """
    keys = torch.cat([s.k for s in seqs], dim=1)  # [L, T, Hkv, D]
    head_dim = keys.shape[-1]
    if sage.rotate_qk:
        keys = hadamard_rotate(keys)
    noise = 0.1 * (head_dim**0.5 if sage.rotate_qk else 1.0)
    k_mean = keys.mean(dim=1) + noise * torch.randn(keys.mean(dim=1).shape, generator=gen)
    k_absmax = (keys - k_mean[:, None] if sage.smooth_k else keys).abs().amax(dim=1)
    # max |N(0, 1)| over a few hundred draws; a rotated query's entries are N(0, D)
    q_absmax = 4.0 * (head_dim**0.5 if sage.rotate_qk else 1.0) * torch.ones_like(k_absmax)
    balance = (k_absmax / q_absmax).sqrt()
    return (k_mean if sage.smooth_k else None), (balance if sage.balance_qk else None)


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"valid backends: .*torch"):
        get_backend_class("flash_magic")
