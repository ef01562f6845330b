"""Which launch settings bring the 8-bit decode to the 16-bit one's bandwidth? (issue 16)

At 64 × 8k on an H200 (BENCHMARKS.md, 2026-12-05) sage_attn's decode kernel read its
35.1 GB a step at 3.87 TB/s where triton's read 69.2 GB at 4.37 TB/s; sage_attn ≥ 1.55×
triton end to end needs the 8-bit kernel at ~4.4 TB/s. This probe builds the decode
shapes of `sageserve bench kernels` (Llama-3.1-8B heads, random keys with a bias, each
backend's own store, pools cycled so that L2 holds none of them) and times
`sage_decode_paged` under a grid of `DecodeConfig`s and the 16-bit `paged_decode`, every
one inside a CUDA graph, alternated in rounds. Each config's output is compared with the
default's bits (`bitwise_default`): the split count is the workspace's, the same for all,
so only settings that change an accumulation order may differ (on an H200: 8 warps, whose
P·V accumulates in another MMA layout, and the fused merge).

    PYTHONPATH=. python lab/decode_config_sweep.py --out sweep.json [--shapes 64x8192,1x8192]

`--splits 1,4,16` times, instead of the launch grid, the default and the fused merge with
the workspace's split count forced to each of those (`s4`, `s4-fused`): whether a single
stream's decode (a few µs a layer, latency-bound) gains from fewer, longer splits and one
kernel instead of two. Their outputs differ from the default's in the order of the merge.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from dataclasses import asdict, replace

import torch

from lab.sweep_record import run_sweep
from sageserve.attention.sage_attn.kernels.decode import (
    DEFAULT_CONFIG,
    DecodeConfig,
    DecodeWorkspace,
)
from sageserve.bench import kernels_decode as kd
from sageserve.bench.kernels_timing import Timed, Timer, eager_and_graph

SAGE, TRITON16 = "sage_fp16pv", "triton16"
PAGE_SIZE = 64


def configs() -> dict[str, DecodeConfig]:
    """The grid: keys per iteration, warps and pipeline stages around the default."""
    grid = {"default": DEFAULT_CONFIG}
    for block_n, warps, stages in itertools.product((64, 128), (4, 8), (3, 4, 5, 6)):
        cfg = replace(DEFAULT_CONFIG, block_n=block_n, num_warps=warps, num_stages=stages)
        if cfg != DEFAULT_CONFIG:
            grid[f"n{block_n}-w{warps}-s{stages}"] = cfg
    grid["fused-combine"] = replace(DEFAULT_CONFIG, fused_combine=True)
    # Fewer registers, more programs per SM (four at the default's 116 registers): does
    # more latency hiding reach the 16-bit kernel's bandwidth? (ptxas: 96 registers spill
    # nothing, 80 spill 16 bytes a thread.)
    for maxnreg, stages in itertools.product((96, 80), (4, 5)):
        cfg = replace(DEFAULT_CONFIG, maxnreg=maxnreg, num_stages=stages)
        grid[f"r{maxnreg}-s{stages}"] = cfg
    grid["no-fast-v-cvt"] = replace(DEFAULT_CONFIG, fast_v_cvt=False)
    return grid


def split_grid(counts: list[int]) -> dict[str, tuple[DecodeConfig, int | None]]:
    """The default and the fused merge, planned and at each forced split count."""
    fused = replace(DEFAULT_CONFIG, fused_combine=True)
    grid = {"default": (DEFAULT_CONFIG, None), "fused-combine": (fused, None)}
    for n in counts:
        grid[f"s{n}"] = (DEFAULT_CONFIG, n)
        grid[f"s{n}-fused"] = (fused, n)
    return grid


def _workspace(dec, splits: int | None, variant: kd.DecodeVariant) -> DecodeWorkspace:
    """dec's workspace, or one of the same rows and width cut into `splits` splits."""
    if splits is None:
        return dec.workspace
    batch, q_heads, _, dim = dec.workspace.acc.shape
    kv_heads = dec.workspace.counter.shape[1]
    width = dec.page_table.shape[1] * PAGE_SIZE
    return DecodeWorkspace.allocate(batch, q_heads, kv_heads, dim, width, variant.q.device,
                                    num_splits=splits)  # fmt: skip


def _sage_calls(variant: kd.DecodeVariant, config: DecodeConfig, splits: int | None = None) -> list:
    """The backend's decode call for each cycled set, with `config` instead of the default
    (and `splits` splits, when given)."""
    from sageserve.attention.sage_attn.kernels.decode import sage_decode_paged

    backend, cache, out = variant.backend, variant.cache, variant.out
    c = backend.layer_constants(0)
    caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])

    def call(dec):
        work = _workspace(dec, splits, variant)
        return lambda: sage_decode_paged(variant.q, c.balance, *caches, dec.page_table,
                                         dec.q_rows, dec.kv_len, out, work,
                                         sm_scale=c.sm_scale, config=config,
                                         rotation=backend.rotation)  # fmt: skip

    return [call(meta.kernel.decode) for meta in variant.metas]


def _graph_entry(name: str, calls: list, timer: Timer) -> Timed:
    """The CUDA-graph timing (eager only on CPU, where the probe is a smoke test)."""
    entries, error = eager_and_graph(name, calls, timer, graph=timer.cuda)
    if error:
        raise RuntimeError(f"{name}: graph capture failed: {error}")
    return entries[f"{name}:graph" if timer.cuda else f"{name}:eager"]


def sweep_shape(
    batch: int, context: int, timer: Timer, device: torch.device, splits: list[int]
) -> dict:
    """Every config (or split count) and the 16-bit kernel at one shape: µs per layer call
    and GB/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = {"seed": 0, "page_size": PAGE_SIZE, "dtype": dtype}
    shape = kd.make_shape(batch, context, settings)
    sets = kd.rotation_sets(shape, [SAGE, TRITON16], device)
    setup_rows: dict[str, dict] = {SAGE: {}, TRITON16: {}}
    built = kd._setup(shape, [SAGE, TRITON16], sets, device, setup_rows)
    if built is None:
        raise RuntimeError(f"setup failed at {batch}x{context}: {setup_rows[SAGE]}")
    variants, _ = built
    sage = variants[SAGE]
    entries = {TRITON16: _graph_entry(TRITON16, variants[TRITON16].calls, timer)}
    outputs = {}
    grid = split_grid(splits) if splits else {n: (c, None) for n, c in configs().items()}
    for name, (config, count) in grid.items():
        calls = _sage_calls(sage, config, count)
        sage.out.fill_(float("nan"))
        calls[0]()
        timer.sync()
        outputs[name] = sage.out.clone()
        entries[name] = _graph_entry(name, calls, timer)
    errors = timer.round_robin(entries)
    return _rows(shape, grid, entries, errors, outputs)


def _rows(shape, grid, entries, errors, outputs) -> dict:
    rows = {}
    for name, timed in entries.items():
        if name in errors:
            rows[name] = {"error": errors[name]}
            continue
        variant = TRITON16 if name == TRITON16 else SAGE
        kv_bytes = shape.used_tokens * shape.bytes_per_token(variant)
        rows[name] = {"us": timed.median_ms * 1e3, "samples_ms": timed.samples_ms,
                      "gb_per_s": kv_bytes / (timed.median_ms * 1e6)}  # fmt: skip
        if name in grid:
            rows[name]["config"] = asdict(grid[name][0]) | {"splits": grid[name][1]}
            rows[name]["bitwise_default"] = torch.equal(outputs[name], outputs["default"])
            rows[name]["finite"] = bool(torch.isfinite(outputs[name]).all())
    return {"shape": shape.describe(), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="64x8192,16x8192,1x8192")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (interpreter)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--splits", default="", help="e.g. 1,4,16: the split-count grid")
    args = parser.parse_args()
    splits = [int(n) for n in args.splits.split(",") if n]
    device = torch.device(args.device)
    timer = Timer(device, warmup=3, repeats=args.repeats, sample_ms=20.0)
    measure = functools.partial(sweep_shape, timer=timer, device=device, splits=splits)
    run_sweep("decode config sweep (issue 16)", args.shapes, args.out, timer, measure, _print)
    return 0


def _print(shape_result: dict, copy_gb_per_s: float) -> None:
    s = shape_result["shape"]
    print(f"{s['batch']} x {s['context']}:")
    for name, row in sorted(shape_result["rows"].items(), key=lambda kv: kv[1].get("us", 1e9)):
        if "error" in row:
            print(f"  {name:16s} error {row['error'][:100]}")
            continue
        same = "" if row.get("bitwise_default", True) else "  NOT BITWISE"
        print(f"  {name:16s} {row['us']:8.1f} us  {row['gb_per_s']:6.0f} GB/s "
              f"({row['gb_per_s'] / copy_gb_per_s:.0%}){same}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
