"""Launch settings of the small-batch GEMV with programmatic dependent launch (issue 16).

At batches of 1-8 the decode step is its weight reads, and the small products read below
the copy bandwidth (`lab/gemv_probe.py`). The served GEMV (`sageserve/layers/fused/gemv.py`) loads
its first weight tile before waiting for the kernel that writes its input, so its ramp
overlaps that kernel's tail. This times, per Llama-3.1-8B decode weight, a pair of kernels
as in a layer: the fused RMSNorm (launching its dependents at once, as served) and then the
product, inside CUDA graphs that cycle enough weight copies that L2 holds none:

- `cublas`: the norm, then `F.linear` (the engine with --disable-fused-gemv);
- `gemv_served`: the norm, then the served GEMV at its launch setting (`config_for(K, rows)`);
- `gemv_BNxBKxW`: the same with BLOCK_N x BLOCK_K x warps (`--configs`; PDL on sm_90+);
- `mma_BNxBKxWsS`: the tensor-core variant (`lab/gemv_mma.py`) with S pipeline stages
  (`--mma-configs`), at any rows up to 16.

Prints µs per pair, the weight bytes / time and its fraction of the copy bandwidth measured
in the same run; checks every product against fp32. `--rows 1,2,4,8`: the decode batches
(rows of x) to time, each product at each.

    PYTHONPATH=. python lab/pdl_gemv_probe.py --out pdl-gemv.json --configs 8x1024x4,4x2048x4
    TRITON_INTERPRET=1 PYTHONPATH=. python lab/pdl_gemv_probe.py --device cpu --out smoke.json
        (a smoke test on a tiny shape)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from lab.gemv_mma import gemv_mma
from lab.gemv_probe import L2_DEFEAT_BYTES
from lab.gemv_probe import SHAPES as GEMV_SHAPES
from sageserve.bench.kernels_timing import COPY_BYTES, Timer, copy_bandwidth, eager_and_graph
from sageserve.bench.run_record import device_info, software
from sageserve.layers.fused.add_rmsnorm import add_rmsnorm
from sageserve.layers.fused.gemv import MAX_ROWS, GemvConfig, gemv

# Llama-3.1-8B's decode products but lm_head (read at full speed already: gemv_probe).
SHAPES = [shape for shape in GEMV_SHAPES if shape[0] != "lm_head"]
SMOKE_SHAPES = [("smoke", 96, 1024)]
DEFAULT_CONFIGS = "8x1024x4,4x2048x4,2x4096x4"


def _variants(h, norm_w, weights, configs: list[GemvConfig], mma: list[str]) -> dict[str, list]:
    """label -> calls, one per weight copy, each the norm then the product. The served
    GEMV's variants only up to its MAX_ROWS; the tensor-core one (`lab/gemv_mma.py`) at
    each `mma` setting BNxBKxWsSTAGES."""

    def pair(product):
        return [lambda w=w: product(add_rmsnorm(h, None, norm_w, 1e-5)[0], w) for w in weights]

    variants = {"cublas": pair(F.linear)}
    if h.shape[0] <= MAX_ROWS:
        variants["gemv_served"] = pair(lambda x, w: gemv(x, w))
        for config in configs:
            variants[f"gemv_{config.label()}"] = pair(lambda x, w, c=config: gemv(x, w, config=c))
    for text in mma:
        setting, stages = text.split("s")
        config = GemvConfig.parse(setting)
        variants[f"mma_{text}"] = pair(lambda x, w, c=config, n=int(stages): gemv_mma(x, w, c, n))
    return variants


def _max_error(calls, w: torch.Tensor, h: torch.Tensor, norm_w: torch.Tensor) -> float:
    """The first pair's product against fp32 (largest |error| / largest |y|)."""
    out = calls[0]()
    want = F.linear(add_rmsnorm(h, None, norm_w, 1e-5)[0].float(), w.float())
    return float((out.float() - want).abs().max() / want.abs().max())


def measure_shape(name: str, n: int, k: int, rows: int, configs, mma, timer: Timer,
                  bandwidth: float, dev):  # fmt: skip
    gen = torch.Generator(device=dev).manual_seed(n + k + rows)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2))) if timer.cuda else 2
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / k**0.5
               for _ in range(copies)]  # fmt: skip
    h = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=gen)
    norm_w = (1 + 0.1 * torch.randn(k, device=dev, generator=gen)).bfloat16()
    row = {"shape": name, "n": n, "k": k, "rows": rows, "weight_copies": copies,
           "variants": {}}  # fmt: skip
    entries = {}
    for label, calls in _variants(h, norm_w, weights, configs, mma).items():
        error = _max_error(calls, weights[0], h, norm_w)
        graph_entries, graph_error = eager_and_graph(label, calls, timer, graph=True)
        entries[label] = graph_entries.get(f"{label}:graph", graph_entries[f"{label}:eager"])
        row["variants"][label] = {"max_rel_error": error, "graph_error": graph_error}
    errors = timer.round_robin(entries)
    for label, timed in entries.items():
        if label in errors:
            row["variants"][label]["error"] = errors[label]
            continue
        gbps = n * k * 2 / timed.median_ms / 1e6
        row["variants"][label] |= {"us": 1e3 * timed.median_ms, "weight_gb_per_s": gbps,
                                   "fraction_of_copy": gbps / bandwidth}  # fmt: skip
    return row


def _print(row: dict) -> None:
    for label, v in row["variants"].items():
        speed = f"{v['us']:8.1f} us {v['fraction_of_copy']:.3f} of copy" if "us" in v else "-"
        print(f"{row['shape']:13s} x{row['rows']} {label:18s} {speed}  "
              f"err {v['max_rel_error']:.1e} {v.get('graph_error') or v.get('error') or ''}",
              flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (interpreter)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="GEMV settings BLOCK_NxBLOCK_KxWARPS, comma-separated")  # fmt: skip
    parser.add_argument("--rows", default="1", help="rows of x (decode batch), comma-separated")
    parser.add_argument("--mma-configs", default="",
                        help="tensor-core GEMV settings BNxBKxWsSTAGES (lab/gemv_mma.py), "
                        "e.g. 16x256x4s4,32x256x4s3")  # fmt: skip
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    configs = [GemvConfig.parse(text) for text in args.configs.split(",")]
    timer = Timer(device, warmup=3, repeats=7 if device.type == "cuda" else 1, sample_ms=20.0)
    bandwidth = copy_bandwidth(timer, COPY_BYTES[device.type])
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(device),
              "software": software(), "copy_bandwidth": bandwidth, "rows": []}  # fmt: skip
    shapes = SHAPES if device.type == "cuda" else SMOKE_SHAPES
    for (name, n, k), rows in itertools.product(shapes, map(int, args.rows.split(","))):
        mma = [text for text in args.mma_configs.split(",") if text]
        row = measure_shape(name, n, k, rows, configs, mma, timer, bandwidth["gb_per_s"],
                            device)  # fmt: skip
        result["rows"].append(row)
        _print(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    bad = [(r["shape"], label) for r in result["rows"] for label, v in r["variants"].items()
           if v["max_rel_error"] > 2e-2 or "error" in v]  # fmt: skip
    if bad:
        print(f"wrong or failed: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
