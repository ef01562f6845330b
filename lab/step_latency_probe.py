"""Two latencies issue 16 misses, on one CUDA GPU with dummy weights of a real architecture.

1. **First request after warm-up.** Through HTTP the first request's TTFT was ~7x a steady
   one even with the warm-up. Here, without HTTP: an engine (warm-up on) gets prompts one at
   a time, each alone; prints each request's TTFT (add_request to its first token) so the
   first of each length can be compared with the next ones.
2. **A prefill arriving while a batch decodes.** B requests decode; one new prompt arrives.
   Each `step()` call is timed (synchronized), before, during and after the prompt's
   prefill, and the mixed step is profiled (GPU busy vs wall, kernels): is it GPU work
   (the prefill's FLOPs) or host work (an eager step's launches)?

    PYTHONPATH=. python lab/step_latency_probe.py --backend triton --out probe.json
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
import warnings
from dataclasses import replace
from datetime import UTC, datetime

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_decode import _busy_us, _kernel_intervals, _top_kernels
from sageserve.bench.run_record import device_info, software
from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import load_model

FIRST_LENGTHS = (1024, 1024, 1024, 700, 700, 3000, 3000, 37, 37)


def _prompt(engine: Engine, n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.info.vocab_size, (n,), generator=generator).tolist()


def first_requests(engine: Engine) -> list[dict]:
    """TTFT of prompts sent one at a time to an idle engine, in FIRST_LENGTHS order."""
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    rows = []
    for i, n in enumerate(FIRST_LENGTHS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        request_id = engine.add_request(_prompt(engine, n, 1000 + i), params)
        ttft = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and ttft is None and out.token_ids:
                    ttft = time.perf_counter() - start
        rows.append({"input_len": n, "ttft_ms": 1e3 * ttft})
        print(f"first-requests: {n:5d} tokens, TTFT {1e3 * ttft:7.1f} ms", flush=True)
    engine.flush_prefix_cache()
    return rows


def _timed_step(engine: Engine) -> tuple[float, int]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start), engine.stats().num_running


def decoding(engine: Engine, batch: int, input_len: int) -> None:
    """`batch` requests of `input_len` random tokens queued and stepped until each decodes."""
    params = SamplingParams(temperature=0, max_new_tokens=4096, ignore_eos=True)
    waiting = {engine.add_request(_prompt(engine, input_len, i), params) for i in range(batch)}
    while waiting:
        for out in engine.step():
            if out.metrics.first_token_time is not None:
                waiting.discard(out.request_id)
    for _ in range(8):
        engine.step()


def mixed_steps(engine: Engine, batch: int, input_len: int, new_len: int) -> dict:
    """Step times around one new prompt's prefill while `batch` requests decode."""
    params = SamplingParams(temperature=0, max_new_tokens=4096, ignore_eos=True)
    decoding(engine, batch, input_len)
    decode = [_timed_step(engine)[0] for _ in range(10)]
    engine.add_request(_prompt(engine, new_len, 99), params)
    around = [_timed_step(engine) for _ in range(6)]
    engine.add_request(_prompt(engine, new_len, 98), params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled_ms, _ = _timed_step(engine)
        profiled_ms2, _ = _timed_step(engine)
    engine.add_request(_prompt(engine, new_len, 97), params)
    free_running = _free_running_steps(engine, 8)
    engine.add_request(_prompt(engine, new_len, 96), params)
    host = cProfile.Profile()
    host.enable()
    host_ms = [_timed_step(engine)[0] for _ in range(2)]
    host.disable()
    for request_id in engine.request_ids():
        engine.abort(request_id)
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
    return {"host_profiled_steps_ms": host_ms, "host_top": text.getvalue(),
        "batch": batch, "input_len": input_len, "new_prompt_len": new_len,
        "decode_step_ms": decode, "steps_after_arrival": around,
        "profiled_steps_ms": [profiled_ms, profiled_ms2], **_gpu_busy(prof, steps=2),
        "free_running_steps": free_running,
    }  # fmt: skip


def _free_running_steps(engine: Engine, count: int) -> list[dict]:
    """`count` steps as the server runs them, nothing synchronized: each one's kind, wall
    and device-wait ms (`Engine.last_step`). A step whose call waited ~0 for the device was
    host-bound: its launches took longer than the device's previous step."""
    rows = []
    for _ in range(count):
        syncs = _synchronizing_calls(engine)
        t = engine.last_step
        rows.append({"kind": t.kind, "prefill_tokens": t.prefill_tokens, "wall_ms": 1e3 * t.wall_s,
                     "device_wait_ms": 1e3 * t.device_wait_s, "syncs": syncs})  # fmt: skip
        print(f"free-running step: {rows[-1]}", flush=True)
    return rows


def _gpu_busy(prof: profile, steps: int) -> dict:
    """GPU busy time, kernel count and top kernels of the profiled steps (profile_decode's
    own arithmetic)."""
    intervals = _kernel_intervals(prof)
    window_us = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    return {"gpu_busy_ms": _busy_us(intervals) / 1e3, "kernels": len(intervals),
            "window_ms": window_us / 1e3,
            "top_kernels": _top_kernels(intervals, steps, 20)}  # fmt: skip


def _synchronizing_calls(engine: Engine) -> list[str]:
    """One `step()` under torch's sync debug mode: where each call that waited for the
    device came from (file:line of the innermost sageserve frame). The read-back of the
    step in flight is one; any other is a hidden wait inside planning or launching."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="llama-3.1-8b")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--batch", type=int, default=31)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--new-len", type=int, default=1024)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = EngineConfig(model_path=args.model_path, load_format="dummy")
    loaded = load_model(config.model_path, load_format="dummy", device=config.torch_device())
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(config.torch_device()),
              "software": software(), "backend": args.backend}  # fmt: skip
    with Engine(replace(config, attention_backend=args.backend), loaded) as engine:
        result["first_requests"] = first_requests(engine)
        result["mixed"] = mixed_steps(engine, args.batch, args.input_len, args.new_len)
    print(json.dumps({k: v for k, v in result["mixed"].items() if k != "host_top"}, indent=1))
    print(result["mixed"]["host_top"][:6000])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
