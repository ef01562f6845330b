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

Round 2 (2026-12-06, after the first GPU run): the butterfly costs the pass 51 µs of 121 at
16k tokens; its seven reshape / split / join / permute stages go through shared memory
(sm_90, 16 rows, 4 warps: 25 shared stores and 29 loads). `xor` variants rotate in place
instead: stage s adds each value to its partner at index i ^ 2^s, read by `tl.gather`
(lane shuffles), and keeps the sum where bit s of i is 0, the partner minus the value where
it is 1. That is the same sequence of fp32 operations as `hadamard_rotate`'s, so the codes
are equal bit for bit; offline it compiles to 3 shared stores and 5 loads, and 115 lane
shuffles instead of 3 (`--compile`, Triton 3.6's own nvdisasm, no GPU needed). `--selfcheck`
checks the equality on CPU through the interpreter.

    PYTHONPATH=. python lab/quantize_q_probe.py --out quantize-q.json
    PYTHONPATH=. TRITON_INTERPRET=1 python lab/quantize_q_probe.py --selfcheck
    PYTHONPATH=. TRITON_INTERPRET=0 python lab/quantize_q_probe.py --compile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.kernels.quantize_q import (
    _quantize_q_kernel,
    load_q_rows,
    quantize_q,
    store_q_codes,
)
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
    ("xor", 16, 4), ("xor", 32, 4), ("xor", 64, 8),
]  # fmt: skip
L2_DEFEAT_BYTES = 256 << 20


@triton.jit
def _hadamard_rows_xor(x, ROWS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """x: [ROWS, D] fp32 -> x H by in-place butterflies on index bits 0 .. STAGES - 1."""
    idx = tl.broadcast_to(tl.arange(0, D)[None, :], (ROWS, D))
    for s in tl.static_range(STAGES):
        partner = tl.gather(x, idx ^ (1 << s), 1)
        x = tl.where((idx & (1 << s)) == 0, x + partner, partner - x)
    return x


@triton.jit(do_not_specialize=["num_rows"])
def _quantize_q_xor_kernel(
    q_ptr, balance_ptr, codes_ptr, scales_ptr, num_rows, stride_t, stride_h, sm_scale,
    heads: tl.constexpr, group: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The served `_quantize_q_kernel` (rotation on, balance on) with `_hadamard_rows_xor`."""
    x, rows, live = load_q_rows(q_ptr, num_rows, stride_t, stride_h, heads, D, BLOCK)
    y = _hadamard_rows_xor(x.to(tl.float32), BLOCK, D, STAGES)
    store_q_codes(y, rows, live, balance_ptr, codes_ptr, scales_ptr, sm_scale, heads, group,
                  D, True)  # fmt: skip


def run_pass(q, balance, codes, scales, rotation, block, warps, sm_scale) -> None:
    """The served kernel (or its xor twin) with a chosen tile (rows per program) and warps."""
    rows = q.shape[0] * q.shape[1]
    heads, dim = q.shape[1], q.shape[2]
    if rotation == "xor":
        _quantize_q_xor_kernel[(cdiv(rows, block),)](
            q, balance, codes, scales, rows, q.stride(0), q.stride(1), sm_scale,
            heads=heads, group=heads // balance.shape[0], D=dim, STAGES=dim.bit_length() - 1,
            BLOCK=block, num_warps=warps,
        )  # fmt: skip
        return
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
        name = rotation if isinstance(rotation, str) else rotation.name.lower()
        label = f"{name}_rows{block}_w{warps}"
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


def selfcheck() -> None:
    """CPU (interpreter): the xor pass's codes and scales equal the served pass's, on fp32
    rows with outliers, at row counts that are not multiples of the tile."""
    for tokens, heads, kv_heads, dim in ((1, 4, 2, 64), (7, 4, 1, 128), (200, 2, 2, 64),
                                         (333, 4, 2, 128)):  # fmt: skip
        gen = torch.Generator().manual_seed(tokens + dim)
        q = torch.randn(tokens, heads, dim, generator=gen) * torch.logspace(-2, 2, dim)
        balance = 0.5 + torch.rand(kv_heads, dim, generator=gen)
        want = quantize_q(q, 0.1, HadamardKernel.BUTTERFLY, balance)
        codes = torch.full((tokens, heads, dim), 99, dtype=torch.int8)
        scales = torch.full((tokens, heads), float("nan"))
        run_pass(q, balance, codes, scales, "xor", 16, 4, 0.1)
        assert torch.equal(codes, want[0]), (tokens, dim)
        assert torch.equal(scales, want[1]), (tokens, dim)
        print(f"selfcheck {tokens} x {heads} x {dim}: codes and scales equal", flush=True)


def _sass_counts(kernel, signature: dict, constants: dict, warps: int) -> str:
    """Compile for sm_90 (no GPU): layout conversions in the TTGIR and a few SASS opcodes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lab.rotation_compile_probe import launch_attrs

    attrs = launch_attrs(kernel, signature)
    signature = signature | {name: "constexpr" for name in constants}
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})  # fmt: skip
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    lines = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@\S+\s+)?(\w+)", sass)]
    ops = Counter(lines)
    counts = ", ".join(f"{op} {ops[op]}" for op in ("SHFL", "BAR", "STS", "LDS"))
    conversions = compiled.asm["ttgir"].count("ttg.convert_layout")
    return f"{len(lines)} instructions, {conversions} layout conversions, {counts}"


def compile_report() -> None:
    """The served pass and the xor pass at head_dim 128, bf16 q, balance on, 16 rows, 4 warps."""
    signature = {"q_ptr": "*bf16", "balance_ptr": "*fp32", "codes_ptr": "*i8",
                 "scales_ptr": "*fp32", "num_rows": "i32", "stride_t": "i32",
                 "stride_h": "i32", "sm_scale": "fp32"}  # fmt: skip
    common = dict(heads=HEADS, group=HEADS // KV_HEADS, D=DIM, STAGES=DIM.bit_length() - 1,
                  BLOCK=16)  # fmt: skip
    served = common | dict(ROTATE=int(HadamardKernel.BUTTERFLY), HAS_BALANCE=True)
    print("served butterfly:", _sass_counts(_quantize_q_kernel, signature, served, 4))
    print("xor butterfly:   ", _sass_counts(_quantize_q_xor_kernel, signature, common, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="448,1024,16384")
    parser.add_argument("--out")
    parser.add_argument("--selfcheck", action="store_true", help="check the xor pass on CPU")
    parser.add_argument("--compile", action="store_true", help="sm_90 code counts, no GPU")
    args = parser.parse_args()
    if args.selfcheck:
        selfcheck()
        return
    if args.compile:
        compile_report()
        return
    if args.out is None:
        parser.error("--out is required unless --selfcheck")
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
