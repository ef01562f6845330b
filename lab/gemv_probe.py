"""Can a Triton GEMV read decode weights faster than cuBLAS? (issue 16, single stream.)

At batch 1 a decode step is its GEMMs reading the weights: on an H200 with dummy
Llama-3.1-8B bf16 they took ~4.0 ms for 15.0 GB, 89% of the copy bandwidth (BENCHMARKS.md),
and single-stream decode needs ~95% to reach 85% of the weight-read bound. cuBLAS runs
these M = 1..8 products as a split-K kernel plus a reduction. This probe times, for the
model's five weight shapes and M = 1, 4, 8 rows, `F.linear` (also with cuBLASLt preferred,
and over weights stored transposed, [K, N], whose products cuBLAS runs with other kernels:
`cublaslt`, `cublas_kn`, asking whether a layout or library avoids the split-K reduction
kernel of the decode profile) against a one-pass Triton GEMV
(each program streams BLOCK_N whole weight rows and reduces them in registers) over a grid
of tile sizes, each inside a CUDA graph that cycles enough weight copies that L2 holds
none (as in a decode step, where every weight is read once). Prints GB/s of weights read
and the fraction of the measured copy bandwidth; checks each result against fp32.

    PYTHONPATH=. python lab/gemv_probe.py --out gemv.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sageserve.bench.kernels_timing import Timer, copy_bandwidth, eager_and_graph
from sageserve.bench.run_record import device_info, software

# (name, N, K) of Llama-3.1-8B's decode GEMMs: y[M, N] = x[M, K] @ W[N, K]^T.
SHAPES = [
    ("qkv_proj", 6144, 4096),
    ("o_proj", 4096, 4096),
    ("gate_up_proj", 28672, 4096),
    ("down_proj", 4096, 14336),
    ("lm_head", 128256, 4096),
]
CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps)
    (4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4), (16, 512, 8),
    (32, 256, 8), (32, 512, 8),
]  # fmt: skip
L2_DEFEAT_BYTES = 512 << 20


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, M)
    acc = tl.zeros((M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < N, other=0.0)
        x = tl.load(x_ptr + ms[:, None] * K + ks[None, :])
        acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    out = y_ptr + ms[:, None] * N + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rows[None, :] < N)


def gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, config: tuple[int, int, int]):
    """x [M, K], w [N, K] (K a multiple of BLOCK_K), y [M, N] = x @ w.T, fp32 sums."""
    block_n, block_k, warps = config
    n, k = w.shape
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](x, w, y, n, k, M=x.shape[0], BLOCK_N=block_n, BLOCK_K=block_k,
                       num_warps=warps)  # fmt: skip
    return y


def _linear_lt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear with torch's cuBLASLt path preferred (read at each call: a graph captures
    the kernel it chose)."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def _check(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |y - fp32 product| over the largest |fp32 product|."""
    want = x.float() @ w.float().T
    return float((y.float() - want).abs().max() / want.abs().max())


def measure_shape(name: str, n: int, k: int, m: int, timer: Timer, bandwidth: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
               for _ in range(copies)]  # fmt: skip
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    transposed = [w.t().contiguous() for w in weights]  # [K, N]: y = x @ w
    variants = {"cublas": [lambda w=w: F.linear(x, w) for w in weights],
                "cublaslt": [lambda w=w: _linear_lt(x, w) for w in weights],
                "cublas_kn": [lambda w=w: x @ w for w in transposed]}  # fmt: skip
    for config in CONFIGS:
        if config[0] * config[1] * m <= 16384:  # register budget of the broadcast product
            label = "triton_n{}_k{}_w{}".format(*config)
            variants[label] = [lambda w=w, c=config: gemv(x, w, y, c) for w in weights]
    row = {"shape": name, "n": n, "k": k, "m": m, "weight_copies": copies, "variants": {}}
    entries = {}
    for label, calls in variants.items():
        error = _check(x, weights[0], calls[0]())
        graph_entries, graph_error = eager_and_graph(label, calls, timer, graph=True)
        entries[label] = graph_entries.get(f"{label}:graph")
        row["variants"][label] = {"max_rel_error": error, "graph_error": graph_error}
    timer.round_robin({key: e for key, e in entries.items() if e is not None})
    for label, timed in entries.items():
        if timed is None:
            continue
        gbps = n * k * 2 / timed.median_ms / 1e6
        row["variants"][label] |= {"us": 1e3 * timed.median_ms, "weight_gb_per_s": gbps,
                                   "fraction_of_copy": gbps / bandwidth}  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, warmup=3, repeats=7, sample_ms=20.0)
    bandwidth = copy_bandwidth(timer, 1 << 30)
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(device),
              "software": software(), "copy_bandwidth": bandwidth, "rows": []}  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        for name, n, k in SHAPES:
            row = measure_shape(name, n, k, m, timer, bandwidth["gb_per_s"])
            result["rows"].append(row)
            best = max((v for v in row["variants"].items() if "us" in v[1]),
                       key=lambda item: item[1]["weight_gb_per_s"])  # fmt: skip
            cublas = row["variants"]["cublas"]
            print(f"M={m} {name:13s} cublas {cublas['us']:7.1f} us "
                  f"{cublas['fraction_of_copy']:.3f} | best {best[0]} {best[1]['us']:7.1f} us "
                  f"{best[1]['fraction_of_copy']:.3f} err {best[1]['max_rel_error']:.1e}",
                  flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
