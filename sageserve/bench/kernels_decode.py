"""Decode attention of `sageserve bench kernels`: our 8-bit paged decode against our
16-bit one, Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128).

Per (batch, context): every sequence holds `context` cached tokens (the step's token
included), random K (plus a per-channel bias) and V written by each backend's own store
kernel into its paged pool, pages shuffled. The timed call is one layer's decode attention
as the backend's `forward` makes it for single-row sequences (split-KV kernel + merge),
with the step's metadata from `build_metadata`; the store of the step's new token is not
included. Timed inside a CUDA graph (GPU time, as a graph-captured decode runs) and eagerly
(host launch cost included).

L2: a layer's K/V are read once per step, after the rest of the model has streamed through
L2, so decode is timed cold: the pool holds several copies ("sets") of the batch, at least
L2_FACTOR x the L2 size in all, and consecutive calls cycle through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.bench.kernels_common import (
    MAX_POSITIONS,
    MIN_COSINE,
    OUR_VARIANTS,
    MeasuredShape,
    accuracy,
    calibrate,
    forward_batch,
    keys_with_bias,
    make_backend,
    model_config,
    reference_attention,
    shape_seed,
    shuffled_tables,
)
from sageserve.bench.kernels_prefill import error_fields
from sageserve.bench.kernels_timing import Timed, Timer, eager_and_graph

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
L2_FACTOR = 4
MAX_SETS = 128
CALIBRATION_TOKENS = 512
INCLUDED = {
    "sage": "sage_decode_paged (split-KV kernel + combine kernel) exactly as sage_attn's "
    "forward calls it for decode rows, with page table and DecodeWorkspace from "
    "build_metadata, the query's Hadamard rotation fused into it (none in the _norot "
    "variants; a tensor-core product in the _tcrot ones, else the butterfly); excludes the "
    "store of the step's new token",
    "triton16": "paged_decode (split-KV kernel + merge kernel) exactly as the triton "
    "backend's forward calls it, with the DecodePlan from build_metadata (split count from "
    f"num_decode_splits with max_context {MAX_POSITIONS}, as in a server whose pool exceeds "
    "the model's context); excludes the store of the step's new token",
}


@dataclass(frozen=True)
class DecodeShape(MeasuredShape):
    """One decode measurement's shape."""

    batch: int
    context: int

    @property
    def used_tokens(self) -> int:
        """Tokens of the used pages, every sequence (what GB/s counts)."""
        return self.batch * math.ceil(self.context / self.page_size) * self.page_size

    def bytes_per_token(self, variant: str) -> int:
        """K and V bytes per cached token, all KV heads: codes + fp16 scales for 8-bit."""
        if OUR_VARIANTS[variant][0] == "sage_attn":
            return KV_HEADS * (2 * HEAD_DIM + 2 * 2)
        return 2 * KV_HEADS * HEAD_DIM * self.dtype.itemsize

    def describe(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "context": self.context, "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page_size": self.page_size,
            "dtype": str(self.dtype).removeprefix("torch."), "seed": self.seed,
        }  # fmt: skip


@dataclass
class DecodeVariant:
    """One backend's pool, per-set metadata and calls for one decode shape."""

    backend: Any
    cache: Any
    q: torch.Tensor  # [B, Hq, D]: the step's queries (shared by every variant)
    out: torch.Tensor  # [B, Hq, D]
    metas: list[Any] = field(default_factory=list)
    calls: list[Callable[[], None]] = field(default_factory=list)


def make_shape(batch: int, context: int, settings: dict[str, Any]) -> DecodeShape:
    seed = shape_seed(settings["seed"], 2, batch, context)
    return DecodeShape(
        batch, context, page_size=settings["page_size"], dtype=settings["dtype"], seed=seed
    )


def rotation_sets(shape: DecodeShape, variants: list[str], device: torch.device) -> int:
    """Copies of the batch to cycle through so that every call reads cold K/V."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    smallest = min(shape.used_tokens * shape.bytes_per_token(v) for v in variants)
    return max(1, min(MAX_SETS, math.ceil(L2_FACTOR * l2 / smallest)))


def memory_needed(shape: DecodeShape, variants: list[str], sets: int) -> int:
    """Bytes of the pools (every variant, every set) plus the fill's temporaries."""
    pools = sum(sets * shape.used_tokens * shape.bytes_per_token(v) for v in variants)
    fill = 6 * shape.context * KV_HEADS * HEAD_DIM * 4  # one sequence's k, v in fp32 and copies
    return pools + fill


# ---------------------------------------------------------------------------- setup


def _build(variant: str, shape: DecodeShape, q: torch.Tensor, num_pages: int, device):
    cfg = model_config(Q_HEADS, KV_HEADS, HEAD_DIM)
    backend = make_backend(variant, cfg, shape.dtype, device)
    cache = backend.allocate(num_pages, shape.page_size)
    if hasattr(backend, "max_context"):
        # allocate() caps the split count by this pool's size; a server's pool holds more.
        backend.max_context = MAX_POSITIONS
    return DecodeVariant(backend, cache, q, torch.empty_like(q))


def _plan(variant: DecodeVariant, shape: DecodeShape, tables, sets: int, device) -> None:
    """Per set: the step's metadata (once per step, as the engine builds it) and the call."""
    b = shape.batch
    for s in range(sets):
        batch = forward_batch(tables[s * b : (s + 1) * b], shape.context - 1, 1,
                              shape.page_size, device)  # fmt: skip
        variant.metas.append(variant.backend.build_metadata(batch))
    variant.calls = [_decode_call(variant, meta) for meta in variant.metas]


def _decode_call(variant: DecodeVariant, meta) -> Callable[[], None]:
    """The decode part of the backend's forward for layer 0, writing variant.out."""
    cache, out, backend = variant.cache, variant.out, variant.backend
    if hasattr(meta, "kernel"):  # sage_attn: as its _attend_kernels calls the decode kernel
        from sageserve.attention.sage_attn.kernels.decode import sage_decode_paged

        c = backend.layer_constants(0)
        caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])
        dec = meta.kernel.decode
        # The query's Hadamard rotation, when on, is fused into the kernel (as served).
        rotation = backend.rotation
        return lambda: sage_decode_paged(variant.q, c.balance, *caches, dec.page_table,
                                         dec.q_rows, dec.kv_len, out, dec.workspace,
                                         sm_scale=c.sm_scale, rotation=rotation)  # fmt: skip
    from sageserve.attention.triton_attn.kernels.decode import paged_decode

    return lambda: paged_decode(variant.q, cache.k[0], cache.v[0], meta.decode, out)


def _store(variant: DecodeVariant, k, v, table: tuple[int, ...], page_size: int) -> None:
    """Write one sequence's K/V with the backend's own store kernel (as its forward would)."""
    device = k.device
    pos = torch.arange(k.shape[0], device=device)
    pages = torch.tensor(table, dtype=torch.int64, device=device)[pos // page_size]
    offsets = pos % page_size
    backend, cache = variant.backend, variant.cache
    if hasattr(cache, "k_scale"):
        from sageserve.attention.sage_attn.kernels.store import store_kv

        c = backend.layer_constants(0)
        store_kv(k, v, c.k_mean, c.balance, pages, offsets, cache.k[0], cache.k_scale[0],
                 cache.v[0], cache.v_scale[0], rotation=backend.rotation)  # fmt: skip
    else:
        from sageserve.attention.triton_attn.kernels.store import store_kv

        store_kv(k, v, pages * page_size + offsets, cache.k[0], cache.v[0])


@dataclass
class Filled:
    """What the checks need from the fill: sequence 0's K/V, set 0's last tokens."""

    k0: torch.Tensor  # [context, Hkv, D]
    v0: torch.Tensor
    last_k: torch.Tensor  # [B, Hkv, D]: each set-0 sequence's newest token
    last_v: torch.Tensor


def _fill(variants: dict[str, DecodeVariant], shape: DecodeShape, tables, q, bias) -> Filled:
    """Random K/V per sequence (a seed each), the same for every variant; the key bias
    [Hkv, D] is the layer's, shared by every sequence."""
    d, device = (shape.context, KV_HEADS, HEAD_DIM), q.device
    firsts, lasts = None, []
    for j, table in enumerate(tables):
        gen = torch.Generator(device=device).manual_seed(shape_seed(shape.seed, j))
        k = keys_with_bias(d, bias, gen, device).to(shape.dtype)
        v = torch.randn(d, generator=gen, device=device).to(shape.dtype)
        if j == 0:
            firsts = (k, v)
            n = min(CALIBRATION_TOKENS, shape.context)
            for variant in variants.values():
                calibrate(variant.backend, q, k[:n])
        if j < shape.batch:  # copies: views would keep every sequence's K/V alive
            lasts.append((k[-1].clone(), v[-1].clone()))
        for variant in variants.values():
            _store(variant, k, v, table, shape.page_size)
    last_k = torch.stack([k for k, _ in lasts])
    last_v = torch.stack([v for _, v in lasts])
    return Filled(firsts[0], firsts[1], last_k, last_v)


# ---------------------------------------------------------------------------- one shape


def _check(variant: DecodeVariant, filled: Filled, ref: torch.Tensor, timer: Timer) -> dict:
    """First call on a NaN-poisoned output; then the backend's own forward for the same
    step (it rewrites the newest token with the same values) must give the same bits."""
    variant.out.fill_(float("nan"))
    variant.calls[0]()
    timer.sync()
    checks: dict[str, Any] = {"finite": bool(torch.isfinite(variant.out).all())}
    fwd = variant.backend.forward(0, variant.q, filled.last_k, filled.last_v, variant.cache,
                                  variant.metas[0])  # fmt: skip
    checks["matches_backend_forward"] = torch.equal(fwd, variant.out)
    acc = accuracy(variant.out[0], ref[0])
    checks["cosine_ok"] = acc["cosine"] >= MIN_COSINE
    return {"accuracy": acc, "checks": checks, "splits": _splits(variant.metas[0])}


def _splits(meta) -> int:
    if hasattr(meta, "kernel"):
        return meta.kernel.decode.workspace.num_splits
    return meta.decode.num_splits


def bench_shape(
    shape: DecodeShape, variants: list[str], timer: Timer, device: torch.device, cap: int
) -> list[dict[str, Any]]:
    """Every decode variant at one (batch, context): rows ok / skipped / error."""
    sets = rotation_sets(shape, variants, device)
    base = {"rotation_sets": sets, **shape.describe()}
    rows = {v: {"variant": v, **base} for v in variants}
    reason = _too_big(memory_needed(shape, variants, sets), cap, device)
    if reason:
        return [row | {"status": "skipped", "reason": reason} for row in rows.values()]
    built = _setup(shape, variants, sets, device, rows)
    ref, entries = None, {}
    if built is not None:
        built_variants, filled = built
        ref = reference_attention(built_variants[variants[0]].q[:1], filled.k0, filled.v0,
                                  causal=False)  # fmt: skip
        entries = _first_runs(built_variants, filled, ref, timer, rows)
    errors = timer.round_robin(entries)
    for variant in variants:
        if rows[variant].get("status") != "error":
            rows[variant] |= _timing_fields(variant, entries, errors, shape)
    return list(rows.values())


def _too_big(need: int, cap: int, device: torch.device) -> str | None:
    """Why a shape needing `need` bytes is skipped: over the cap, or over free memory."""
    if need > cap:
        return f"needs about {need / 2**30:.1f} GiB > --decode-mem-cap-gib {cap / 2**30:g}"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on the device"
    return None


def _setup(shape, variants, sets, device, rows):
    """Pools, fill and plans for every variant (None, rows marked, if that failed)."""
    try:
        gen = torch.Generator(device=device).manual_seed(shape.seed)
        q = torch.randn((shape.batch, Q_HEADS, HEAD_DIM), generator=gen, device=device)
        q = q.to(shape.dtype)
        bias = 3 * torch.randn((KV_HEADS, HEAD_DIM), generator=gen, device=device)
        tables, num_pages = shuffled_tables(sets * shape.batch, shape.context, shape.page_size,
                                            torch.Generator().manual_seed(shape.seed))  # fmt: skip
        built = {v: _build(v, shape, q, num_pages, device) for v in variants}
        filled = _fill(built, shape, tables, q, bias)
        for variant in built.values():
            _plan(variant, shape, tables, sets, device)
        return built, filled
    except Exception as err:  # recorded in every row and the exit code
        for row in rows.values():
            row |= error_fields(err)
        return None


def _first_runs(built, filled, ref, timer, rows) -> dict[str, Timed]:
    entries: dict[str, Timed] = {}
    for name, variant in built.items():
        try:
            rows[name] |= _check(variant, filled, ref, timer)
            timed, graph_error = eager_and_graph(name, variant.calls, timer, graph=True)
            entries |= timed
            if graph_error:
                rows[name]["graph_error"] = graph_error
        except Exception as err:  # recorded in the row and the exit code
            rows[name] |= error_fields(err)
            entries = {k: t for k, t in entries.items() if k.split(":")[0] != name}
    return entries


def _timing_fields(variant: str, entries, errors, shape: DecodeShape) -> dict[str, Any]:
    eager, graph = entries.get(f"{variant}:eager"), entries.get(f"{variant}:graph")
    eager_ok = eager is not None and f"{variant}:eager" not in errors
    main = graph if graph is not None and f"{variant}:graph" not in errors else None
    main = main or (eager if eager_ok else None)
    if main is None:
        return {"status": "error", "error": errors.get(f"{variant}:eager", "not timed")}
    us = main.median_ms * 1e3
    kv_bytes = shape.used_tokens * shape.bytes_per_token(variant)
    fields: dict[str, Any] = {
        "status": "ok", "timing": "cuda_graph" if main is graph else "eager", "us": us,
        "samples_us": [x * 1e3 for x in main.samples_ms], "kv_bytes_read": kv_bytes,
        "gb_per_s": kv_bytes / us / 1e3,
    }  # fmt: skip
    if eager_ok:
        fields["us_eager"] = eager.median_ms * 1e3
    if graph is not None:
        fields["calls_per_graph"] = graph.per_call
    if f"{variant}:graph" in errors:
        fields["graph_error"] = errors[f"{variant}:graph"]
    return fields


def finish_rows(rows: list[dict[str, Any]], copy_gb_per_s: float) -> None:
    """Add each row's fraction of the copy bandwidth and the 8-bit/16-bit speedups."""
    by_shape = {(r["batch"], r["context"], r["variant"]): r for r in rows}
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["copy_bandwidth_fraction"] = row["gb_per_s"] / copy_gb_per_s
        base = by_shape.get((row["batch"], row["context"], "triton16"))
        if row["variant"] != "triton16" and base and base.get("status") == "ok":
            row["speedup_vs_triton16"] = base["us"] / row["us"]
            if "us_eager" in row and "us_eager" in base:
                row["speedup_vs_triton16_eager"] = base["us_eager"] / row["us_eager"]
