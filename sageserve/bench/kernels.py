"""`sageserve bench kernels`: attention kernels side by side in one process, on one device.

Prefill (`kernels_prefill.py`): our 8-bit kernels (FP16 and FP8 P·V) and 16-bit kernels
over the paged cache, K/V store included, against SDPA flash / cuDNN and SageAttention
1.0.6; TOPS and accuracy against an fp64 reference. Decode (`kernels_decode.py`): our 8-bit
against our 16-bit paged decode at Llama-3.1-8B shapes; µs, GB/s of K/V read, fraction of
the measured copy bandwidth. Store (`kernels_store.py`): our KV-cache stores alone, for
decode and prefill steps; µs, GB/s of the bytes they move, and the time those bytes take at
the copy bandwidth (the bound). Writes one JSON (every figure, samples, the machine, versions,
date and command) and prints Markdown tables; exit 0, or 1 when a variant failed or a
check did not hold (each listed under "problems"); bad flags exit 2.

Runs on CPU too, through Triton's interpreter at tiny shapes (the CI smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sageserve.bench.run_record import (
    default_out,
    device_info,
    settings_command,
    software,
    write_json,
)

# Opt-in: the rotation's price (off), the in-kernel butterfly and tensor-core product, and
# the queries rotated and quantized by a pass before the prefill kernel at every head_dim.
ROTATION_VARIANTS = ("sage_fp16pv_norot", "sage_fp8pv_norot", "sage_fp16pv_bfly",
                     "sage_fp8pv_bfly", "sage_fp16pv_tcrot", "sage_fp8pv_tcrot",
                     "sage_fp16pv_prerot", "sage_fp8pv_prerot")  # fmt: skip
# Opt-in, prefill only: the warp-specialized Hopper prefill (--sage-impl gluon; sm_90).
GLUON_VARIANTS = ("sage_fp16pv_gluon", "sage_fp8pv_gluon", "sage_fp16pv_gluon_norot",
                  "sage_fp8pv_gluon_norot")  # fmt: skip
PREFILL_CHOICES = ("sage_fp16pv", "sage_fp8pv", "triton16", "sdpa_flash", "sdpa_cudnn",
                   "sageattn_1_0_6", "torch_sdpa", *ROTATION_VARIANTS, *GLUON_VARIANTS)  # fmt: skip
DECODE_CHOICES = ("sage_fp16pv", "sage_fp8pv", "triton16", *ROTATION_VARIANTS)
STORE_CHOICES = ("sage_fp16pv", "sage_fp8pv", "triton16", *ROTATION_VARIANTS)
GPU_STORE_VARIANTS = ("sage_fp16pv", "sage_fp8pv", "triton16")
CPU_STORE_VARIANTS = ("sage_fp16pv", "triton16")  # the interpreter's fp8 casts are wrong
GPU_VARIANTS = PREFILL_CHOICES[:6]
CPU_VARIANTS = ("sage_fp16pv", "triton16", "torch_sdpa")
OUR_KERNELS = ("sage_fp16pv", "sage_fp8pv", "triton16", *ROTATION_VARIANTS, *GLUON_VARIANTS)
HEAD_DIMS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CAUSAL_MODES = {"both": (True, False), "causal": (True,), "noncausal": (False,)}
Q_HEADS = 32
_KERNEL_MODULES = ("sageserve.attention.triton_attn.backend", "sageserve.attention.triton_common",
                   "sageserve.attention.sage_attn.kernels.prefill")  # fmt: skip


def add_kernels_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `sageserve bench kernels`."""
    add = parser.add_argument
    add(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="cuda if available (auto); cpu runs Triton kernels through the interpreter",
    )
    add(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="input dtype; auto: bf16 on CUDA, fp32 on CPU",
    )
    add(
        "--variants",
        default=None,
        help=f"prefill variants, comma-separated, of: {','.join(PREFILL_CHOICES)} (default: "
        f"{','.join(GPU_VARIANTS)} on CUDA, {','.join(CPU_VARIANTS)} on CPU)",
    )
    add(
        "--decode-variants",
        default="sage_fp16pv,triton16",
        help=f"decode variants, of: {','.join(DECODE_CHOICES)}",
    )
    add("--head-dims", default="128,64", help="prefill head dims, in run order, of: 64,128")
    add("--seq-lens", default="1024,2048,4096,8192,16384,32768", help="prefill sequence lengths")
    add(
        "--total-tokens",
        type=int,
        default=16384,
        help="prefill batch = max(1, total_tokens // seq_len)",
    )
    add("--causal", default="both", choices=tuple(CAUSAL_MODES))
    add(
        "--kv-heads",
        type=int,
        default=Q_HEADS,
        help=f"prefill KV heads ({Q_HEADS} query heads; fewer KV heads = GQA)",
    )
    add(
        "--page-size",
        type=int,
        default=64,
        help="tokens per page of our paged caches (64: the GPU backends' default)",
    )
    add("--decode-batches", default="1,16,64")
    add(
        "--decode-contexts",
        default="1024,4096,8192,16384,32768",
        help="decode context lengths (cached tokens per sequence, the new one included)",
    )
    add(
        "--decode-mem-cap-gib",
        type=float,
        default=40.0,
        help="skip (and say so) decode shapes whose pools would need more device memory",
    )
    add(
        "--store-variants",
        default=None,
        help=f"KV store variants, of: {','.join(STORE_CHOICES)} (default: "
        f"{','.join(GPU_STORE_VARIANTS)} on CUDA, {','.join(CPU_STORE_VARIANTS)} on CPU)",
    )
    add(
        "--store-tokens",
        default="1,16,256,1024,16384",
        help="new tokens per store step (<= 256: a decode step, one token per sequence; "
        "more: a prefill step)",
    )
    add("--store-kv-heads", default="8,32", help="KV heads of the store shapes (head_dim 128)")
    add("--skip-prefill", action="store_true")
    add("--skip-decode", action="store_true")
    add("--skip-store", action="store_true")
    add("--warmup", type=int, default=2, help="untimed calls per variant before sampling")
    add("--repeats", type=int, default=5, help="timed samples per variant (median reported)")
    add("--sample-ms", type=float, default=20.0, help="target duration of one timed sample")
    add("--seed", type=int, default=0)
    add("--out", default=None,
        help="JSON path (default sageserve-reports/kernels-<card>-<date>-<time>.json, "
        "untracked); Markdown "
        "goes next to it (.md) and to stdout")  # fmt: skip


@dataclass(frozen=True)
class KernelBenchConfig:
    """One run's settings, "auto" resolved; validates itself (ValueError names choices)."""

    device: str
    dtype: str
    variants: tuple[str, ...]
    decode_variants: tuple[str, ...]
    head_dims: tuple[int, ...]
    seq_lens: tuple[int, ...]
    total_tokens: int
    causal: str
    kv_heads: int
    page_size: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_mem_cap_gib: float
    store_variants: tuple[str, ...]
    store_tokens: tuple[int, ...]
    store_kv_heads: tuple[int, ...]
    skip_prefill: bool
    skip_decode: bool
    skip_store: bool
    warmup: int
    repeats: int
    sample_ms: float
    seed: int

    def __post_init__(self) -> None:
        _choices("--variants", self.variants, PREFILL_CHOICES)
        _choices("--decode-variants", self.decode_variants, DECODE_CHOICES)
        _choices("--store-variants", self.store_variants, STORE_CHOICES)
        _choices("--head-dims", self.head_dims, HEAD_DIMS)
        if Q_HEADS % self.kv_heads:
            raise ValueError(f"--kv-heads must divide {Q_HEADS}: one of 1, 2, 4, 8, 16, 32")
        positive = {"--total-tokens": self.total_tokens, "--page-size": self.page_size,
                    "--repeats": self.repeats, "--sample-ms": self.sample_ms,
                    "--decode-mem-cap-gib": self.decode_mem_cap_gib}  # fmt: skip
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.skip_prefill and self.skip_decode and self.skip_store:
            raise ValueError(
                "--skip-prefill, --skip-decode and --skip-store together leave nothing to run"
            )
        if self.device == "cpu":
            _check_cpu_grid(self)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# On CPU our kernels run in Triton's interpreter, one Python call per program and block: the
# GPU grid (up to 32k tokens) would take hours there. A CPU run is a smoke test of the code
# path at shapes up to these; TINY_CPU_RUN is one (about 30 s on a 2-core CPU).
CPU_MAX_TOKENS = 1024
TINY_CPU_RUN = (
    "sageserve bench kernels --device cpu --head-dims 64 --seq-lens 64 --total-tokens 128 "
    "--kv-heads 2 --decode-batches 2 --decode-contexts 100 --store-tokens 16 "
    "--store-kv-heads 2 --repeats 1 --warmup 0"
)


def _check_cpu_grid(cfg: KernelBenchConfig) -> None:
    """ValueError when a CPU run asks for GPU-sized shapes (see CPU_MAX_TOKENS)."""
    sizes = {}
    if not cfg.skip_prefill:
        sizes |= {"--seq-lens": max(cfg.seq_lens), "--total-tokens": cfg.total_tokens}
    if not cfg.skip_decode:
        sizes["--decode-contexts"] = max(cfg.decode_contexts)
        sizes["--decode-batches x contexts"] = max(cfg.decode_batches) * max(cfg.decode_contexts)
    if not cfg.skip_store:
        sizes["--store-tokens"] = max(cfg.store_tokens)
    too_big = [f"{flag} {n}" for flag, n in sizes.items() if n > CPU_MAX_TOKENS]
    if too_big:
        raise ValueError(
            "no CUDA device: on CPU the kernels run in Triton's interpreter, thousands of "
            f"times slower, so shapes are limited to {CPU_MAX_TOKENS} tokens (asked: "
            f"{', '.join(too_big)}). Time the kernels on a GPU; to smoke-test on CPU: "
            f"{TINY_CPU_RUN}"
        )


def _choices(flag: str, values: tuple, valid: tuple) -> None:
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise ValueError(
            f"{flag}: {', '.join(map(str, bad)) or 'empty'} not valid; choose from "
            f"{','.join(map(str, valid))}"
        )


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> KernelBenchConfig:
    """Resolve "auto" (device, dtype, variants) and validate; ValueError on bad values."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu)")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    default = GPU_VARIANTS if device == "cuda" else CPU_VARIANTS
    default_store = GPU_STORE_VARIANTS if device == "cuda" else CPU_STORE_VARIANTS
    return KernelBenchConfig(
        device=device, dtype=dtype,
        variants=_names(args.variants) if args.variants is not None else default,
        decode_variants=_names(args.decode_variants),
        head_dims=_ints("--head-dims", args.head_dims),
        seq_lens=_ints("--seq-lens", args.seq_lens), total_tokens=args.total_tokens,
        causal=args.causal, kv_heads=args.kv_heads, page_size=args.page_size,
        decode_batches=_ints("--decode-batches", args.decode_batches),
        decode_contexts=_ints("--decode-contexts", args.decode_contexts),
        decode_mem_cap_gib=args.decode_mem_cap_gib,
        store_variants=(_names(args.store_variants) if args.store_variants is not None
                        else default_store),
        store_tokens=_ints("--store-tokens", args.store_tokens),
        store_kv_heads=_ints("--store-kv-heads", args.store_kv_heads),
        skip_prefill=args.skip_prefill, skip_decode=args.skip_decode,
        skip_store=args.skip_store, warmup=args.warmup, repeats=args.repeats,
        sample_ms=args.sample_ms, seed=args.seed,
    )  # fmt: skip


def command_line(cfg: KernelBenchConfig, out: Path) -> str:
    """The command that repeats this run, every setting explicit."""
    return settings_command(["sageserve", "bench", "kernels"], cfg, out)


# ---------------------------------------------------------------------------- preflight


def prepare_device(cfg: KernelBenchConfig) -> None:
    """Triton's interpreter on CPU, compiled kernels on CUDA (ValueError otherwise).

    TRITON_INTERPRET is read when a kernel module is imported: on CPU it is set here unless
    a kernel module was already imported compiled.
    """
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    uses_triton = any(
        v in OUR_KERNELS for v in cfg.variants + cfg.decode_variants + cfg.store_variants
    )
    if cfg.device == "cuda" and interpret and uses_triton:
        raise ValueError("TRITON_INTERPRET=1 is set: unset it to time compiled kernels on CUDA")
    if cfg.device == "cpu" and uses_triton and not interpret:
        if any(name in sys.modules for name in _KERNEL_MODULES):
            raise ValueError(
                "--device cpu runs our Triton kernels through the interpreter: set "
                "TRITON_INTERPRET=1 before starting, or drop sage_*/triton16 from --variants, "
                "--decode-variants and --store-variants"
            )
        os.environ["TRITON_INTERPRET"] = "1"


def preflight(cfg: KernelBenchConfig) -> None:
    """Every requested variant must be able to run here (ValueError naming the flag)."""
    problems = []
    if not cfg.skip_prefill:
        for variant in cfg.variants:
            problems += [f"--variants {variant}: {r}" for r in _variant_reasons(variant, cfg)]
    if not cfg.skip_decode:
        for variant in cfg.decode_variants:
            reasons = _our_reasons(variant, cfg, Q_HEADS, Q_HEADS // 4, (128,))
            problems += [f"--decode-variants {variant}: {r}" for r in reasons]
    if not cfg.skip_store:
        from sageserve.bench.kernels_store import GROUP, HEAD_DIM

        for variant in cfg.store_variants:
            reasons = []
            for kv_heads in cfg.store_kv_heads:
                reasons += _our_reasons(variant, cfg, GROUP * kv_heads, kv_heads, (HEAD_DIM,))
            reasons = list(dict.fromkeys(reasons))
            problems += [f"--store-variants {variant}: {r}" for r in reasons]
    if problems:
        raise ValueError("cannot run: " + "; ".join(problems) + " (drop them from that flag)")


def _variant_reasons(variant: str, cfg: KernelBenchConfig) -> list[str]:
    if variant in OUR_KERNELS:
        return _our_reasons(variant, cfg, Q_HEADS, cfg.kv_heads, cfg.head_dims)
    if variant == "torch_sdpa":
        return []
    if cfg.device != "cuda":
        return ["needs a CUDA device"]
    if variant == "sageattn_1_0_6":
        try:
            import sageattention  # noqa: F401
        except ImportError as err:
            return [f"sageattention is not importable ({err}): pip install "
                    ".whl/sageattention-1.0.6-py3-none-any.whl"]  # fmt: skip
    return _trial_reasons(variant, cfg)


def _our_reasons(
    variant: str, cfg: KernelBenchConfig, q_heads: int, kv_heads: int, dims
) -> list[str]:
    from sageserve.bench.kernels_common import backend_reasons, model_config

    reasons = []
    if variant.startswith("sage_fp8pv") and cfg.device == "cpu":
        reasons.append("Triton's interpreter casts to fp8 wrongly (~13% of values): GPU only")
    for dim in dims:
        config = model_config(q_heads, kv_heads, dim)
        reasons += backend_reasons(variant, config, cfg.torch_dtype, cfg.torch_device)
    return list(dict.fromkeys(reasons))


def _trial_reasons(variant: str, cfg: KernelBenchConfig) -> list[str]:
    """A tiny call per head_dim and mask mode: SDPA backends and sageattn fail loudly."""
    from sageserve.bench.kernels_prefill import PrefillData, build_runner, make_data, make_shape

    settings = {"total_tokens": 256, "q_heads": Q_HEADS, "kv_heads": cfg.kv_heads,
                "page_size": cfg.page_size, "dtype": cfg.torch_dtype, "seed": 0}  # fmt: skip
    for dim in cfg.head_dims:
        for causal in CAUSAL_MODES[cfg.causal]:
            data: PrefillData = make_data(make_shape(dim, 128, causal, settings), cfg.torch_device)
            try:
                out = build_runner(variant, data, cfg.torch_device).call()
                torch.cuda.synchronize()
            except Exception as err:  # turned into the flag's error message
                return [f"head_dim {dim}: {type(err).__name__}: {err}"[:500]]
            if not torch.isfinite(out).all():
                return [f"head_dim {dim}: non-finite output on a tiny input"]
    return []


# ---------------------------------------------------------------------------- the result


def _method(cfg: KernelBenchConfig) -> dict[str, Any]:
    from sageserve.bench import kernels_decode, kernels_prefill, kernels_store

    return {
        "timing": "CUDA events around `calls_per_sample` back-to-back calls after a device "
        "synchronize (CPU: perf_counter); warmup calls first; median of --repeats samples; "
        "variants (and our store kernels, timed apart) sampled round-robin within a shape",
        "tops": "4·B·H·N²·D / time with H query heads, halved for causal",
        "accuracy": "fp64 attention (sageserve.bench.kernels_common.reference_attention) of "
        "the same rounded inputs on the first sequence of each shape, every head and row; "
        "cosine similarity, relative L1 = sum|o - ref| / sum|ref|, max error / max|ref|",
        "inputs": "q, v ~ N(0, 1); k ~ N(0, 1) + 3·N(0, 1) per (KV head, channel) shared by "
        "all tokens; fresh seed per shape (row 'seed'); pages shuffled",
        "checks": "outputs NaN-poisoned before the first call, finite after; our causal "
        "prefill and decode: kernel-level calls bitwise equal to backend.forward; cosine >= "
        "0.99 (sanity)",
        "calibration": "sage_attn's key mean and Q/K channel balance from the first 512 tokens "
        "(decode: of the first sequence's keys and the step's queries), as sageserve "
        "calibrates on 512 tokens",
        "l2": "not flushed for prefill (q, k, v and caches of 16k tokens exceed the L2 several "
        "times); decode cycles through `rotation_sets` copies of the batch (>= 4x L2) so each "
        "call reads cold K/V",
        "prefill_batch": "batch = max(1, total_tokens // seq_len): above total_tokens one "
        "sequence of seq_len tokens",
        "prefill_included": {v: kernels_prefill.INCLUDED[v] for v in cfg.variants},
        "decode_included": {
            v: kernels_decode.INCLUDED["triton16" if v == "triton16" else "sage"]
            for v in cfg.decode_variants
        },
        "decode_gb_per_s": "K and V bytes of the used pages (8-bit: INT8/FP8 codes + fp16 "
        "scales; 16-bit: K and V in the dtype) / time (CUDA-graph time on GPU); 1 GB = 1e9 B",
        "store_included": {
            v: kernels_store.INCLUDED["triton16" if v == "triton16" else "sage"]
            for v in cfg.store_variants
        },
        "store_steps": f"<= {kernels_store.DECODE_MAX_TOKENS} tokens: a decode step (one new "
        "token per sequence, each at a random offset of its own page), timed as CUDA-graph "
        "replays on GPU with K/V in L2 (as the QKV projection leaves them); more: a prefill "
        f"step (sequences of up to {kernels_store.PREFILL_SEQ} tokens from a page boundary, "
        "pages shuffled), timed eagerly (launch included) over `rotation_sets` copies (>= "
        f"{kernels_store.L2_FACTOR}x L2 of bytes moved); k contiguous, v a view of a fused "
        f"QKV output ({kernels_store.GROUP} query heads per KV head), head_dim "
        f"{kernels_store.HEAD_DIM}",
        "store_bytes": "K and V read (dtype) + cache entries written (8-bit: INT8/FP8 codes "
        "and fp16 scales; 16-bit: K and V in the dtype) + int64 slot indices read (8-bit: "
        "page and offset) + the 8-bit store's fp32 key mean and balance [Hkv, D]; bound_us = "
        "those bytes at the copy bandwidth",
        "store_checks": "the poisoned cache equals the poison plus the reference at the "
        "step's slots, bit for bit (8-bit: reference.quantize_kv; 16-bit: K/V in the "
        "cache dtype); backend.forward for the same step writes the same bits",
    }


# ---------------------------------------------------------------------------- running


def _run_prefill(cfg, timer, result, out) -> None:
    from sageserve.bench.kernels_prefill import bench_shape, make_shape
    from sageserve.bench.kernels_report import progress_line

    settings = {"total_tokens": cfg.total_tokens, "q_heads": Q_HEADS, "kv_heads": cfg.kv_heads,
                "page_size": cfg.page_size, "dtype": cfg.torch_dtype, "seed": cfg.seed}  # fmt: skip
    for dim in cfg.head_dims:
        for seq in cfg.seq_lens:
            for causal in CAUSAL_MODES[cfg.causal]:
                rows = bench_shape(make_shape(dim, seq, causal, settings), list(cfg.variants),
                                   timer, cfg.torch_device)  # fmt: skip
                _after_shape(result, "prefill", rows, out, progress_line)


def _run_decode(cfg, timer, result, out) -> None:
    from sageserve.bench.kernels_decode import bench_shape, finish_rows, make_shape
    from sageserve.bench.kernels_report import progress_line

    settings = {"page_size": cfg.page_size, "dtype": cfg.torch_dtype, "seed": cfg.seed}
    cap = int(cfg.decode_mem_cap_gib * 2**30)
    for batch in cfg.decode_batches:
        for ctx in cfg.decode_contexts:
            rows = bench_shape(make_shape(batch, ctx, settings), list(cfg.decode_variants),
                               timer, cfg.torch_device, cap)  # fmt: skip
            finish_rows(rows, result["copy_bandwidth"]["gb_per_s"])
            _after_shape(result, "decode", rows, out, progress_line)


def _run_store(cfg, timer, result, out) -> None:
    from sageserve.bench.kernels_report import progress_line
    from sageserve.bench.kernels_store import bench_shape, finish_rows, make_shape

    settings = {"page_size": cfg.page_size, "dtype": cfg.torch_dtype, "seed": cfg.seed}
    for kv_heads in cfg.store_kv_heads:
        for tokens in cfg.store_tokens:
            rows = bench_shape(make_shape(tokens, kv_heads, settings), list(cfg.store_variants),
                               timer, cfg.torch_device)  # fmt: skip
            finish_rows(rows, result["copy_bandwidth"]["gb_per_s"])
            _after_shape(result, "store", rows, out, progress_line)


def _after_shape(result, part: str, rows: list[dict], out: Path, progress_line) -> None:
    """Record, print, save (a run cut short keeps what it measured), free the memory."""
    result[part] += rows
    for row in rows:
        print(progress_line(part, row), flush=True)
    write_json(result, out)
    gc.collect()  # the shape's runners, caches and graphs, before the next shape allocates
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_benchmark(cfg: KernelBenchConfig, out: Path | None) -> tuple[dict[str, Any], Path]:
    """The whole run; the result is written to `out` after every shape and at the end."""
    from sageserve.bench.kernels_report import problems
    from sageserve.bench.kernels_timing import COPY_BYTES, Timer, copy_bandwidth

    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    device = device_info(cfg.torch_device)
    out = out or default_out("kernels", device, now.strftime("%Y-%m-%d-%H%M%S"))
    result: dict[str, Any] = {
        "benchmark": "sageserve bench kernels", "date": now.isoformat(timespec="seconds"),
        "command": command_line(cfg, out), "process_argv": shlex.join(sys.argv),
        "machine": {"hostname": platform.node(), "platform": platform.platform()},
        "device": device, "software": software(), "settings": asdict(cfg),
        "method": _method(cfg), "complete": False, "prefill": [], "decode": [], "store": [],
    }  # fmt: skip
    timer = Timer(cfg.torch_device, cfg.warmup, cfg.repeats, cfg.sample_ms)
    with torch.inference_mode():
        result["copy_bandwidth"] = copy_bandwidth(timer, COPY_BYTES[cfg.device])
        if not cfg.skip_prefill:
            _run_prefill(cfg, timer, result, out)
        if not cfg.skip_decode:
            _run_decode(cfg, timer, result, out)
        if not cfg.skip_store:
            _run_store(cfg, timer, result, out)
    result["problems"] = problems(result)
    result["complete"] = True
    result["wall_s"] = time.monotonic() - started
    write_json(result, out)
    return result, out


def run(args: argparse.Namespace) -> int:
    """`sageserve bench kernels`: 0 if every variant ran and passed its checks, else 1."""
    from sageserve.bench.kernels_report import format_markdown

    cfg = config_from_args(args)
    prepare_device(cfg)
    preflight(cfg)
    result, out = run_benchmark(cfg, Path(args.out) if args.out else None)
    markdown = format_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['wall_s']:.0f} s")
    return 1 if result["problems"] else 0
