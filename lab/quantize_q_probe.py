"""How fast is the query pass (`quantize_q`, --sage-rotation-kernel prepass)? (issue 18.)

The served prefill at head_dim 128 rotates and quantizes Q in one pass before the kernel.
Its rotation cost against no rotation was 17% / 9.5% / 6.1% at 1k / 8k / 32k on an H100
(target <= 5%), and a mixed serving step showed the pass at ~8 µs for 448 tokens x 32
heads: 5.5 MB moved, ~1.8 µs at the copy bandwidth. This times the pass's kernel over
several tile sizes and both rotations (the butterfly, which the served pass uses, and the
tensor-core product), plus no rotation (the floor), inside CUDA graphs with several inputs
cycled past L2, and reports the fraction of the copy bandwidth that its bytes (2 read + 1
written per element, + 4 per row) reach. Every variant's codes are compared with the
served pass's (`quantize_q`): the butterfly variants must be equal; the tensor-core ones
may flip a code by one where a value sits ~1e-7 from a rounding boundary.

    PYTHONPATH=. python lab/quantize_q_probe.py --out quantize-q.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime

import torch

from sageserve.attention.sage_attn.kernels.quantize_q import _quantize_q_kernel, quantize_q
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.bench.kernels_timing import Timer, copy_bandwidth, eager_and_graph
from sageserve.bench.run_record import device_info, software
from sageserve.launch_math import cdiv

HEADS, KV_HEADS, DIM = 32, 8, 128
# (rotation, rows per program, warps)
VARIANTS = [
    (HadamardKernel.BUTTERFLY, 16, 4), (HadamardKernel.BUTTERFLY, 32, 4),
    (HadamardKernel.BUTTERFLY, 64, 4), (HadamardKernel.BUTTERFLY, 64, 8),
    (HadamardKernel.BUTTERFLY, 16, 1), (HadamardKernel.BUTTERFLY, 16, 2),
    (HadamardKernel.TENSOR_CORE, 32, 4), (HadamardKernel.TENSOR_CORE, 64, 4),
    (HadamardKernel.TENSOR_CORE, 128, 8),
    (HadamardKernel.OFF, 16, 4), (HadamardKernel.OFF, 64, 4),
]  # fmt: skip
L2_DEFEAT_BYTES = 256 << 20


def run_pass(q, balance, codes, scales, rotation, block, warps, sm_scale) -> None:
    """The served kernel with a chosen tile (rows per program) and warp count."""
    rows = q.shape[0] * q.shape[1]
    _quantize_q_kernel[(cdiv(rows, block),)](
        q, balance, codes, scales, rows, q.stride(0), q.stride(1), sm_scale,
        heads=HEADS, group=HEADS // KV_HEADS, D=DIM, STAGES=DIM.bit_length() - 1, BLOCK=block,
        ROTATE=int(rotation), HAS_BALANCE=True, num_warps=warps,
    )  # fmt: skip


def measure(tokens: int, timer: Timer, bandwidth: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    copies = max(2, -(-L2_DEFEAT_BYTES // (tokens * HEADS * DIM * 3)))
    qs = [torch.randn(tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
          for _ in range(copies)]  # fmt: skip
    balance = 0.5 + torch.rand(KV_HEADS, DIM, device="cuda", generator=gen)
    sm_scale = DIM**-0.5
    served = quantize_q(qs[0], sm_scale, HadamardKernel.BUTTERFLY, balance)
    plain = quantize_q(qs[0], sm_scale, HadamardKernel.OFF, balance)
    codes = torch.full((tokens, HEADS, DIM), 99, dtype=torch.int8, device="cuda")
    scales = torch.full((tokens, HEADS), float("nan"), device="cuda")
    rows, entries = [], {}
    for rotation, block, warps in VARIANTS:
        label = f"{rotation.name.lower()}_rows{block}_w{warps}"
        calls = [lambda q=q, r=rotation, b=block, w=warps:
                 run_pass(q, balance, codes, scales, r, b, w, sm_scale) for q in qs]  # fmt: skip
        codes.fill_(99)
        calls[0]()
        want = plain if rotation == HadamardKernel.OFF else served
        diff = (codes.int() - want[0].int()).abs()
        row = {"tokens": tokens, "variant": label, "max_code_diff": int(diff.max()),
               "codes_differing": int((diff > 0).sum()),
               "scales_equal": bool(torch.equal(scales, want[1]))}  # fmt: skip
        graph_entries, error = eager_and_graph(label, calls, timer, graph=True)
        entries[label] = graph_entries.get(f"{label}:graph")
        rows.append(row | {"graph_error": error})
    timer.round_robin({k: e for k, e in entries.items() if e is not None})
    moved = tokens * HEADS * (DIM * 3 + 4)
    for row in rows:
        timed = entries.get(row["variant"])
        if timed is not None:
            gbps = moved / timed.median_ms / 1e6
            row |= {"us": 1e3 * timed.median_ms, "gb_per_s": gbps,
                    "fraction_of_copy": gbps / bandwidth}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="448,1024,16384")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    timer = Timer(torch.device("cuda"), warmup=3, repeats=7, sample_ms=20.0)
    bandwidth = copy_bandwidth(timer, 1 << 30)
    result = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(UTC).isoformat(), "device": device_info(timer.device),
              "software": software(), "copy_bandwidth": bandwidth, "rows": []}  # fmt: skip
    for tokens in (int(t) for t in args.tokens.split(",")):
        for row in measure(tokens, timer, bandwidth["gb_per_s"]):
            result["rows"].append(row)
            print(f"{tokens:6d} {row['variant']:24s} {row.get('us', float('nan')):8.2f} us "
                  f"{row.get('fraction_of_copy', float('nan')):.2f} of copy, codes differing "
                  f"{row['codes_differing']} (max {row['max_code_diff']}), scales equal "
                  f"{row['scales_equal']}", flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
