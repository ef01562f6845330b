"""Prefill attention of `sageserve bench kernels`: our paged kernels against SDPA and
SageAttention 1.0.6, side by side on the same inputs.

Per shape (head_dim, seq, causal): batch = max(1, total_tokens // seq) sequences of seq
tokens, q [T, Hq, D] and k, v [T, Hkv, D] random normal (K plus a per-channel bias shared
by all tokens), a fresh seed per shape. Each variant is built (untimed: caches, plans,
layout copies), run once on a NaN-poisoned output and checked (finite, against the fp64
reference on the first sequence, our causal calls against `backend.forward`), then all
variants are timed round-robin.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sageserve.bench.kernels_common import (
    MIN_COSINE,
    OUR_VARIANTS,
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
from sageserve.bench.kernels_timing import Timed, Timer

SDPA_VARIANTS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "torch_sdpa": "MATH"}  # fmt: skip
# Calibration tokens, as sageserve's calibration pass uses (attention/calibration.py).
CALIBRATION_TOKENS = 512

_OURS = (
    "one layer's `backend.forward` of the {backend} backend{pv}: {store}, then {attn}, "
    "reading K/V back from the paged cache (page tables and plans from build_metadata, "
    "outside the timed region). Non-causal: the same two kernel calls with causal=False "
    "(not a serving path)."
)
_SAGE_STORE = (
    "the fused quantize-and-store kernel (K {rot}minus the calibrated mean, INT8 "
    "per token; V {v} per token; fp16 scales) into the 8-bit paged cache"
)
_SAGE_ATTN = (
    "the 8-bit paged prefill kernel (Q {rot}quantized to INT8 inside it, INT8 Q·Kᵀ, {pv} P·V)"
)
_GLUON_ATTN = (
    "the warp-specialized Hopper prefill (Gluon: TMA producer warp, two ping-pong consumer "
    "warpgroups; Q {rot}quantized to INT8 inside it, INT8 Q·Kᵀ, {pv} P·V{widen}; its work "
    "plan from build_metadata)"
)
_ROTATED = {
    "off": "",
    "auto": "rotated by the Hadamard matrix (fp32 butterfly; as served by default: queries "
    "rotated and quantized by one pass before the prefill kernel at head_dim >= 128, that "
    "pass timed with it, in the kernel's registers below), ",
    "butterfly": "rotated by the Hadamard matrix in registers (fp32 butterfly), ",
    "tensor_core": "rotated by the Hadamard matrix in registers (one tensor-core product), ",
    "prepass": "rotated by the Hadamard matrix (fp32 butterfly; queries rotated and quantized "
    "by one pass before the prefill kernel, that pass timed with it), ",
}


def _sage_included(pv: str, rotation: str, impl: str = "triton") -> str:
    v = "INT8" if pv == "FP16" else "FP8 e4m3"
    attn = _SAGE_ATTN.format(rot=_ROTATED[rotation], pv=pv)
    if impl == "gluon":
        widen = ", INT8 V widened to fp16 in shared memory" if pv == "FP16" else ""
        rot = "" if rotation == "off" else "rotated by one wgmma with the Hadamard matrix and "
        attn = _GLUON_ATTN.format(pv=pv, widen=widen, rot=rot)
    return _OURS.format(
        backend="sage_attn",
        pv=f" ({pv} P·V{', no Q/K rotation' if rotation == 'off' else ''})",
        store=_SAGE_STORE.format(rot=_ROTATED[rotation], v=v),
        attn=attn,
    )


INCLUDED = {
    "sage_fp16pv": _sage_included("FP16", "auto"),
    "sage_fp8pv": _sage_included("FP8", "auto"),
    "sage_fp16pv_bfly": _sage_included("FP16", "butterfly"),
    "sage_fp8pv_bfly": _sage_included("FP8", "butterfly"),
    "sage_fp16pv_norot": _sage_included("FP16", "off"),
    "sage_fp8pv_norot": _sage_included("FP8", "off"),
    "sage_fp16pv_tcrot": _sage_included("FP16", "tensor_core"),
    "sage_fp8pv_tcrot": _sage_included("FP8", "tensor_core"),
    "sage_fp16pv_prerot": _sage_included("FP16", "prepass"),
    "sage_fp8pv_prerot": _sage_included("FP8", "prepass"),
    "sage_fp16pv_gluon": _sage_included("FP16", "butterfly", "gluon"),
    "sage_fp8pv_gluon": _sage_included("FP8", "butterfly", "gluon"),
    "sage_fp16pv_gluon_norot": _sage_included("FP16", "off", "gluon"),
    "sage_fp8pv_gluon_norot": _sage_included("FP8", "off", "gluon"),
    "triton16": _OURS.format(
        backend="triton",
        pv="",
        store="the paged store of K and V into the 16-bit cache",
        attn="the 16-bit paged prefill kernel",
    ),
    "sdpa_flash": "F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION) on "
    "contiguous [B, H, N, D] tensors made outside the timed region (GQA: K/V expanded to the "
    "query heads outside it); its output allocation; no cache write",
    "sdpa_cudnn": "as sdpa_flash, under sdpa_kernel(CUDNN_ATTENTION)",
    "torch_sdpa": "as sdpa_flash, under sdpa_kernel(MATH) (the plain torch path)",
    "sageattn_1_0_6": "sageattention.sageattn(q, k, v, tensor_layout='HND', is_causal, "
    "smooth_k=True) on contiguous [B, H, N, D] tensors: K mean subtraction (in place, on its "
    "own copy of K), per-block INT8 quantization of Q and K, V cast to fp16 when not fp16, "
    "the attention kernel; no cache write",
}


@dataclass(frozen=True)
class PrefillShape:
    """One prefill measurement's shape."""

    head_dim: int
    seq: int
    batch: int
    causal: bool
    q_heads: int
    kv_heads: int
    page_size: int
    dtype: torch.dtype
    seed: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def flops(self) -> float:
        """4·B·H·N²·D (two products of 2·N²·D per head), halved when causal."""
        full = 4 * self.batch * self.q_heads * self.seq**2 * self.head_dim
        return full / 2 if self.causal else full

    def describe(self) -> dict[str, Any]:
        return {
            "head_dim": self.head_dim, "seq_len": self.seq, "batch": self.batch,
            "tokens": self.tokens, "causal": self.causal, "q_heads": self.q_heads,
            "kv_heads": self.kv_heads, "page_size": self.page_size,
            "dtype": str(self.dtype).removeprefix("torch."), "seed": self.seed,
        }  # fmt: skip


@dataclass
class PrefillData:
    """The shape's inputs in the model's layout, and layout copies made on demand."""

    shape: PrefillShape
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    copies: dict[str, torch.Tensor] = field(default_factory=dict)

    def bhnd(self, name: str, expand: bool = False) -> torch.Tensor:
        """q, k or v as a contiguous [B, H, N, D] copy; expand: K/V repeated per GQA group."""
        x, s = getattr(self, name), self.shape
        expand = expand and x.shape[1] != s.q_heads  # MHA: one copy serves both
        key = f"{name}{'_x' if expand else ''}"
        if key not in self.copies:
            x = x.view(s.batch, s.seq, x.shape[1], s.head_dim).transpose(1, 2)
            if expand:
                x = x.repeat_interleave(s.q_heads // x.shape[1], dim=1)
            self.copies[key] = x.contiguous()
        return self.copies[key]


@dataclass
class Runner:
    """One variant at one shape."""

    call: Callable[[], torch.Tensor]  # the timed call; returns the output
    first_seq: Callable[[torch.Tensor], torch.Tensor]  # output -> first sequence [N, Hq, D]
    pieces: dict[str, Callable[[], object]] = field(default_factory=dict)  # timed apart
    # Our kernels: (kernel-level call writing `out`, out); checked against `call`.
    replica: tuple[Callable[[], torch.Tensor], torch.Tensor] | None = None


def make_shape(head_dim: int, seq: int, causal: bool, settings: dict[str, Any]) -> PrefillShape:
    """settings: total_tokens, q_heads, kv_heads, page_size, dtype, seed."""
    return PrefillShape(
        head_dim=head_dim, seq=seq, batch=max(1, settings["total_tokens"] // seq),
        causal=causal, q_heads=settings["q_heads"], kv_heads=settings["kv_heads"],
        page_size=settings["page_size"], dtype=settings["dtype"],
        seed=shape_seed(settings["seed"], 1, head_dim, seq, int(causal)),
    )  # fmt: skip


def make_data(shape: PrefillShape, device: torch.device) -> PrefillData:
    """Random normal q, v; k normal plus 3·randn per (KV head, channel), in shape.dtype."""
    gen = torch.Generator(device=device).manual_seed(shape.seed)
    t, d = shape.tokens, shape.head_dim
    q = torch.randn((t, shape.q_heads, d), generator=gen, device=device)
    bias = 3 * torch.randn((shape.kv_heads, d), generator=gen, device=device)
    k = keys_with_bias((t, shape.kv_heads, d), bias, gen, device)
    v = torch.randn((t, shape.kv_heads, d), generator=gen, device=device)
    return PrefillData(shape, q.to(shape.dtype), k.to(shape.dtype), v.to(shape.dtype))


# ---------------------------------------------------------------------------- variants


def _sdpa_runner(variant: str, data: PrefillData) -> Runner:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_VARIANTS[variant])
    q4, k4, v4 = data.bhnd("q"), data.bhnd("k", expand=True), data.bhnd("v", expand=True)
    causal = data.shape.causal

    def call() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)

    return Runner(call, first_seq=lambda o: o[0].transpose(0, 1))


def _sageattn_runner(data: PrefillData) -> Runner:
    from sageattention import sageattn

    q4, v4 = data.bhnd("q"), data.bhnd("v")
    # sageattn subtracts the key mean from its k argument in place: its own copy.
    k4 = data.bhnd("k").clone()
    causal = data.shape.causal

    def call() -> torch.Tensor:
        return sageattn(q4, k4, v4, tensor_layout="HND", is_causal=causal, smooth_k=True)

    return Runner(call, first_seq=lambda o: o[0].transpose(0, 1))


def noncausal_support(variant: str) -> str | None:
    """None if our kernel for `variant` has a non-causal mode, else why not."""
    if OUR_VARIANTS[variant][0] == "sage_attn":
        from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged as fn
    else:
        from sageserve.attention.triton_attn.kernels.prefill import paged_prefill as fn
    if "causal" in inspect.signature(fn).parameters:
        return None
    return (
        f"{fn.__module__}.{fn.__name__} has no non-causal mode (a prefill over the paged "
        "cache is causal, mask aligned bottom-right)"
    )


def _sage_replica(backend, cache, meta, data: PrefillData, out: torch.Tensor):
    """sage_attn's kernel calls for layer 0, as `_store_kernels` and `_attend_kernels` make them:
    (store, store + attention into `out`)."""
    from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged
    from sageserve.attention.sage_attn.kernels.store import store_kv

    c = backend.layer_constants(0)
    caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])
    pre = meta.kernel.prefill
    # The Hadamard rotation of q and k, when on, is fused into the kernels (as served).
    rotation = backend.rotation
    kwargs = {"rotation": rotation} | ({} if data.shape.causal else {"causal": False})

    def store() -> None:
        store_kv(data.k, data.v, c.k_mean, c.balance, meta.store_pages, meta.store_offsets,
                 *caches, rotation=rotation)  # fmt: skip

    def full() -> torch.Tensor:
        store()
        sage_attention_paged(data.q, c.balance, *caches, pre.page_table, pre.q_start,
                             pre.q_len, pre.kv_len, pre.max_q_len, sm_scale=c.sm_scale,
                             out=out, **kwargs)  # fmt: skip
        return out

    if backend.sage.rotation_kernel == "prepass" and backend.sage.rotate_qk:
        full = _prepass_full(backend, caches, meta, data, out, store)
    if backend.gluon_prefill:
        full = _gluon_full(backend, cache, meta, data, out, store)
    return store, full


def _prepass_full(backend, caches, meta, data: PrefillData, out: torch.Tensor, store):
    """--sage-rotation-kernel prepass as `_attend_kernels` calls it: queries rotated and
    quantized by one pass, then the prefill kernel over the codes."""
    from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged
    from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q

    c, pre = backend.layer_constants(0), meta.kernel.prefill
    kwargs = {} if data.shape.causal else {"causal": False}

    def full() -> torch.Tensor:
        store()
        codes, scales = quantize_q(data.q, c.sm_scale, backend.rotation, c.balance)
        sage_attention_paged(codes, None, *caches, pre.page_table, pre.q_start, pre.q_len,
                             pre.kv_len, pre.max_q_len, out=out, q_scale=scales,
                             **kwargs)  # fmt: skip
        return out

    return full


def _gluon_full(backend, cache, meta, data: PrefillData, out: torch.Tensor, store):
    """The --sage-impl gluon prefill as `_attend_kernels` calls it (non-causal: the same
    kernel over a non-causal plan)."""
    from sageserve.attention.sage_attn.kernels.gluon.plan import work_plan
    from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

    pre, causal = meta.kernel.prefill, data.shape.causal
    plan = pre.plan
    if not causal:
        lens = pre.q_len.tolist()
        plan = torch.from_numpy(work_plan(lens, lens, data.q.shape[1], causal=False))
        plan = plan.to(data.q.device)
    caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])

    def full() -> torch.Tensor:
        store()
        sage_attention_ws(data.q, *caches, pre.page_table, pre.q_start, pre.q_len, pre.kv_len,
                          plan, out, backend.layer_constants(0).sm_scale, causal=causal,
                          rotate=backend.sage.rotate_qk)  # fmt: skip
        return out

    return full


def _triton_replica(backend, cache, meta, data: PrefillData, out: torch.Tensor):
    """The triton backend's kernel calls for layer 0, as its `forward` makes them."""
    from sageserve.attention.triton_attn.kernels.prefill import paged_prefill
    from sageserve.attention.triton_attn.kernels.store import store_kv

    k_layer, v_layer = cache.k[0], cache.v[0]
    kwargs = {} if data.shape.causal else {"causal": False}

    def store() -> None:
        store_kv(data.k, data.v, meta.slot_mapping, k_layer, v_layer)

    def full() -> torch.Tensor:
        store()
        paged_prefill(data.q, k_layer, v_layer, meta.prefill, out, **kwargs)
        return out

    return store, full


def _our_runner(variant: str, data: PrefillData, device: torch.device) -> Runner:
    s = data.shape
    backend = make_backend(variant, model_config(s.q_heads, s.kv_heads, s.head_dim), s.dtype,
                           device)  # fmt: skip
    n = min(CALIBRATION_TOKENS, s.seq)
    calibrate(backend, data.q[:n], data.k[:n])
    gen = torch.Generator().manual_seed(s.seed)
    tables, num_pages = shuffled_tables(s.batch, s.seq, s.page_size, gen)
    cache = backend.allocate(num_pages, s.page_size)
    meta = backend.build_metadata(forward_batch(tables, 0, s.seq, s.page_size, device))
    out = torch.empty_like(data.q)
    make = _sage_replica if OUR_VARIANTS[variant][0] == "sage_attn" else _triton_replica
    store, full = make(backend, cache, meta, data, out)

    def forward() -> torch.Tensor:  # the serving path itself: one layer's forward
        return backend.forward(0, data.q, data.k, data.v, cache, meta)

    return Runner(
        forward if s.causal else full,
        lambda o: o[: s.seq],
        pieces={"store": store},
        replica=(full, out),
    )


def build_runner(variant: str, data: PrefillData, device: torch.device) -> Runner:
    if variant in SDPA_VARIANTS:
        return _sdpa_runner(variant, data)
    if variant == "sageattn_1_0_6":
        return _sageattn_runner(data)
    return _our_runner(variant, data, device)


# ---------------------------------------------------------------------------- one shape


def first_run(runner: Runner, ref: torch.Tensor, timer: Timer) -> dict[str, Any]:
    """Run once (compiling), check, and measure accuracy on the first sequence.

    Our kernels: their kernel-level calls write a NaN-poisoned buffer first (every row
    must be written), and `backend.forward` must give the same bits.
    """
    checks: dict[str, Any] = {}
    fields: dict[str, Any] = {"checks": checks}
    replica_ok = False
    if runner.replica is not None:
        replica, out = runner.replica
        out.fill_(float("nan"))
        try:
            replica()
            timer.sync()
            replica_ok = True
        except Exception as err:
            if runner.call is replica:
                raise
            # Causal: the timed call is backend.forward itself, which may still run (e.g.
            # a kernel signature changed under the replica): keep its figures, report this.
            checks["replica_ran"] = False
            fields["replica_error"] = f"{type(err).__name__}: {err}"[:2000]
        if replica_ok:
            checks["poisoned_output_all_written"] = bool(torch.isfinite(out).all())
    result = runner.call()
    timer.sync()
    checks["finite"] = bool(torch.isfinite(result).all())
    if replica_ok and result is not runner.replica[1]:
        checks["matches_backend_forward"] = torch.equal(result, runner.replica[1])
    fields["accuracy"] = accuracy(runner.first_seq(result), ref)
    checks["cosine_ok"] = fields["accuracy"]["cosine"] >= MIN_COSINE
    return fields


def bench_shape(
    shape: PrefillShape, variants: list[str], timer: Timer, device: torch.device
) -> list[dict[str, Any]]:
    """Every variant at one shape: rows with status ok / not supported / error."""
    data = make_data(shape, device)
    s = shape.seq
    ref = reference_attention(data.q[:s], data.k[:s], data.v[:s], shape.causal)
    rows = {v: {"variant": v, **shape.describe()} for v in variants}
    entries: dict[str, Timed] = {}
    runners: dict[str, Runner] = {}
    for variant in variants:
        reason = _unsupported(variant, shape)
        if reason:
            rows[variant] |= {"status": "not supported", "reason": reason}
            continue
        try:
            runner = build_runner(variant, data, device)
            rows[variant] |= first_run(runner, ref, timer)
            for name, call in {"": runner.call, **runner.pieces}.items():
                key = f"{variant}:{name}" if name else variant
                entries[key] = Timed(call)
                timer.plan(entries[key])
            runners[variant] = runner
        except Exception as err:  # recorded in the row and the exit code, never hidden
            rows[variant] |= error_fields(err)
            entries = {k: t for k, t in entries.items() if k.split(":")[0] != variant}
    errors = timer.round_robin(entries)
    for variant, runner in runners.items():
        rows[variant] |= _timing_fields(variant, entries, errors, shape, runner)
    return list(rows.values())


def _unsupported(variant: str, shape: PrefillShape) -> str | None:
    if variant in OUR_VARIANTS and not shape.causal:
        return noncausal_support(variant)
    return None


def error_fields(err: BaseException) -> dict[str, Any]:
    return {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}


def _timing_fields(
    variant: str, entries: dict[str, Timed], errors: dict[str, str], shape: PrefillShape,
    runner: Runner,
) -> dict[str, Any]:  # fmt: skip
    if variant in errors:
        return {"status": "error", "error": errors[variant]}
    timed = entries[variant]
    ms = timed.median_ms
    fields: dict[str, Any] = {
        "status": "ok", "ms": ms, "tops": shape.flops / ms / 1e9,
        "samples_ms": timed.samples_ms, "calls_per_sample": timed.iters,
    }  # fmt: skip
    store = entries.get(f"{variant}:store")
    if f"{variant}:store" in errors:
        fields["store_error"] = errors[f"{variant}:store"]
    elif store is not None:
        fields["store_ms"] = store.median_ms
        # Derived (a difference of medians): the attention kernel alone.
        if ms > store.median_ms:
            fields["tops_without_store"] = shape.flops / (ms - store.median_ms) / 1e9
    if runner.replica is not None and runner.call is runner.replica[0]:
        fields["finite_after_timing"] = bool(torch.isfinite(runner.replica[1]).all())
    return fields
