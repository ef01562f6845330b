"""Which launch settings make the 8-bit KV store fast with the K rotation? (issue 18.)

The store rotates K by the Hadamard matrix (fp32 butterfly) before quantizing it. On an H100
(BENCHMARKS.md, 2026-12-06 evening) one layer's 16k tokens x 8 KV heads took 55.1 µs
rotated, 43.6 µs without rotation, against a 33.8 µs copy bound: the rotation costs ~11.5
µs, and in `bench kernels`' 1k prefill (store included) the store is a quarter of the time,
which is where issue 18's "kernel cost <= 5%" is missed. The default launch
(`store.default_config`: 32-token tiles, 8 warps, two programs per SM, 128 registers) was
chosen without the rotation. This times `store_kv` under a grid of `StoreConfig`s, rotated
and not, on `sageserve bench kernels`' store inputs (fresh K with a per-channel bias, V a
strided view of a fused QKV output, the backend's calibration and slots), inside CUDA graphs
that cycle enough copies of the step that L2 holds none, alternated in rounds. Every
setting's cache must equal the default setting's bit for bit (a launch setting never
changes a code).

    PYTHONPATH=. python lab/store_config_sweep.py --out store-sweep.json [--shapes 16384x8]
        [--variants sage_fp16pv,sage_fp16pv_tcrot,sage_fp16pv_norot] [--configs t64-w8-p1,...]

`--variants` adds `bench kernels`' store variants, e.g. `sage_fp16pv_tcrot` (K rotated by a
tensor-core product: one wgmma per tile from 64-token tiles on sm_90, mma.sync below);
`--configs` keeps only the named grid settings (the default is always timed).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from dataclasses import asdict

import torch

from lab.sweep_record import run_sweep
from sageserve.attention.sage_attn.kernels.store import (
    CPU_SMS,
    StoreConfig,
    default_config,
    store_kv,
)
from sageserve.attention.triton_common import sm_count
from sageserve.bench import kernels_store as ks
from sageserve.bench.kernels_timing import Timer, eager_and_graph

VARIANTS = ("sage_fp16pv", "sage_fp16pv_norot")
PAGE_SIZE = 64


def configs(keep: set[str] | None = None) -> dict[str, StoreConfig | None]:
    """None: the library's choice for the launch (`default_config`); then the grid (only
    the settings named in `keep`, when given)."""
    grid: dict[str, StoreConfig | None] = {"default": None}
    for block_t, warps, per_sm in itertools.product((16, 32, 64, 128), (4, 8), (1, 2, 4)):
        for maxnreg in (None, 128):
            name = f"t{block_t}-w{warps}-p{per_sm}" + ("-r128" if maxnreg else "")
            if name in keep if keep is not None else block_t < 128:
                grid[name] = StoreConfig(block_t, warps, maxnreg, programs_per_sm=per_sm)
    return grid


def _calls(variant: ks.StoreVariant, steps: list, config: StoreConfig | None) -> list:
    """Layer 0's store of every cycled step, as the backend's forward makes it, but with
    `config` (None: the default)."""
    backend = variant.backend
    c = backend.layer_constants(0)
    caches = variant.layer_tensors()

    def call(step, meta):
        return lambda: store_kv(step.k, step.v, c.k_mean, c.balance, meta.store_pages,
                                meta.store_offsets, *caches, config=config,
                                rotation=backend.rotation)  # fmt: skip

    return [call(step, meta) for step, meta in zip(steps, variant.metas, strict=True)]


def _cache_after(variant: ks.StoreVariant, call) -> list[torch.Tensor]:
    """The layer's cache tensors after one call on a poisoned cache."""
    tensors = variant.layer_tensors()
    for t in tensors:
        t.view(torch.uint8).fill_(ks.POISON_CODE)
    call()
    return [t.view(torch.uint8).clone() for t in tensors]


def sweep_shape(
    tokens: int,
    kv_heads: int,
    timer: Timer,
    device: torch.device,
    variants: tuple[str, ...] = VARIANTS,
    keep: set[str] | None = None,
) -> dict:
    """Every setting of every variant at one shape: µs per call and GB/s moved."""
    settings = {"seed": 0, "page_size": PAGE_SIZE, "dtype": torch.bfloat16}
    shape = ks.make_shape(tokens, kv_heads, settings)
    sets = ks.rotation_sets(shape, list(variants), device)
    inputs = ks.make_inputs(shape, sets, device)
    rows: dict[str, dict] = {}
    entries = {}
    # Every variant (its cache, metadata, calibration) stays alive until the round-robin
    # below has replayed its graphs: the graphs hold raw addresses. The first GPU run
    # (H100, 2026-12-07) rebound one name to each variant in turn, which let the first
    # variant's cache be freed under its graphs, and its first replay hit an illegal
    # address; that this was the cause is not yet confirmed on a GPU.
    built = {name: ks.build_variant(name, shape, inputs, device) for name in variants}
    for name, variant in built.items():
        reference = None
        for label, config in configs(keep).items():
            calls = _calls(variant, inputs.steps, config)
            after = _cache_after(variant, calls[0])
            reference = reference or after
            key = f"{name}:{label}"
            timed, error = eager_and_graph(key, calls, timer, graph=timer.cuda)
            entries[key] = timed[f"{key}:graph" if timer.cuda else f"{key}:eager"]
            rows[key] = {"config": None if config is None else asdict(config),
                         "bitwise_default": all(torch.equal(a, b) for a, b in
                                                zip(after, reference, strict=True)),
                         "graph_error": error}  # fmt: skip
        rows[f"{name}:default"]["config"] = asdict(
            default_config(PAGE_SIZE, tokens * kv_heads, sm_count(device, CPU_SMS))
        )
    errors = timer.round_robin(entries)
    for key, timed in entries.items():
        if key in errors:
            rows[key]["error"] = errors[key]
            continue
        moved = shape.bytes_moved(key.split(":")[0])
        rows[key] |= {"us": timed.median_ms * 1e3, "samples_ms": timed.samples_ms,
                      "gb_per_s": moved / (timed.median_ms * 1e6)}  # fmt: skip
    return {"shape": shape.describe(), "rotation_sets": sets, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="16384x8,16384x32,448x8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (interpreter)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--configs", default="", help="grid settings to keep, e.g. t64-w8-p1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device, warmup=2, repeats=args.repeats, sample_ms=20.0)
    keep = set(args.configs.split(",")) if args.configs else None
    measure = functools.partial(sweep_shape, timer=timer, device=device,
                                variants=tuple(args.variants.split(",")), keep=keep)  # fmt: skip
    run_sweep("store config sweep (issue 18)", args.shapes, args.out, timer, measure, _print)
    return 0


def _print(shape_result: dict, copy_gb_per_s: float) -> None:
    s = shape_result["shape"]
    print(f"{s['tokens']} x {s['kv_heads']}:")
    timed = [kv for kv in shape_result["rows"].items() if "us" in kv[1]]
    for key, row in sorted(timed, key=lambda kv: kv[1]["us"])[:16]:
        same = "" if row["bitwise_default"] else "  NOT BITWISE"
        print(f"  {key:32s} {row['us']:8.1f} us  {row['gb_per_s']:6.0f} GB/s "
              f"({row['gb_per_s'] / copy_gb_per_s:.0%}){same}")  # fmt: skip
    for name in sorted({key.split(":")[0] for key in shape_result["rows"]}):
        row = shape_result["rows"].get(f"{name}:default", {})
        if "us" in row:
            print(f"  {name}:default {row['us']:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
