"""Where a decode step's time goes, on one CUDA GPU (dummy weights of a real architecture).

For each backend and batch size: queue B greedy requests of --input-len random tokens, step
until every one has its first token, then record --steps decode steps under the torch
profiler (CUDA kernels and host ops). Reports per step: wall time, GPU busy time (the union
of kernel intervals) and idle time between kernels (split into launch gaps of up to
LAUNCH_GAP_US and longer waits for the host), the busy fraction of the window, kernel
launches, and the kernels that take the most GPU time; plus the host functions that take
the most time in the same steps (cProfile). One JSON with the device, versions, date and command.

The profiler's tracing adds host and GPU time of its own (~0.45 ms per step at batch 1 on an
H100: 6.59 ms profiled against 6.13 ms in `bench offline`), so the same number of steps is
also timed just before, unprofiled: `idle_share_unprofiled` is 1 - the trace's busy time /
that wall time, the idle share of a step that nothing observes.

    python benchmarks/profile_decode.py --backends triton,sage_attn --batch-sizes 1,64 \
        --out profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import torch
from torch.profiler import ProfilerActivity, profile

from sageserve.bench.run_record import device_info, software
from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import load_model

# A gap between two kernels up to this long is a launch gap (measured inside CUDA graphs on
# an H200: ~0.8 µs on average over ~440 kernels); longer ones are the device waiting.
LAUNCH_GAP_US = 5.0


def _prefilled(engine: Engine, batch: int, input_len: int, steps: int) -> None:
    """B requests queued and stepped until each has produced its first token."""
    generator = torch.Generator().manual_seed(batch * 7919 + input_len)
    ids = torch.randint(0, engine.info.vocab_size, (batch, input_len), generator=generator)
    # Long enough that the first request still decodes when the last one's prefill ends
    # (chunks of chunked_prefill_size tokens) and through the warm, timed and profiled steps.
    prefill_steps = -(-batch * input_len // engine.info.chunked_prefill_size)
    new_tokens = prefill_steps + 3 * steps + 64
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    waiting = {engine.add_request(prompt, params) for prompt in ids.tolist()}
    while waiting:
        for out in engine.step():
            if out.metrics.first_token_time is not None:
                waiting.discard(out.request_id)
    running = engine.stats().num_running
    if running != batch:
        raise RuntimeError(f"{running} of {batch} requests decode: the point is not measured")


def _kernel_intervals(prof: profile) -> list[tuple[float, float, str]]:
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events)


def _busy_us(intervals: list[tuple[float, float, str]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop, _ in intervals:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def _gaps_us(intervals: list[tuple[float, float, str]]) -> list[float]:
    """Idle stretches between consecutive kernels (overlapping kernels leave none)."""
    gaps, end = [], float("-inf")
    for start, stop, _ in intervals:
        if start > end > float("-inf"):
            gaps.append(start - end)
        end = max(end, stop)
    return gaps


def _idle_split(intervals, steps: int) -> dict[str, float]:
    """Idle ms per step in gaps of at most LAUNCH_GAP_US (kernel to kernel inside a graph
    or a launch sequence) and in longer ones (the device waiting for the host: between
    steps, uploads, read-backs)."""
    gaps = _gaps_us(intervals)
    short = sum(g for g in gaps if g <= LAUNCH_GAP_US)
    return {"idle_in_launch_gaps_ms_per_step": short / 1e3 / steps,
            "idle_waiting_for_host_ms_per_step": (sum(gaps) - short) / 1e3 / steps,
            "longest_gap_us": max(gaps, default=0.0)}  # fmt: skip


def _top_kernels(intervals, steps: int, top: int) -> list[dict]:
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for start, stop, name in intervals:
        total[name[:90]] += stop - start
        count[name[:90]] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    return [{"kernel": k, "us_per_step": total[k] / steps, "calls_per_step": count[k] / steps}
            for k in ranked]  # fmt: skip


def _host_top(profiler: cProfile.Profile, top: int) -> str:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _timed_steps(engine: Engine, steps: int) -> float:
    """Seconds of `steps` decode steps without the profiler (synchronized at both ends)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile_point(engine: Engine, batch: int, input_len: int, steps: int) -> dict:
    _prefilled(engine, batch, input_len, steps)
    for _ in range(3):
        engine.step()  # warm decode steps
    unprofiled_s = _timed_steps(engine, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    host = cProfile.Profile()
    host.enable()
    for _ in range(steps):
        engine.step()
    host.disable()
    for request_id in engine.request_ids():
        engine.abort(request_id)
    intervals = _kernel_intervals(prof)
    window_us = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    busy = _busy_us(intervals)
    return {
        "batch": batch, "input_len": input_len, "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "unprofiled_wall_ms_per_step": unprofiled_s * 1e3 / steps,
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "idle_share_unprofiled": 1 - busy / 1e6 / unprofiled_s,
        "gpu_idle_ms_per_step": (window_us - busy) / 1e3 / steps,
        **_idle_split(intervals, steps),
        "busy_fraction_of_window": busy / window_us if window_us else 0.0,
        "kernels_per_step": len(intervals) / steps,
        "top_kernels": _top_kernels(intervals, steps, 25),
        "host_top_functions": _host_top(host, 30),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="llama-3.1-8b")
    parser.add_argument("--backends", default="triton,sage_attn")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--disable-fused-layers", action="store_true")
    parser.add_argument("--disable-overlap-schedule", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base = EngineConfig(model_path=args.model_path, load_format="dummy",
                        fused_layers=not args.disable_fused_layers,
                        overlap_schedule=not args.disable_overlap_schedule)  # fmt: skip
    loaded = load_model(base.model_path, load_format="dummy", device=base.torch_device())
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(base.torch_device()),
              "software": software(), "points": []}  # fmt: skip
    for backend in args.backends.split(","):
        with Engine(replace(base, attention_backend=backend), loaded) as engine:
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                point = profile_point(engine, batch, args.input_len, args.steps)
                point["backend"] = backend
                result["points"].append(point)
                print(json.dumps({k: v for k, v in point.items() if k != "host_top_functions"},
                                 indent=1)[:3000])  # fmt: skip
                print(point["host_top_functions"][:2500])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
