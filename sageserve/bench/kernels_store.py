"""KV store of `sageserve bench kernels`: one layer's new K/V written into the paged cache,
the kernel alone, against the bytes it must move.

Per (tokens, KV heads): a step's new keys and values, k [T, Hkv, D] contiguous (as rotary
leaves them) and v a strided view of a fused QKV output (4 query heads per KV head, as the
model's projection leaves it), random normal (K plus a per-channel bias), head_dim 128. Each
variant's store call is the one its backend's `forward` makes (8-bit: the fused
quantize-and-store kernel, with a key mean and channel balance calibrated on 512 other
tokens; 16-bit: the paged store), at the slots `build_metadata` gives:

- T <= DECODE_MAX_TOKENS, a decode step: T sequences of one new token each, every one at a
  random offset of its own page. Timed as CUDA-graph replays (how decode steps run), with
  K/V in L2 as the QKV projection has just written them.
- larger T, a prefill step: sequences of up to PREFILL_SEQ tokens from a page boundary,
  pages shuffled. Timed eagerly (launch included, as prefill steps run), cycling through
  copies of the step ("sets", >= L2_FACTOR x the L2 in bytes moved) so that K/V are read
  from and the cache written to HBM.

The bound of each figure is the device's copy bandwidth (the same run's): `bound_us` is the
store's bytes (K/V read, codes and scales or 16-bit values written, slot indices and the
calibration vectors read) at that bandwidth. Checks: the cache, poisoned, must afterwards
equal the poison plus the reference's values at the step's slots, bit for bit (8-bit:
`reference.quantize_kv`; 16-bit: K/V cast to the cache dtype), and the cache written by
the backend's own `forward` for the same step must equal it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.bench.kernels_common import (
    MAX_POSITIONS,
    OUR_VARIANTS,
    MeasuredShape,
    calibrate,
    keys_with_bias,
    make_backend,
    model_config,
    shape_seed,
)
from sageserve.bench.kernels_prefill import error_fields
from sageserve.bench.kernels_timing import Timed, Timer, eager_and_graph

HEAD_DIM = 128
GROUP = 4  # query heads per KV head in the fused QKV output (Llama-3.1-8B)
DECODE_MAX_TOKENS = 256  # up to this many tokens a step is a decode step (one per sequence)
PREFILL_SEQ = 1024  # tokens per sequence of a prefill step
CALIBRATION_TOKENS = 512
L2_FACTOR = 4
MAX_SETS = 64
INDEX_BYTES = 8  # slot indices are int64
SCALE_BYTES = 2  # fp16 scales of the 8-bit cache
POISON_CODE = 77  # what 1-byte cache entries hold before a checked call (floats: NaN)
INCLUDED = {
    "sage": "sage_store.store_kv exactly as sage_attn's forward calls it (one launch: K "
    "rotated by the Hadamard matrix in registers (not in the _norot variants; a tensor-core "
    "product in the _tcrot ones, else the butterfly), minus "
    "the calibrated mean, INT8 per token and head; V INT8 (FP16 P·V) or FP8 e4m3 (FP8 P·V) "
    "per token and head; fp16 scales), at the store pages and offsets of build_metadata",
    "triton16": "paged_store.store_kv exactly as the triton backend's forward calls it (K "
    "and V cast to the cache dtype at the slot mapping of build_metadata)",
}


@dataclass(frozen=True)
class StoreShape(MeasuredShape):
    """One store measurement's shape."""

    tokens: int
    kv_heads: int

    @property
    def layout(self) -> str:
        return "decode" if self.tokens <= DECODE_MAX_TOKENS else "prefill"

    @property
    def q_heads(self) -> int:
        return GROUP * self.kv_heads

    def cache_bytes_per_token(self, variant: str) -> int:
        """K and V bytes of one token in the cache, all KV heads (8-bit: codes + scales)."""
        if OUR_VARIANTS[variant][0] == "sage_attn":
            return 2 * self.kv_heads * (HEAD_DIM + SCALE_BYTES)
        return 2 * self.kv_heads * HEAD_DIM * self.dtype.itemsize

    def bytes_moved(self, variant: str) -> int:
        """Bytes the store must read and write: K and V in, the cache entries out, the slot
        indices (8-bit: pages and offsets) and the mean and balance [Hkv, D] fp32 read."""
        kv_in = 2 * self.tokens * self.kv_heads * HEAD_DIM * self.dtype.itemsize
        cache_out = self.tokens * self.cache_bytes_per_token(variant)
        if OUR_VARIANTS[variant][0] == "sage_attn":
            vectors = 2 * self.kv_heads * HEAD_DIM * 4
            return kv_in + cache_out + 2 * self.tokens * INDEX_BYTES + vectors
        return kv_in + cache_out + self.tokens * INDEX_BYTES

    def describe(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "kv_heads": self.kv_heads, "q_heads": self.q_heads,
            "head_dim": HEAD_DIM, "layout": self.layout, "page_size": self.page_size,
            "dtype": str(self.dtype).removeprefix("torch."), "seed": self.seed,
        }  # fmt: skip


@dataclass
class StepInputs:
    """One copy ("set") of the step: its new K/V and where they go."""

    q: torch.Tensor  # [T, Hq, D] (for the backend's forward in the check)
    k: torch.Tensor  # [T, Hkv, D] contiguous
    v: torch.Tensor  # [T, Hkv, D], a view of a fused QKV output
    seqs: list[SequenceSlice]


@dataclass
class StoreVariant:
    """One backend's pool, the per-set metadata and the store calls of one shape."""

    name: str
    backend: Any
    cache: Any
    metas: list[Any] = field(default_factory=list)
    calls: list[Callable[[], None]] = field(default_factory=list)

    @property
    def eight_bit(self) -> bool:
        return OUR_VARIANTS[self.name][0] == "sage_attn"

    def layer_tensors(self) -> list[torch.Tensor]:
        """Layer 0 of the cache, every tensor the store writes into."""
        c = self.cache
        if self.eight_bit:
            return [c.k[0], c.k_scale[0], c.v[0], c.v_scale[0]]
        return [c.k[0], c.v[0]]


def make_shape(tokens: int, kv_heads: int, settings: dict[str, Any]) -> StoreShape:
    """settings: page_size, dtype, seed."""
    seed = shape_seed(settings["seed"], 3, tokens, kv_heads)
    return StoreShape(
        tokens, kv_heads, page_size=settings["page_size"], dtype=settings["dtype"], seed=seed
    )


def rotation_sets(shape: StoreShape, variants: list[str], device: torch.device) -> int:
    """Copies of a prefill step to cycle through so that every call moves cold bytes."""
    if device.type != "cuda" or shape.layout == "decode":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    smallest = min(shape.bytes_moved(v) for v in variants)
    return max(1, min(MAX_SETS, math.ceil(L2_FACTOR * l2 / smallest)))


def memory_needed(shape: StoreShape, variants: list[str], sets: int) -> int:
    """Bytes of the inputs (the fused QKV output in fp32 while it is drawn, then in the
    dtype, and K) and of every variant's pool three times over (the pool, the checked copy,
    the expected copy)."""
    values = shape.tokens * shape.kv_heads * HEAD_DIM
    inputs = sets * values * (GROUP + 2) * (4 + shape.dtype.itemsize) + values * 4
    if shape.layout == "decode":
        pages = sets * shape.tokens
    else:
        pages = sets * (math.ceil(shape.tokens / shape.page_size) + shape.tokens // PREFILL_SEQ + 1)
    pool_tokens = (pages + 2) * shape.page_size
    return inputs + sum(3 * pool_tokens * shape.cache_bytes_per_token(v) for v in variants)


# ---------------------------------------------------------------------------- setup


def _sequences(shape: StoreShape, first_page: int, gen: torch.Generator):
    """The step's sequences over pages first_page.. (shuffled); (sequences, pages used)."""
    page = shape.page_size
    if shape.layout == "decode":
        pages = (torch.randperm(shape.tokens, generator=gen) + first_page).tolist()
        offsets = torch.randint(0, page, (shape.tokens,), generator=gen).tolist()
        return [SequenceSlice((p,), o, 1) for p, o in zip(pages, offsets, strict=True)], len(pages)
    full, rest = divmod(shape.tokens, PREFILL_SEQ)
    lengths = [PREFILL_SEQ] * full + ([rest] if rest else [])
    counts = [math.ceil(n / page) for n in lengths]
    order = (torch.randperm(sum(counts), generator=gen) + first_page).tolist()
    starts = itertools.accumulate(counts, initial=0)
    tables = [tuple(order[s : s + c]) for s, c in zip(starts, counts, strict=False)]
    return [SequenceSlice(t, 0, n) for t, n in zip(tables, lengths, strict=True)], len(order)


def _steps(shape: StoreShape, bias: torch.Tensor, sets: int, device):
    """`sets` copies of the step, each with fresh K/V (a seed each) and its own pages;
    (steps, pages of the pool including the null page 0)."""
    steps, first_page = [], 1  # page 0 is the null page
    t, hq, hkv = shape.tokens, shape.q_heads, shape.kv_heads
    for s in range(sets):
        gen = torch.Generator(device=device).manual_seed(shape_seed(shape.seed, s))
        qkv = torch.randn((t, hq + 2 * hkv, HEAD_DIM), generator=gen, device=device)
        k = keys_with_bias((t, hkv, HEAD_DIM), bias, gen, device).to(shape.dtype)
        qkv = qkv.to(shape.dtype)
        seqs, used = _sequences(shape, first_page, torch.Generator().manual_seed(shape.seed + s))
        # q as rotary leaves it (a new tensor), as k; v stays a view of the projection.
        steps.append(StepInputs(qkv[:, :hq].contiguous(), k, qkv[:, hq + hkv :], seqs))
        first_page += used
    return steps, first_page


@dataclass
class StoreInputs:
    """Everything a shape's variants share: the steps, the pool size, calibration tokens."""

    steps: list[StepInputs]
    num_pages: int  # the pool's pages, the null page 0 included
    calib_q: torch.Tensor  # [CALIBRATION_TOKENS, Hq, D]
    calib_k: torch.Tensor  # [CALIBRATION_TOKENS, Hkv, D]


def make_inputs(shape: StoreShape, sets: int, device: torch.device) -> StoreInputs:
    """The layer's key bias [Hkv, D], calibration tokens drawn apart from the stored ones
    (so that the key mean is not the stored keys' own), and `sets` copies of the step."""
    gen = torch.Generator(device=device).manual_seed(shape.seed)
    bias = 3 * torch.randn((shape.kv_heads, HEAD_DIM), generator=gen, device=device)
    calib_q = torch.randn((CALIBRATION_TOKENS, shape.q_heads, HEAD_DIM), generator=gen,
                          device=device).to(shape.dtype)  # fmt: skip
    calib_k = keys_with_bias((CALIBRATION_TOKENS, shape.kv_heads, HEAD_DIM), bias, gen, device)
    steps, num_pages = _steps(shape, bias, sets, device)
    return StoreInputs(steps, num_pages, calib_q, calib_k.to(shape.dtype))


def build_variant(
    name: str, shape: StoreShape, inputs: StoreInputs, device: torch.device
) -> StoreVariant:
    """The variant's backend (calibrated), pool and per-set store calls."""
    backend = make_backend(name, model_config(shape.q_heads, shape.kv_heads, HEAD_DIM),
                           shape.dtype, device)  # fmt: skip
    calibrate(backend, inputs.calib_q, inputs.calib_k)
    variant = StoreVariant(name, backend, backend.allocate(inputs.num_pages, shape.page_size))
    if hasattr(backend, "max_context"):
        backend.max_context = MAX_POSITIONS  # as in a server (only the check's forward reads it)
    for step in inputs.steps:
        ids = [[0] * s.query_len for s in step.seqs]
        batch = build_forward_batch(step.seqs, ids, [], shape.page_size, device)
        variant.metas.append(backend.build_metadata(batch))
        variant.calls.append(_store_call(variant, step, variant.metas[-1]))
    return variant


def _store_call(variant: StoreVariant, step: StepInputs, meta) -> Callable[[], None]:
    """Layer 0's store, as the backend's forward makes it."""
    k, v, backend = step.k, step.v, variant.backend
    if variant.eight_bit:
        from sageserve.attention.sage_attn.kernels.store import store_kv

        c = backend.layer_constants(0)
        caches = variant.layer_tensors()
        pages, offsets = meta.store_pages, meta.store_offsets
        # The keys' Hadamard rotation, when on, is fused into the store (as served).
        return lambda: store_kv(k, v, c.k_mean, c.balance, pages, offsets, *caches,
                                rotation=backend.rotation)  # fmt: skip
    from sageserve.attention.triton_attn.kernels.store import store_kv

    k_layer, v_layer = variant.layer_tensors()
    return lambda: store_kv(k, v, meta.slot_mapping, k_layer, v_layer)


# ---------------------------------------------------------------------------- checks


def _poison(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        if t.element_size() == 1:
            t.view(torch.uint8).fill_(POISON_CODE)
        else:
            t.fill_(float("nan"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A same-width integer view: NaN poison compares equal to itself."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t if t.dtype == width else t.view(width)


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


def _expected(variant: StoreVariant, step: StepInputs, meta) -> list[torch.Tensor]:
    """The poisoned layer with the reference's values at the step's slots, as same-width
    integer views (written bitwise, whatever the dtype: FP8 codes included)."""
    expected = [t.clone() for t in variant.layer_tensors()]
    _poison(expected)
    bits = [_bits(t) for t in expected]
    if variant.eight_bit:
        from sageserve.attention.sage_attn.reference import quantize_kv
        from sageserve.attention.sage_attn.rotation import hadamard_rotate

        backend = variant.backend
        c = backend.layer_constants(0)
        k = hadamard_rotate(step.k) if backend.sage.rotate_qk else step.k
        k_codes, k_scale, v_codes, v_scale = quantize_kv(k, step.v, c.k_mean, backend.sage.pv,
                                                         c.balance)  # fmt: skip
        p, o = meta.store_pages, meta.store_offsets
        bits[0][p, :, o] = _bits(k_codes)  # [P, Hkv, page, D] at (page, offset): [T, Hkv, D]
        bits[1][p, :, o] = _bits(k_scale.half())  # [P, Hkv, page]: [T, Hkv]
        bits[2][p, :, :, o] = _bits(v_codes)  # [P, Hkv, D, page]: [T, Hkv, D]
        bits[3][p, :, o] = _bits(v_scale.half())
        return bits
    slots = meta.slot_mapping
    bits[0][slots] = _bits(step.k.to(expected[0].dtype))  # [slots, Hkv, D]
    bits[1][slots] = _bits(step.v.to(expected[1].dtype))
    return bits


def _matches_reference(
    variant: StoreVariant, got: list[torch.Tensor], want: list[torch.Tensor]
) -> bool:
    """Bit for bit, except the K codes and scales of the tensor-core rotation: its sums run
    in another order than the reference's butterfly, so a code may flip (`code_flips.py`)."""
    from sageserve.attention.sage_attn.code_flips import codes_within_flips, signed_bits
    from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel

    if getattr(variant.backend, "rotation", None) != HadamardKernel.TENSOR_CORE:
        return _same_bits(got, want)
    keys = zip(got[:2], want[:2], strict=True)
    return all(codes_within_flips(signed_bits(x), signed_bits(y)) for x, y in keys) and _same_bits(
        got[2:], want[2:]
    )


def check_variant(variant: StoreVariant, step: StepInputs, timer: Timer) -> dict[str, bool]:
    """Set 0: the timed call into a poisoned pool against the reference, then the backend's
    own forward for the same step (a store, then attention) against the timed call."""
    meta = variant.metas[0]
    _poison(variant.layer_tensors())
    variant.calls[0]()
    timer.sync()
    got = [t.clone() for t in variant.layer_tensors()]
    checks = {"matches_reference": _matches_reference(variant, got, _expected(variant, step, meta))}
    _poison(variant.layer_tensors())
    variant.backend.forward(0, step.q, step.k, step.v, variant.cache, meta)
    timer.sync()
    checks["matches_backend_forward"] = _same_bits(variant.layer_tensors(), got)
    return checks


# ---------------------------------------------------------------------------- one shape


def bench_shape(
    shape: StoreShape, variants: list[str], timer: Timer, device: torch.device
) -> list[dict[str, Any]]:
    """Every store variant at one (tokens, KV heads): rows ok / skipped / error."""
    sets = rotation_sets(shape, variants, device)
    rows = {v: {"variant": v, "rotation_sets": sets, **shape.describe()} for v in variants}
    reason = _too_big(memory_needed(shape, variants, sets), device)
    if reason:
        return [row | {"status": "skipped", "reason": reason} for row in rows.values()]
    entries: dict[str, Timed] = {}
    try:
        inputs = make_inputs(shape, sets, device)
    except Exception as err:  # recorded in every row and the exit code
        return [row | error_fields(err) for row in rows.values()]
    for name in variants:
        try:
            variant = build_variant(name, shape, inputs, device)
            rows[name]["checks"] = check_variant(variant, inputs.steps[0], timer)
            timed, graph_error = eager_and_graph(
                variant.name, variant.calls, timer, graph=shape.layout == "decode"
            )
            entries |= timed
            if graph_error:
                rows[name]["graph_error"] = graph_error
        except Exception as err:  # recorded in the row and the exit code
            rows[name] |= error_fields(err)
            entries = {k: t for k, t in entries.items() if k.split(":")[0] != name}
    errors = timer.round_robin(entries)
    for name in variants:
        if rows[name].get("status") != "error":
            rows[name] |= _timing_fields(name, entries, errors, shape)
    return list(rows.values())


def _too_big(need: int, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    if need > 0.9 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on the device"
    return None


def _timing_fields(name: str, entries, errors, shape: StoreShape) -> dict[str, Any]:
    eager, graph = entries.get(f"{name}:eager"), entries.get(f"{name}:graph")
    eager_ok = eager is not None and f"{name}:eager" not in errors
    main = graph if graph is not None and f"{name}:graph" not in errors else None
    main = main or (eager if eager_ok else None)
    if main is None:
        return {"status": "error", "error": errors.get(f"{name}:eager", "not timed")}
    us = main.median_ms * 1e3
    moved = shape.bytes_moved(name)
    fields: dict[str, Any] = {
        "status": "ok", "timing": "cuda_graph" if main is graph else "eager", "us": us,
        "samples_us": [x * 1e3 for x in main.samples_ms], "bytes_moved": moved,
        "gb_per_s": moved / us / 1e3,
    }  # fmt: skip
    if eager_ok and main is not eager:
        fields["us_eager"] = eager.median_ms * 1e3
    if graph is not None:
        fields["calls_per_graph"] = graph.per_call
    if f"{name}:graph" in errors:
        fields["graph_error"] = errors[f"{name}:graph"]
    return fields


def finish_rows(rows: list[dict[str, Any]], copy_gb_per_s: float) -> None:
    """Add each row's bound: its bytes at the copy bandwidth, and the fraction reached."""
    for row in rows:
        if row.get("status") == "ok":
            row["bound_us"] = row["bytes_moved"] / copy_gb_per_s / 1e3
            row["copy_bandwidth_fraction"] = row["gb_per_s"] / copy_gb_per_s
