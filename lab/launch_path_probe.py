"""Where does a Triton launch's host time go? (issue 16: mixed steps are host-bound.)

`host_wrapper_probe --device cuda` found ~50 µs of host time per Triton launch on an H100
machine (BENCHMARKS.md, 2026-12-06 evening): over a 32-layer mixed step that is 7-9 ms of
eager attention launches. This times, on one CUDA GPU, the host side of launching one small
kernel shaped like ours (the sage_attn store's argument list: 10 tensors, 6 ints, 12
constexprs; and the same with two host TMA descriptors, as the prefill kernels take) in
three ways, alternated:

- `jit`: `kernel[grid](...)`, Triton's normal path (binding and specializing every
  argument, the cache key, the launcher);
- `compiled`: the `CompiledKernel` that the first launch returned, launched as
  `compiled[grid](...)`: no binding, specialization or cache lookup (valid only while
  every argument would specialize the same way, which this probe keeps true);
- `compiled_stream`: the same with the stream passed in, not looked up per launch.

Host µs per launch: launches back to back, the GPU synchronized every few launches outside
the clock (`lab/host_timing.py`). The kernel's own work is a few bytes, so the GPU never
holds the host.

    PYTHONPATH=. python lab/launch_path_probe.py --out launch-path.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lab.host_timing import host_seconds_per_call
from sageserve.bench.run_record import device_info, software


@triton.jit
def _many_args_kernel(
    a, b, c, d, e, f, g, h, i, j, n0, n1, n2, n3, n4, n5,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
    C8: tl.constexpr, C9: tl.constexpr, C10: tl.constexpr, C11: tl.constexpr,
):  # fmt: skip
    """Writes one value so that the launch is not a no-op; reads nothing else."""
    x = tl.load(a) + n0 + C0
    tl.store(j, x)


@triton.jit
def _descriptor_kernel(desc_k, desc_v, out, n0, BLOCK: tl.constexpr, D: tl.constexpr):
    """Loads one [BLOCK, D] box of each descriptor and writes one value."""
    k = desc_k.load([0, 0])
    v = desc_v.load([0, 0])
    tl.store(out, tl.sum(k.to(tl.float32)) + tl.sum(v.to(tl.float32)) + n0)


# A CompiledKernel's launcher reads all three grid sizes (`kernel[grid]` pads them itself).
GRID3 = (8, 1, 1)


def _many_args_variants() -> dict:
    tensors = [torch.randn(64, device="cuda") for _ in range(10)]
    ints = [3, 5, 7, 9, 11, 13]
    consts = dict(zip([f"C{i}" for i in range(12)], range(1, 13), strict=True))
    grid = (8,)
    compiled = _many_args_kernel[grid](*tensors, *ints, **consts)
    ordered = [*tensors, *ints, *consts.values()]
    stream = torch.cuda.current_stream().cuda_stream
    return {
        "jit": lambda: _many_args_kernel[grid](*tensors, *ints, **consts),
        "compiled": lambda: compiled[GRID3](*ordered),
        "compiled_stream": lambda: compiled[GRID3](*ordered, stream=stream),
    }


def _descriptor_variants() -> dict:
    cache = torch.randn(4096, 1024, device="cuda", dtype=torch.float16)
    descs = [TensorDescriptor(cache, [4096, 1024], [1024, 1], [64, 128]) for _ in range(2)]
    out = torch.empty(1, device="cuda")
    grid = (8,)
    compiled = _descriptor_kernel[grid](*descs, out, 3, BLOCK=64, D=128)
    stream = torch.cuda.current_stream().cuda_stream
    return {
        "jit": lambda: _descriptor_kernel[grid](*descs, out, 3, BLOCK=64, D=128),
        "compiled": lambda: compiled[GRID3](*descs, out, 3, 64, 128),
        "compiled_stream": lambda: compiled[GRID3](*descs, out, 3, 64, 128, stream=stream),
    }


def measure(variants: dict, launches: int, rounds: int) -> dict:
    device = torch.device("cuda")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for launch in variants.values():
        launch()
    for _ in range(rounds):
        for name, launch in variants.items():
            samples[name].append(1e6 * host_seconds_per_call(launch, launches, device))
    return {name: {"median_us": sorted(s)[len(s) // 2], "samples_us": s}
            for name, s in samples.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(torch.device("cuda")),
              "software": software(), "triton": triton.__version__}  # fmt: skip
    result["many_args"] = measure(_many_args_variants(), args.launches, args.rounds)
    result["two_descriptors"] = measure(_descriptor_variants(), args.launches, args.rounds)
    for kernel in ("many_args", "two_descriptors"):
        print(kernel, {k: round(v["median_us"], 1) for k, v in result[kernel].items()})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
