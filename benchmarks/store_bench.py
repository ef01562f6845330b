"""Time the 8-bit KV-cache store on one GPU: v1 (one program per token and KV head, copied
below as the baseline) against `sage_store.store_kv` (v2), alternating, in one process.

    PYTHONPATH=. python benchmarks/store_bench.py --out store-h100.json [--no-sweep] [--rounds 3]
    PYTHONPATH=. python benchmarks/store_bench.py --ptx   # no GPU: sm_90 PTX/SASS summary

Shapes: T in (1, 16, 256, 1024, 16384) tokens x Hkv in (8, 32) x head_dim 128, bf16 K/V as
strided views of a fused QKV output (4 query heads per KV head), pv int8 and fp8, pages of
16 and 64 tokens, mean and balance on (the `sage_attn` defaults). Slots: T <= 256 as a
decode step (one token per sequence, random pages and offsets); T >= 1024 as a prefill step
(sequences of 1024 tokens from a page boundary, shuffled pages); plus "prefill+5" at 16k,
every sequence starting at offset 5 (no tile fills a page-aligned run: v2's scattered path).

Per shape and kernel: `ms` = median over rounds of the median of CUDA-event timings with L2
flushed before each call (launch included); `graph_ms` (T <= 1024) = CUDA-graph replay of 20
calls / 20, L2 warm, no launch gaps; GB/s = (K, V read + codes, scales written + pages and
offsets read) / ms. The kernels alternate (order reversed every round). Every shape's outputs
are checked bit for bit: v2 against v1 and against `sage_reference.quantize_kv` on the GPU
(v1 divides max|x| by 127 with the approximate `div.full.f32`, so v1 may differ from the
reference in a rare scale; v2 must not: the exit code is 1 if it does).

The sweep (pv int8, both page sizes; T 256 x Hkv 8 decode, T 1024 and 16384 x Hkv 32
prefill) times v2's launch knobs (`StoreConfig`) against the default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
import triton.language as tl
from sageserve.attention.kernels import sage_store

from sageserve.attention.sage_attn.kernels.store import StoreConfig, default_config, store_kv
from sageserve.attention.sage_attn.reference import quantize_kv

DIM, GROUP = 128, 4
TOKENS, KV_HEADS, PAGES, PVS = (1, 16, 256, 1024, 16384), (8, 32), (16, 64), ("int8", "fp8")
SWEEP = {  # registers on sm_90 (benchmarks/store_bench.py --ptx) decide programs per SM
    "bt16-w4": StoreConfig(block_t=16, num_warps=4),  # 184 registers: 2 programs of 4 warps
    "bt16-w8": StoreConfig(block_t=16, num_warps=8),  # 127
    "bt16-w8-1tile": StoreConfig(block_t=16, num_warps=8, max_tiles=1),  # many short programs
    "bt32-w8-r128": StoreConfig(block_t=32, num_warps=8, maxnreg=128),
    "bt32-w8-r128-pps4": StoreConfig(block_t=32, num_warps=8, maxnreg=128, programs_per_sm=4),
    "bt32-w8-r128-1tile": StoreConfig(block_t=32, num_warps=8, maxnreg=128, max_tiles=1),
    "bt64-w16": StoreConfig(block_t=64, num_warps=16, programs_per_sm=1),  # 128: 1 program/SM
    "default-div_rn": None,  # default_config(page) with fast_div=False
}
SWEEP_SHAPES = ((256, 8, "decode"), (1024, 32, "prefill"), (16384, 32, "prefill"))

MIN_SCALE = tl.constexpr(2.0**-24)


# ---- v1, the baseline: sage_store.py as of commit 22a1fd8 (not in the library) -------------


@triton.jit
def _int8_codes_v1(x, max_code: tl.constexpr):
    """x: [D] fp32 -> (codes int8 [D], scale fp32) with the scale rounded through fp16."""
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / max_code, MIN_SCALE).to(tl.float16).to(tl.float32)
    y = tl.div_rn(x, tl.zeros_like(x) + scale)
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -max_code), max_code)
    return y.to(tl.int8), scale


@triton.jit
def _store_kv_kernel_v1(
    k_ptr, v_ptr, mean_ptr, balance_ptr, pages_ptr, offsets_ptr,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_BALANCE: tl.constexpr, V_FP8: tl.constexpr,
):  # fmt: skip
    """One program per (token, KV head): quantize its key and value, store them."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, head_dim)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d).to(tl.float32)
    if HAS_MEAN:
        k = k - tl.load(mean_ptr + h * head_dim + d)
    if HAS_BALANCE:
        k = tl.div_rn(k, tl.load(balance_ptr + h * head_dim + d))
    k_codes, k_scale = _int8_codes_v1(k, 127.0)
    page = tl.load(pages_ptr + t).to(tl.int64)
    off = tl.load(offsets_ptr + t)
    slot = (page * num_kv_heads + h) * page_size + off  # [page, head, offset] of the scales
    tl.store(k_cache_ptr + slot * head_dim + d, k_codes)
    tl.store(k_scale_ptr + slot, k_scale.to(tl.float16))
    v_base = v_cache_ptr + (page * num_kv_heads + h) * head_dim * page_size + off
    if V_FP8:
        amax = tl.max(tl.abs(v), axis=0)
        v_scale = tl.maximum(amax / 448.0, MIN_SCALE).to(tl.float16).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(v, tl.zeros_like(v) + v_scale), -448.0), 448.0)
        tl.store(v_base + d * page_size, y.to(tl.float8e4nv))
    else:
        v_codes, v_scale = _int8_codes_v1(v, 127.0)
        tl.store(v_base + d * page_size, v_codes)
    tl.store(v_scale_ptr + slot, v_scale.to(tl.float16))


def store_kv_v1(k, v, k_mean, balance, pages, offsets, k_cache, k_scale, v_cache, v_scale):
    """v1's launcher (same arguments as `store_kv`, no checks)."""
    tokens, heads, dim = k.shape
    _store_kv_kernel_v1[(tokens, heads)](
        k, v, k_mean, balance, pages, offsets, k_cache, k_scale, v_cache, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads=heads, page_size=k_cache.shape[2], head_dim=dim,
        HAS_MEAN=True, HAS_BALANCE=True, V_FP8=v_cache.dtype == torch.float8_e4m3fn,
    )  # fmt: skip


# ---- cases ------------------------------------------------------------------------------------


def _slots(tokens: int, page: int, layout: str, gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """(pages in the cache, [T] int64 slots = page * page_size + offset); page 0 unused."""
    if layout == "decode":
        num_pages = tokens + 1  # each sequence its own page, at a random offset
        pages = torch.randperm(tokens, generator=gen) + 1
        return num_pages, pages * page + torch.randint(0, page, (tokens,), generator=gen)
    start = 5 if layout == "prefill+5" else 0
    seq = min(tokens, 1024)
    per_seq = -(-(seq + start) // page)
    seqs = tokens // seq
    order = (torch.randperm(seqs * per_seq, generator=gen) + 1).view(seqs, per_seq)
    pos = torch.arange(start, start + seq)
    slots = order[:, pos // page] * page + pos % page
    return seqs * per_seq + 1, slots.flatten()


class Case:
    """One shape's inputs (on the GPU) and two poisoned caches, for the two kernels."""

    def __init__(
        self, tokens: int, heads: int, page: int, pv: str, layout: str, seed: int, device="cuda"
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device).manual_seed(seed)
        self.tokens, self.heads, self.page, self.pv, self.layout = tokens, heads, page, pv, layout
        q_heads = GROUP * heads
        qkv = torch.randn(tokens, q_heads + 2 * heads, DIM, generator=dev_gen, device=device)
        qkv[:, q_heads : q_heads + heads] += 2 * torch.randn(heads, DIM, generator=gen).to(device)
        qkv = qkv.to(torch.bfloat16 if device == "cuda" else torch.float32)  # CPU: interpreter
        self.k, self.v = qkv[:, q_heads : q_heads + heads], qkv[:, q_heads + heads :]
        self.mean = torch.randn(heads, DIM, generator=gen).to(device)
        self.balance = (torch.rand(heads, DIM, generator=gen) + 0.5).to(device)
        num_pages, slots = _slots(tokens, page, layout, gen)
        self.pages, self.offsets = (slots // page).to(device), (slots % page).to(device)
        v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.int8
        self.caches = []
        for _ in range(2):
            k_cache = torch.empty((num_pages, heads, page, DIM), dtype=torch.int8, device=device)
            v_cache = torch.empty((num_pages, heads, DIM, page), dtype=torch.int8, device=device)
            k_scale = torch.empty((num_pages, heads, page), dtype=torch.float16, device=device)
            self.caches.append((k_cache, k_scale, v_cache.view(v_dtype), k_scale.clone()))

    @property
    def bytes_moved(self) -> int:
        elems = self.tokens * self.heads * DIM
        return 2 * elems * 2 + 2 * elems + 2 * self.tokens * self.heads * 2 + 2 * self.tokens * 8

    def run(self, kernel: Callable, cache: int = 0) -> Callable[[], None]:
        args = (self.k, self.v, self.mean, self.balance, self.pages, self.offsets)
        return lambda: kernel(*args, *self.caches[cache])

    def check(self, v1: Callable, v2: Callable) -> dict[str, object]:
        """Run v1 into cache 0 and v2 into cache 1 (both freshly poisoned): bytes that differ
        v2/v1 and v2/reference (at the slots), per output."""
        for k_cache, k_scale, v_cache, v_scale in self.caches:
            k_cache.fill_(77)
            v_cache.view(torch.int8).fill_(77)
            k_scale.fill_(math.nan)
            v_scale.fill_(math.nan)
        self.run(v1, 0)()
        self.run(v2, 1)()
        ref = quantize_kv(self.k, self.v, self.mean, "fp8" if self.pv == "fp8" else "fp16",
                          self.balance)  # fmt: skip
        p, o = self.pages, self.offsets
        names = ("k_codes", "k_scale", "v_codes", "v_scale")
        out: dict[str, object] = {}
        for i, name in enumerate(names):
            a, b = _bits(self.caches[0][i]), _bits(self.caches[1][i])
            got = b[p, :, :, o] if name == "v_codes" else b[p, :, o]
            want = ref[i].half() if name.endswith("scale") else ref[i]
            out[f"{name}_v2_vs_v1"] = int((a != b).sum())
            out[f"{name}_v2_vs_ref"] = int((got != _bits(want)).sum())
        out["v2_equals_v1"] = all(out[f"{n}_v2_vs_v1"] == 0 for n in names)
        out["v2_equals_ref"] = all(out[f"{n}_v2_vs_ref"] == 0 for n in names)
        return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view (NaN poison compares equal to itself)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.uint8)


# ---- timing -----------------------------------------------------------------------------------


def _time_flushed(fn: Callable[[], None], flush: torch.Tensor, budget_ms: float = 40) -> float:
    """Median ms of fn over CUDA events, L2 flushed (a 256 MB write) before each call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    n = int(min(200, max(10, budget_ms / max(start.elapsed_time(end) / 3, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]  # fmt: skip
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[n // 2]


def _time_graph(fn: Callable[[], None], calls: int = 20) -> float:
    """ms per call of a CUDA graph replaying `calls` calls (L2 warm, no launch gaps)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _kernel(config: StoreConfig | None) -> Callable:
    return lambda *args: store_kv(*args, config=config)


def _measure(case: Case, kernels: dict[str, Callable], rounds: int, flush: torch.Tensor) -> list:
    """Alternating rounds over `kernels` (each into cache 0): one row per kernel."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    graphs: dict[str, list[float]] = {name: [] for name in kernels}
    names = list(kernels)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = case.run(kernels[name])
            times[name].append(_time_flushed(fn, flush))
            if case.tokens <= 1024:
                graphs[name].append(_time_graph(fn))
    rows = []
    for name in names:
        ms = sorted(times[name])[rounds // 2]
        row = {"kernel": name, "tokens": case.tokens, "kv_heads": case.heads, "page": case.page,
               "pv": case.pv, "layout": case.layout, "ms": ms,
               "gb_s": case.bytes_moved / ms / 1e6, "rounds_ms": times[name]}  # fmt: skip
        if graphs[name]:
            row["graph_ms"] = sorted(graphs[name])[rounds // 2]
            row["graph_gb_s"] = case.bytes_moved / row["graph_ms"] / 1e6
        rows.append(row)
    return rows


def _shapes(quick: bool):
    tokens = (1, 256, 16384) if quick else TOKENS
    for t in tokens:
        for heads in KV_HEADS:
            for pv in PVS:
                for page in PAGES:
                    yield t, heads, page, pv, "decode" if t <= 256 else "prefill"
    for page in PAGES:
        yield 16384, 32, page, "int8", "prefill+5"


def run(args: argparse.Namespace) -> int:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rows, checks, failed = [], [], False
    for i, (t, heads, page, pv, layout) in enumerate(_shapes(args.quick)):
        case = Case(t, heads, page, pv, layout, seed=i)
        v2 = _kernel(None)
        check = {"tokens": t, "kv_heads": heads, "page": page, "pv": pv, "layout": layout,
                 **case.check(store_kv_v1, v2)}  # fmt: skip
        checks.append(check)
        failed |= not check["v2_equals_ref"]
        new = _measure(case, {"v1": store_kv_v1, "v2": v2}, args.rounds, flush)
        rows += new
        speedup = new[0]["ms"] / new[1]["ms"]
        graph = "".join(f" graph {r['graph_ms'] * 1e3:7.1f} us" for r in new if "graph_ms" in r)
        print(f"T {t:6d} Hkv {heads:2d} page {page:2d} {pv:4s} {layout:9s} "
              f"v1 {new[0]['ms'] * 1e3:8.1f} us {new[0]['gb_s']:6.0f} GB/s | "
              f"v2 {new[1]['ms'] * 1e3:8.1f} us {new[1]['gb_s']:6.0f} GB/s | x{speedup:5.2f}"
              f"{graph} | v2==v1 {check['v2_equals_v1']} v2==ref {check['v2_equals_ref']}",
              flush=True)  # fmt: skip
        del case
        torch.cuda.empty_cache()
    sweep = []
    if not args.no_sweep:
        for t, heads, layout in SWEEP_SHAPES:
            for page in PAGES:
                case = Case(t, heads, page, "int8", layout, seed=100 + t + page)
                base = default_config(page)
                kernels = {"v2-default": _kernel(None)}
                for name, config in SWEEP.items():
                    config = config or StoreConfig(**{**asdict(base), "fast_div": False})
                    kernels[name] = _kernel(config)
                    check = case.check(store_kv_v1, kernels[name])
                    failed |= not check["v2_equals_ref"]
                    if not check["v2_equals_ref"]:
                        print(f"  {name}: differs from the reference: {check}")
                got = _measure(case, kernels, args.rounds, flush)
                sweep += got
                print(f"sweep T {t} Hkv {heads} page {page}: " + ", ".join(
                    f"{r['kernel']} {r['ms'] * 1e3:.1f} us ({r['gb_s']:.0f} GB/s)" for r in got),
                    flush=True)  # fmt: skip
                del case
                torch.cuda.empty_cache()
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "default_configs": {page: asdict(default_config(page)) for page in PAGES},
        "rows": rows,
        "checks": checks,
        "sweep": sweep,
        "all_v2_equal_reference": not failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}; v2 equals the reference everywhere: {not failed}")
    return 1 if failed else 0


# ---- --ptx: compile both kernels for sm_90 here, no GPU -------------------------------------


def ptx_report() -> None:
    """ptxas registers/spills, global load/store widths and `.local` use of v1 and v2."""
    import re

    sys.path.insert(0, str(Path(__file__).parent))
    from triton16_ptx_check import TARGET, _ptxas_usage, _source

    def pointers(fp8: bool) -> dict[str, object]:
        return {
            "k_ptr": "*bf16", "v_ptr": "*bf16", "mean_ptr": "*fp32", "balance_ptr": "*fp32",
            "pages_ptr": "*i64", "offsets_ptr": "*i64", "k_cache_ptr": "*i8",
            "k_scale_ptr": "*fp16", "v_cache_ptr": "*fp8e4nv" if fp8 else "*i8",
            "v_scale_ptr": "*fp16", "stride_kt": ("i32", (GROUP + 2) * 8 * DIM),
            "stride_kh": ("i32", DIM), "stride_vt": ("i32", (GROUP + 2) * 8 * DIM),
            "stride_vh": ("i32", DIM), "num_kv_heads": 8, "head_dim": DIM,
            "HAS_MEAN": True, "HAS_BALANCE": True, "V_FP8": fp8,
        }  # fmt: skip

    variants = []
    for fp8 in (False, True):
        for page in PAGES:
            variants.append((f"v1 page {page} fp8={fp8}", _store_kv_kernel_v1,
                             {**pointers(fp8), "page_size": page}, 4, None, True))  # fmt: skip
            for name, config in [("default", default_config(page)), *SWEEP.items()]:
                if config is None or (name != "default" and (fp8 or page != 64)):
                    continue
                args = {**pointers(fp8), "page_size": page, "num_tokens": ("i32", 4096),
                        "tiles_per_program": ("i32", 3), "BLOCK_T": config.block_t,
                        "RUNS": page % config.block_t == 0, "FAST_DIV": True}  # fmt: skip
                variants.append((f"v2 {name} page {page} fp8={fp8}", sage_store._store_kv_kernel,
                                 args, config.num_warps, config.maxnreg, False))  # fmt: skip
    for label, fn, args, warps, maxnreg, fusion in variants:
        options = {"num_warps": warps, "enable_fp_fusion": fusion}
        if maxnreg:
            options["maxnreg"] = maxnreg
        ptx = triton.compile(_source(fn, args), target=TARGET, options=options).asm["ptx"]

        def count(pattern: str, text: str = ptx) -> int:
            return len(re.findall(pattern, text))

        widths = {op: {} for op in ("ld", "st")}
        for op, kind in re.findall(r"\b(ld|st)\.global((?:\.\w+)*)", ptx):
            kind = kind.removeprefix(".L1::evict_last").removeprefix(".L1::evict_first")
            widths[op][kind] = widths[op].get(kind, 0) + 1
        local, div_rn, div_full = count(r"\.local"), count(r"div\.rn\.f32"), count(r"div\.full")
        print(
            f"{label:34s} ld {widths['ld']} st {widths['st']} .local {local} "
            f"div.rn {div_rn} div.full {div_full}"
        )
        print(f"{'':34s} {_ptxas_usage(ptx)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON results path (required unless --ptx)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per shape")
    parser.add_argument("--quick", action="store_true", help="T in (1, 256, 16384) only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the StoreConfig sweep")
    parser.add_argument("--ptx", action="store_true", help="compile for sm_90 here, no GPU")
    args = parser.parse_args()
    if args.ptx:
        ptx_report()
        return 0
    if args.out is None or not torch.cuda.is_available():
        parser.error("timing needs --out and a CUDA device (--ptx needs neither)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
