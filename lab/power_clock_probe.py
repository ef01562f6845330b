"""Does the Hadamard rotation cost the prefill kernel work, or clock speed?

Issue 18 prices the rotation at 6-9% of the Gluon prefill non-causal at head_dim 128 (`bench
kernels`), while Nsight Compute, which holds the SM clock fixed, counts the same cycles with
and without it. Rotated Q and K quantize to INT8 codes spread over the whole range, where
unrotated keys with a channel bias leave most codes small; the tensor cores draw more power
on denser operands, and a card at its power limit lowers its clock. This probe tells the two
apart. It runs, each for a fixed wall time and alternated over rounds, on one `bench kernels`
shape:

- `rotated`: the served kernel (`sage_fp16pv_gluon`), Q and K rotated;
- `unrotated`: the same kernel without rotation (`sage_fp16pv_gluon_norot`) on raw inputs;
- `unrotated_on_rotated_data`: that kernel on inputs rotated beforehand (Q H / D and K H:
  the same scores as the raw inputs, the rotated kernel's operand values, no rotation work);
- `sdpa_cudnn`, for scale,

and samples the SM clock, the board power and the clock-event reasons with `nvidia-smi`
while each runs. If the third is as slow as the first at the first's clock, the rotation's
price is power (the codes), not instructions.

    python3 lab/power_clock_probe.py --seq 32768 --causal none --out power.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import torch

from sageserve.attention.sage_attn.rotation import hadamard_matrix
from sageserve.bench.kernels_prefill import PrefillData, build_runner, make_data, make_shape
from sageserve.bench.run_record import device_info, software

QUERY = "clocks.sm,power.draw,temperature.gpu,{reasons}"
# nvidia-smi renamed the field; older drivers know only the second name.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
VARIANTS = ("rotated", "unrotated", "unrotated_on_rotated_data", "sdpa_cudnn")


def rotated_inputs(data: PrefillData) -> PrefillData:
    """q H / D and k H (exact in bf16: H is ±1 and D a power of two): (q H / D)·(k H) = q·k,
    so the unrotated kernel computes the raw inputs' attention on rotated operands."""
    d = data.shape.head_dim
    h = hadamard_matrix(d, torch.float32).to(data.q.device)
    q = (data.q.float() @ h / d).to(data.q.dtype)
    k = (data.k.float() @ h).to(data.k.dtype)
    return PrefillData(data.shape, q, k, data.v)


def runners(data: PrefillData, device: torch.device) -> dict:
    """{variant: call} of VARIANTS on this shape's inputs."""
    plan = {
        "rotated": ("sage_fp16pv_gluon", data),
        "unrotated": ("sage_fp16pv_gluon_norot", data),
        "unrotated_on_rotated_data": ("sage_fp16pv_gluon_norot", rotated_inputs(data)),
        "sdpa_cudnn": ("sdpa_cudnn", data),
    }
    return {name: build_runner(variant, d, device).call for name, (variant, d) in plan.items()}


def smi_query() -> str:
    """QUERY with the clock-event field this driver's nvidia-smi knows."""
    for field in REASON_FIELDS:
        query = QUERY.format(reasons=field)
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode == 0:
            return query
    raise RuntimeError(f"nvidia-smi knows none of {REASON_FIELDS}: {probe.stderr.strip()}")


def timed_window(call, seconds: float, query: str) -> dict:
    """Back-to-back calls for about `seconds`, with nvidia-smi sampling every 20 ms: ms per
    call (GPU events) and the samples' medians."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                            "-lms", "20"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, began = 0, time.perf_counter()
    start.record()
    while time.perf_counter() - began < seconds:
        for _ in range(4):
            call()
        calls += 4
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    smi.terminate()
    samples = [line.split(", ") for line in smi.communicate()[0].splitlines()]
    samples = [s for s in samples if len(s) == 4]
    return {
        "ms_per_call": start.elapsed_time(end) / calls,
        "calls": calls,
        "sm_mhz": _median(s[0] for s in samples),
        "power_w": _median(s[1] for s in samples),
        "temperature_c": _median(s[2] for s in samples),
        "event_reasons": sorted({s[3] for s in samples}),
        "samples": len(samples),
    }


def _median(texts) -> float | None:
    """Median of the readings that are numbers ("[N/A]" and the like are left out)."""
    values = []
    for text in texts:
        try:
            values.append(float(text))
        except ValueError:
            continue
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--causal", choices=("none", "causal"), default="none")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-heads", type=int, default=32,
                        help="KV heads under 32 query heads (Llama-3.1-8B: 8)")  # fmt: skip
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    settings = {"total_tokens": 16384, "q_heads": 32, "kv_heads": args.kv_heads, "page_size": 64,
                "dtype": torch.bfloat16, "seed": 0}  # fmt: skip
    shape = make_shape(args.head_dim, args.seq, args.causal == "causal", settings)
    calls = runners(make_data(shape, device), device)
    for call in calls.values():  # compile and warm up
        call()
    query = smi_query()
    windows = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            windows[name].append(timed_window(call, args.seconds, query))
            w = windows[name][-1]
            tops = shape.flops / w["ms_per_call"] / 1e9
            print(f"{name:28s} {w['ms_per_call']:8.3f} ms {tops:6.1f} TOPS {w['sm_mhz']} MHz"
                  f" {w['power_w']} W {w['event_reasons']}", flush=True)  # fmt: skip
    record = {"probe": "power_clock_probe", "command": shlex.join(sys.argv),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": device_info(device), "software": software(), "shape": shape.describe(),
              "windows": windows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
