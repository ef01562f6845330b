"""Probe: the host time of each backend's attention call outside its Triton launches (CPU).

Issue 16's 32-client ITL p99 is 3.5x p50 on sage_attn and 2.2x on triton (H100,
2026-12-06), and an H200 probe found sage_attn's mixed steps (31 decodes + a prompt) leaving
the GPU idle ~20 ms where triton's did not. Inside piecewise CUDA graphs the attention runs
eagerly between the graphed pieces, so its host time per layer paces a mixed step once it
exceeds the GPU's time per layer. This measures the part of that host time that is ours:
every Triton kernel launch is replaced by a no-op (`JITFunction.run` / the interpreter's
`__getitem__`), and `backend.forward` of one layer is timed on a mixed batch shaped like
Llama-3.1-8B's (32 query heads, 8 KV heads, head_dim 128): 31 decodes at 1024 tokens and
one 256-token chunk over 768 cached ones. What is left is Python: argument checks, launch
configurations, descriptors, allocations and views. Triton's own launch cost (its argument
specialization, ~50-100 µs a launch under cProfile on an H200) is not in it.

With `--device cuda` nothing is stubbed: the same call is timed on the host with Triton's
launcher included (`lab/host_timing.py`: the GPU synchronized outside the clock every few
calls, so that a full launch queue never blocks the host), and the launches per call are
counted. Run both modes on the same machine (the stubbed one needs only its CPU): the
difference is what Triton's launch path costs per layer.

`--breakdown N` then runs N more calls under cProfile and lists the functions with the
most cumulative time per call (Triton's binder, cache key, launcher and TMA-descriptor
encoding among them). cProfile inflates every figure; the shares are what it is for.

`--call attend_stored` times what a piecewise step launches between its pieces when the
backend stores K/V inside them (`backend.attend_stored` into a given output) instead of
`backend.forward` (store and attention, a new output); `--call both` alternates the two.

`--call decode` (CUDA only) prices the next candidate: the 31 decode rows' attention alone
(split and merge kernels, `attend_stored` over decode-only metadata), launched eagerly
against the same launches captured once in a CUDA graph and replayed (as per-layer graphs
over the decode graphs' static tables would do in a mixed step).

    PYTHONPATH=. python lab/host_wrapper_probe.py [--repeats 2000] [--device cuda]
        [--breakdown 500] [--call forward|attend_stored|both|decode]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys

if "cuda" not in sys.argv:  # before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton

from lab.host_timing import host_seconds_per_call
from sageserve.bench.kernels_common import make_backend, model_config

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 64
VARIANTS = ("triton16", "sage_fp16pv", "sage_fp16pv_bfly")


def _no_launches() -> list[int]:
    """Every `kernel[grid](...)` call returns at once (interpreter and compiled kinds),
    adding one to the returned counter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counter = [0]

    def count(self, *args, **kwargs) -> None:
        counter[0] += 1

    JITFunction.run = count
    InterpretedFunction.run = count
    return counter


def _mixed_batch(device: torch.device):
    """31 decodes at 1024 tokens, then a 256-token chunk over 768 cached tokens."""
    from sageserve.attention.batch import SequenceSlice, build_forward_batch

    pages = 1024 // PAGE
    tables = [tuple(range(1 + i * pages, 1 + (i + 1) * pages)) for i in range(32)]
    slices = [SequenceSlice(t, 1023, 1) for t in tables[:31]]
    slices.append(SequenceSlice(tables[31], 768, 256))
    ids = [[0] * s.query_len for s in slices]
    return build_forward_batch(slices, ids, [], PAGE, device), 32 * pages + 1


def _decode_rows(variant: str, repeats: int, device: torch.device, counter) -> dict:
    """The mixed batch's 31 decodes alone: attend_stored launched eagerly, then captured in
    a CUDA graph and replayed; host µs per call of each (CUDA only)."""
    from sageserve.attention.batch import build_forward_batch

    backend = make_backend(variant, model_config(Q_HEADS, KV_HEADS, HEAD_DIM), torch.float16,
                           device)  # fmt: skip
    mixed, num_pages = _mixed_batch(device)
    decodes = [s for s in mixed.seqs if s.query_len == 1]
    batch = build_forward_batch(decodes, [[0]] * len(decodes), [], PAGE, device)
    cache = backend.allocate(num_pages, PAGE)
    q = torch.randn(len(decodes), Q_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
    out = torch.randn_like(q)
    meta = backend.build_metadata(batch)

    def eager():
        backend.attend_stored(0, q, cache, meta, out)

    for _ in range(20):
        eager()
    before = counter[0]
    eager()
    launches = counter[0] - before
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    rows = {"launches": launches}
    for name, call in (("eager", eager), ("graph", graph.replay), ("eager_again", eager)):
        rows[f"{name}_us"] = host_seconds_per_call(call, repeats, device) * 1e6
    return rows


def _count_launches() -> list[int]:
    """Wrap `JITFunction.run` so every launch adds one to the returned counter."""
    from triton.runtime.jit import JITFunction

    counter, run = [0], JITFunction.run

    def counted(self, *args, **kwargs):
        counter[0] += 1
        return run(self, *args, **kwargs)

    JITFunction.run = counted
    return counter


def _breakdown(call, calls: int, top: int = 25) -> list[dict]:
    """The `top` functions by cumulative time over `calls` calls under cProfile: µs and
    calls per call of `call`."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    ranked = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)[:top]
    return [{"function": f"{os.path.basename(f)}:{line}({name})",
             "calls_per_call": nc / calls, "cum_us_per_call": 1e6 * ct / calls}
            for (f, line, name), (_, nc, _, ct, _) in ranked]  # fmt: skip


def _time(variant: str, repeats: int, device: torch.device, counter=None,
          breakdown: int = 0, attend_stored: bool = False) -> dict:  # fmt: skip
    cfg = model_config(Q_HEADS, KV_HEADS, HEAD_DIM)
    backend = make_backend(variant, cfg, torch.float16, device)
    batch, num_pages = _mixed_batch(device)
    cache = backend.allocate(num_pages, PAGE)
    tokens = 31 + 256
    q = torch.randn(tokens, Q_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
    v = torch.randn_like(k)
    out = torch.randn_like(q)
    meta = backend.build_metadata(batch)

    def call():
        if attend_stored:
            backend.attend_stored(0, q, cache, meta, out)
        else:
            backend.forward(0, q, k, v, cache, meta)

    for _ in range(20):
        call()
    launches = None
    if counter is not None:
        before = counter[0]
        call()
        launches = counter[0] - before
    per_layer = host_seconds_per_call(call, repeats, device)
    row = {"us_per_layer": per_layer * 1e6, "us_per_step_32_layers": per_layer * 32e6}
    if launches is not None:
        row["launches_per_layer"] = launches
    if breakdown:
        row["cprofile_top"] = _breakdown(call, breakdown)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="CALLS",
        help="then profile this many calls with cProfile (0: none)",
    )
    parser.add_argument(
        "--call", default="forward", choices=["forward", "attend_stored", "both", "decode"]
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternations of every timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    counter = _count_launches() if device.type == "cuda" else _no_launches()
    torch.set_num_threads(1)
    head = {"triton": triton.__version__, "torch": torch.__version__, "device": args.device}
    if args.call == "decode":
        if device.type != "cuda":
            parser.error("--call decode captures a CUDA graph: it needs --device cuda")
        rows = {v: _decode_rows(v, args.repeats, device, counter) for v in VARIANTS}
        print(json.dumps(head | rows, indent=1))
        return
    calls = ["forward", "attend_stored"] if args.call == "both" else [args.call]
    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            for call in calls:
                row = _time(variant, args.repeats, device, counter, args.breakdown,
                            attend_stored=call == "attend_stored")  # fmt: skip
                rows.setdefault(f"{variant} {call}", []).append(row)
    print(json.dumps(head | rows, indent=1))


if __name__ == "__main__":
    main()
