"""Does programmatic dependent launch hide the small decode GEMVs' ramp? (issue 16, batch 1.)

At batch 1 the decode step is its weight reads. On an H200 the small products read far
below the copy bandwidth (`lab/gemv_probe.py`: qkv_proj 0.74-0.80, o_proj 0.58-0.69 of it;
gate_up_proj 0.98, lm_head 1.04): a 25-50 MB read does not reach full speed in 12-16 µs,
and the next kernel starts only after the last block of this one. Single-stream decode at
85% of the weight-read bound needs ~0.25 ms less per step (BENCHMARKS.md, 2026-12-04/05).

With programmatic dependent launch (sm_90), a kernel launched with `launch_pdl` may start
while its predecessor still runs, once every block of the predecessor has executed
`griddepcontrol.launch_dependents`; `griddepcontrol.wait` then blocks until the predecessor
has finished and its writes are visible. The weights do not depend on the previous
kernel, so a GEMV can load its first weight tile before the wait and overlap its ramp with
the tail of the kernels before it. This times, per Llama-3.1-8B decode weight, a pair of
kernels as in a layer, an RMSNorm of the hidden vector (the GEMV's input) and then the
product, inside CUDA graphs that cycle enough weight copies that L2 holds none:

- `cublas`: the norm, then `F.linear` (what the engine runs);
- `triton`: the norm, then a one-pass Triton GEMV (lab/gemv_probe.py's kernel, plus the
  first weight tile loaded before the input);
- `triton_pdl`: the same two kernels launched with programmatic dependent launch: each
  lets its dependents launch at its start; the norm waits before it writes the input that
  the previous GEMV reads, the GEMV waits after its first weight tile and before the input.

Prints µs per pair, the weight bytes / time and its fraction of the copy bandwidth measured
in the same run; checks every product against fp32.

    PYTHONPATH=. python lab/pdl_gemv_probe.py --out pdl-gemv.json
    TRITON_INTERPRET=1 PYTHONPATH=. python lab/pdl_gemv_probe.py --device cpu --out smoke.json
        (a smoke test of the non-PDL kernels on tiny shapes)
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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lab.gemv_probe import L2_DEFEAT_BYTES
from lab.gemv_probe import SHAPES as GEMV_SHAPES
from sageserve.bench.kernels_timing import COPY_BYTES, Timer, copy_bandwidth, eager_and_graph
from sageserve.bench.run_record import device_info, software
from sageserve.launch_math import next_power_of_2

# Llama-3.1-8B's decode products but lm_head (read at full speed already: gemv_probe).
SHAPES = [shape for shape in GEMV_SHAPES if shape[0] != "lm_head"]
SMOKE_SHAPES = [("smoke", 96, 1024)]
CONFIGS = [(16, 512, 4), (8, 1024, 4)]  # (BLOCK_N, BLOCK_K, num_warps)
EPS = tl.constexpr(1e-5)


@triton.jit
def _norm_kernel(h_ptr, w_ptr, x_ptr, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """x = RMSNorm(h) * w over one [K] vector (one program)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the previous GEMV reads x: write it only once that GEMV has finished
    ks = tl.arange(0, BLOCK)
    live = ks < K
    h = tl.load(h_ptr + ks, mask=live, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / K + EPS)
    w = tl.load(w_ptr + ks, mask=live, other=0.0).to(tl.float32)
    tl.store(x_ptr + ks, (h * scale * w).to(x_ptr.dtype.element_ty), mask=live)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """y[rows] = W[rows, :] x for BLOCK_N rows a program; the first weight tile is loaded
    before the input (and, with PDL, before waiting for the kernel that writes it)."""
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    live = rows[:, None] < N
    first = tl.load(w_rows + ks[None, :], mask=live, other=0.0)
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + ks).to(tl.float32)
    acc = tl.sum(first.to(tl.float32) * x[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=live, other=0.0)
        x = tl.load(x_ptr + k0 + ks).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


def norm(h: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, pdl: bool) -> None:
    """h, weight, x: [K]; x = RMSNorm(h) * weight."""
    k = h.shape[0]
    _norm_kernel[(1,)](h, weight, x, K=k, BLOCK=next_power_of_2(k), PDL=pdl, num_warps=8,
                       **_pdl_launch(pdl))  # fmt: skip


def gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, config, pdl: bool) -> None:
    """x [K] (K a multiple of BLOCK_K), w [N, K], y [N] = w @ x, fp32 sums."""
    block_n, block_k, warps = config
    n, k = w.shape
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](x, w, y, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
                       num_warps=warps, **_pdl_launch(pdl))  # fmt: skip


def _pdl_launch(pdl: bool) -> dict:
    """The launch option only where it is asked for (the interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


def _variants(h, norm_w, x, y, weights, pdl_ok: bool) -> dict[str, list]:
    """label -> calls, one per weight copy, each the norm then the product."""

    def pair(product, pdl=False):
        return [lambda w=w: (norm(h, norm_w, x, pdl), product(w)) for w in weights]

    variants = {"cublas": pair(lambda w: torch.mv(w, x))}
    for config in CONFIGS:
        label = "triton_n{}_k{}_w{}".format(*config)
        variants[label] = pair(lambda w, c=config: gemv(x, w, y, c, False))
        if pdl_ok:
            variants[label + "_pdl"] = pair(lambda w, c=config: gemv(x, w, y, c, True), True)
    return variants


def _max_error(calls, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cublas: bool) -> float:
    """Run the first pair and compare its product with fp32 (largest |error| / largest |y|)."""
    y.fill_(float("nan"))
    out = calls[0]()[1] if cublas else (calls[0](), y)[1]
    want = w.float() @ x.float()
    return float((out.float() - want).abs().max() / want.abs().max())


def measure_shape(name: str, n: int, k: int, timer: Timer, bandwidth: float, dev) -> dict:
    gen = torch.Generator(device=dev).manual_seed(n + k)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2))) if timer.cuda else 2
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / k**0.5
               for _ in range(copies)]  # fmt: skip
    h = torch.randn(k, device=dev, dtype=torch.bfloat16, generator=gen)
    norm_w = (1 + 0.1 * torch.randn(k, device=dev, generator=gen)).bfloat16()
    x = torch.empty(k, device=dev, dtype=torch.bfloat16)
    y = torch.empty(n, device=dev, dtype=torch.bfloat16)
    variants = _variants(h, norm_w, x, y, weights, pdl_ok=timer.cuda)
    row = {"shape": name, "n": n, "k": k, "weight_copies": copies, "variants": {}}
    entries = {}
    for label, calls in variants.items():
        error = _max_error(calls, x, weights[0], y, cublas=label == "cublas")
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
        print(f"{row['shape']:13s} {label:24s} {speed}  err {v['max_rel_error']:.1e} "
              f"{v.get('graph_error') or v.get('error') or ''}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (interpreter)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device, warmup=3, repeats=7 if device.type == "cuda" else 1, sample_ms=20.0)
    bandwidth = copy_bandwidth(timer, COPY_BYTES[device.type])
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(device),
              "software": software(), "copy_bandwidth": bandwidth, "rows": []}  # fmt: skip
    shapes = SHAPES if device.type == "cuda" else SMOKE_SHAPES
    for name, n, k in shapes:
        row = measure_shape(name, n, k, timer, bandwidth["gb_per_s"], device)
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
