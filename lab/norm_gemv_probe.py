"""Is RMSNorm folded into the next decode GEMV worth a kernel? (issue 16, single stream)

A decode layer at batch 1 runs two RMSNorm kernels, each followed by a product that reads
its output: input norm -> qkv_proj, post-attention norm -> gate_up_proj. A norm on 4096
values is a few µs of launch and gap for a few KB of work, twice a layer, 64 times a step.
Here one Triton kernel normalizes x in every program (the sum of squares of one row is
4096 values, cheap to redo) and multiplies by its block of weight rows. Timed against the
served pair (`add_rmsnorm` + cuBLAS `F.linear`) and against `add_rmsnorm` + the one-pass
GEMV of `gemv_probe.py`, inside CUDA graphs cycling enough weight copies that L2 holds
none, alternated. Each output is checked against fp32 (x normalized in fp32 and rounded to
the model dtype before the weight multiply, as `RMSNorm` does).

    PYTHONPATH=. python lab/norm_gemv_probe.py --out norm_gemv.json
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

from lab.gemv_probe import CONFIGS, L2_DEFEAT_BYTES, gemv
from sageserve.bench.kernels_timing import Timer, copy_bandwidth, eager_and_graph
from sageserve.bench.run_record import device_info, software
from sageserve.layers.fused.add_rmsnorm import add_rmsnorm

SHAPES = [("qkv_proj", 6144, 4096), ("gate_up_proj", 28672, 4096)]
EPS = 1e-5


@triton.jit
def _norm_gemv_kernel(x_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps, M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y[M, BLOCK_N rows] = rmsnorm(x)[M, K] @ w[rows, K]^T; every program redoes the norm."""
    ms = tl.arange(0, M)
    sum_sq = tl.zeros((M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * K + ks[None, :]).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * K + ks[None, :]).to(tl.float32)
        # As RMSNorm: normalized in fp32, rounded to the model dtype, then times the weight.
        xn = (x * rstd[:, None]).to(x_ptr.dtype.element_ty) * tl.load(nw_ptr + ks)[None, :]
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < N, other=0.0)
        acc += tl.sum(xn[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    out = y_ptr + ms[:, None] * N + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rows[None, :] < N)


def norm_gemv(x, norm_weight, w, y, config: tuple[int, int, int]) -> torch.Tensor:
    """x [M, K], norm_weight [K], w [N, K] (K a multiple of BLOCK_K) -> y [M, N]."""
    block_n, block_k, warps = config
    n, k = w.shape
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, norm_weight, w, y, n, k, EPS, M=x.shape[0], BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )  # fmt: skip
    return y


def _reference(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    xn = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * norm_weight
    return xn.float() @ w.float().T


def _variants(x, nw, weights, y, m: int) -> dict[str, list]:
    def normed() -> torch.Tensor:
        return add_rmsnorm(x, None, nw, EPS)[0]

    out = {"norm+cublas": [lambda w=w: F.linear(normed(), w) for w in weights]}
    for config in CONFIGS:
        if config[0] * config[1] * m > 16384:  # register budget of the broadcast product
            continue
        tag = "n{}_k{}_w{}".format(*config)
        out[f"norm+gemv_{tag}"] = [lambda w=w, c=config: gemv(normed(), w, y, c) for w in weights]
        out[f"fused_{tag}"] = [lambda w=w, c=config: norm_gemv(x, nw, w, y, c) for w in weights]
    return out


def measure(name: str, n: int, k: int, m: int, timer: Timer) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
               for _ in range(copies)]  # fmt: skip
    x = 3 * torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).bfloat16()
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    want = _reference(x, nw, weights[0])
    row = {"shape": name, "n": n, "k": k, "m": m, "weight_copies": copies, "variants": {}}
    entries = {}
    for label, calls in _variants(x, nw, weights, y, m).items():
        y.fill_(float("nan"))
        got = calls[0]().float()
        error = float((got - want).abs().max() / want.abs().max())
        graphs, graph_error = eager_and_graph(label, calls, timer, graph=True)
        entries[label] = graphs.get(f"{label}:graph")
        row["variants"][label] = {"max_rel_error": error, "graph_error": graph_error}
    timer.round_robin({key: e for key, e in entries.items() if e is not None})
    for label, timed in entries.items():
        if timed is not None:
            row["variants"][label]["us"] = 1e3 * timed.median_ms
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, warmup=3, repeats=7, sample_ms=20.0)
    result = {"probe": "RMSNorm folded into the decode GEMV (issue 16)",
              "command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": device_info(device), "software": software(),
              "copy_bandwidth": copy_bandwidth(timer, 1 << 30), "rows": []}  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        for name, n, k in SHAPES:
            row = measure(name, n, k, m, timer)
            result["rows"].append(row)
            timed = {lab: v for lab, v in row["variants"].items() if "us" in v}
            best = sorted(timed, key=lambda lab: timed[lab]["us"])[:3]
            print(f"M={m} {name}: norm+cublas {timed['norm+cublas']['us']:.1f} us; best "
                  + ", ".join(f"{b} {timed[b]['us']:.1f} (err {timed[b]['max_rel_error']:.1e})"
                              for b in best), flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
