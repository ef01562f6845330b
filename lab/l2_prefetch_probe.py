"""Can a layer's small decode GEMMs read their weights from L2, prefetched under attention?
(issue 16, single-stream decode at 85% of the weight-read bound)

At batch 1 the small products reach only part of the copy bandwidth (H200, 2026-12-05,
`gemv-probe-h200-2026-12-05.json`): o_proj (4096 × 4096, 33.5 MB) 0.58, qkv_proj (50 MB)
0.74: the memory system does not get to full speed in 12-16 µs. Before o_proj a decode step
runs attention, which at short contexts reads a few MB and leaves HBM mostly idle. This
probe asks whether prefetching o_proj's weights into L2 on a side stream, while attention
runs, makes attention + o_proj shorter. Attention is stood in for by `torch.cuda._sleep`
(a spin kernel: SM time, no memory traffic) of a chosen length.

For each stand-in length, three sequences are captured in CUDA graphs and alternated,
each cycling through enough weight copies that L2 never holds the next one by accident:
- `plain`: wait, then `F.linear(x, W)` (cuBLAS), as the engine runs today;
- `prefetch_load`: a Triton kernel on a side stream reads W with `evict_last` loads while
  the wait runs; then `F.linear`;
- `prefetch_ptx`: the same with `prefetch.global.L2` per 128-byte line (no data comes into
  the SMs' registers).
Reported: µs per (wait + GEMM), and the GEMM's share against the wait alone.

    PYTHONPATH=. python lab/l2_prefetch_probe.py --out l2.json
    TRITON_INTERPRET=0 PYTHONPATH=. python lab/l2_prefetch_probe.py --compile  # no GPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sageserve.bench.kernels_timing import Timed, Timer, copy_bandwidth
from sageserve.bench.run_record import device_info, software

SHAPES = {"o_proj": (4096, 4096), "qkv_proj": (6144, 4096)}
WAITS_US = (0.0, 5.0, 10.0, 20.0)
L2_DEFEAT_BYTES = 512 << 20
BLOCK = 8192  # bf16 elements per prefetch program (16 KB)
LINE_ELEMENTS = 64  # bf16 elements per 128-byte line


@triton.jit
def _prefetch_load_kernel(w_ptr, sink_ptr, numel, BLOCK: tl.constexpr):
    """Reads BLOCK elements with evict_last; one float per program goes to the sink, so the
    loads are not removed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0, eviction_policy="evict_last")
    tl.store(sink_ptr + tl.program_id(0), tl.sum(w.to(tl.float32), axis=0))


@triton.jit
def _prefetch_ptx_kernel(w_ptr, sink_ptr, numel, BLOCK: tl.constexpr, LINE: tl.constexpr):
    """`prefetch.global.L2` for every 128-byte line of BLOCK elements."""
    lines = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK // LINE) * LINE
    ptrs = w_ptr + tl.minimum(lines, numel - 1)
    done = tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip
    tl.store(sink_ptr + tl.program_id(0), tl.sum(done, axis=0).to(tl.float32))


def prefetch(w: torch.Tensor, sink: torch.Tensor, kind: str) -> None:
    """Start pulling w's bytes into L2 (w contiguous bf16; sink: >= programs fp32)."""
    grid = (triton.cdiv(w.numel(), BLOCK),)
    if kind == "load":
        _prefetch_load_kernel[grid](w, sink, w.numel(), BLOCK=BLOCK, num_warps=8)
    else:
        _prefetch_ptx_kernel[grid](w, sink, w.numel(), BLOCK=BLOCK, LINE=LINE_ELEMENTS,
                                   num_warps=4)  # fmt: skip


def _cycles(wait_us: float) -> int:
    clock_khz = torch.cuda.get_device_properties(0).clock_rate
    return int(wait_us * clock_khz / 1e3)


def _step(kind: str, x, w, y, sink, wait_cycles: int, side: torch.cuda.Stream) -> Callable:
    """One (wait, GEMM) with or without a prefetch of w on the side stream."""

    def run() -> None:
        main = torch.cuda.current_stream()
        if kind != "plain":
            side.wait_stream(main)
            with torch.cuda.stream(side):
                prefetch(w, sink, kind.removeprefix("prefetch_"))
        if wait_cycles:
            torch.cuda._sleep(wait_cycles)
        if kind != "plain":
            main.wait_stream(side)
        torch.mm(x, w.t(), out=y)

    return run


def _graph(calls: list[Callable]) -> torch.cuda.CUDAGraph:
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def measure(name: str, wait_us: float, timer: Timer) -> dict:
    n, k = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(n + int(wait_us))
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(copies)]  # fmt: skip
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    sink = torch.empty(triton.cdiv(n * k, BLOCK), device="cuda", dtype=torch.float32)
    side, cycles = torch.cuda.Stream(), _cycles(wait_us)
    row: dict = {"shape": name, "n": n, "k": k, "wait_us": wait_us, "weight_copies": copies}
    entries, want = {}, F.linear(x, weights[0]).float()
    for kind in ("plain", "prefetch_load", "prefetch_ptx"):
        calls = [_step(kind, x, w, y, sink, cycles, side) for w in weights]
        y.fill_(float("nan"))
        calls[0]()
        torch.cuda.synchronize()
        row[f"{kind}_max_abs_error"] = float((y.float() - want).abs().max())
        graph = _graph(calls)
        entries[kind] = Timed(graph.replay, per_call=len(calls))
        timer.plan(entries[kind])
    sleep_calls = [lambda: torch.cuda._sleep(cycles)] * copies if cycles else None
    if sleep_calls:
        entries["wait_alone"] = Timed(_graph(sleep_calls).replay, per_call=copies)
        timer.plan(entries["wait_alone"])
    errors = timer.round_robin(entries)
    for kind, timed in entries.items():
        row[f"{kind}_us"] = None if kind in errors else timed.median_ms * 1e3
    return row


def compile_only() -> int:
    """Compile both prefetch kernels for sm_90 (no GPU) and show the PTX's prefetches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    sig = {"w_ptr": "*bf16", "sink_ptr": "*fp32", "numel": "i32"}
    kernels = [(_prefetch_load_kernel, {"BLOCK": BLOCK}),
               (_prefetch_ptx_kernel, {"BLOCK": BLOCK, "LINE": LINE_ELEMENTS})]  # fmt: skip
    for kernel, consts in kernels:
        src = ASTSource(kernel, {**sig, **{c: "constexpr" for c in consts}}, constexprs=consts)
        ptx = triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]
        ops = [line.split("//")[0].strip().removeprefix("@") for line in ptx.splitlines()]
        ops = [op.split(maxsplit=1)[-1] if op.startswith("%p") else op for op in ops]
        ops = [op for op in ops if op.startswith(("prefetch", "ld.global"))]
        kinds = sorted({op.split()[0] for op in ops})
        print(f"{kernel.__name__}: {len(ops)} instructions of kinds {kinds}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="compile only (no GPU)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.compile:
        return compile_only()
    timer = Timer(torch.device("cuda"), warmup=3, repeats=7, sample_ms=20.0)
    result = {"probe": "L2 prefetch under attention (issue 16)", "command": shlex.join(sys.argv),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": device_info(torch.device("cuda")), "software": software(),
              "copy": copy_bandwidth(timer, 2 << 30), "rows": []}  # fmt: skip
    for name in SHAPES:
        for wait_us in WAITS_US:
            result["rows"].append(measure(name, wait_us, timer))
            print(json.dumps({k: v for k, v in result["rows"][-1].items() if "us" in k}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
