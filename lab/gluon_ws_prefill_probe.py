"""Probe: the 8-bit prefill warp-specialized in the FlashAttention-3 manner, in Gluon (Triton 3.6).

The next step of `lab/gluon_prefill_probe.py` (KERNEL_NOTES.md, "Gluon probe: the wgmma
overlap, measured", next steps): work items of 128 query rows of one (sequence, head), each
program split into three partitions that meet only through shared memory and mbarriers:

- a producer warp (few registers) issues the TMA loads of each key block's K and V page into
  a ring of STAGES stages, and writes the block's scales next to them (fp32 K scales, the
  per-key e4m3 factors of P and the block's unit), made once per block instead of by every
  consumer warp. It waits on the stage's "empty" barrier (count 2: one arrive per consumer);
  its "ready" barrier completes on the TMA bytes and two arrives (the expect, the scales);
- two consumer warpgroups (the default partition and a 4-warp worker, many registers), each
  owning 64 of the 128 query rows, read the same stages. In its turn a consumer issues the
  next block's QKᵀ and this block's P·V; wait(1) retires the QKᵀ, the next softmax runs under
  the P·V, and wait(0) comes after it (pinned there by an mbarrier wait, see `_step`). They
  ping-pong: a pair of "turn" mbarriers makes their wgmma issues alternate, so one consumer's
  softmax runs while the other's products occupy the tensor cores.

Grid: one program per work item, or persistent (one program per SM looping over the items
round-robin; the producer then loads a program's next item under its last one's tail).
Causal: each consumer masks only its diagonal key block (its last), peeled out of the loop.
Numerics are the v2 probe's (and `sage_attention_paged(..., pv="fp8")`'s): INT8 Q per row
quantized in the kernel, INT8 K per token, FP8 V per token, P scaled per key by
`v_scale * 448 / block_max` (one multiply per element) before its e4m3 rounding.

Scope: FP8 P·V, head_dim 128, page 64, equal sequence lengths that are multiples of 128, no
cached prefix; causal or not. The varlen kernel (`sage_attention_ws`, served as
`--sage-impl gluon` from `sageserve/attention/sage_attn/kernels/gluon/`) takes what the
backend needs: varlen batches with cached
prefixes, the bottom-right causal mask, any lengths, work items from a host plan
(`work_plan`), both grids; FP8 or fp16 P·V (INT8 V widened to fp16 in shared memory by a
widener partition), head_dim 64 or 128, and Q rotated in the kernel. This file is the
CLI; the code is in `lab/gluon_ws/`, one module per concept. Run from the repository root
with the project's virtualenv:

    python lab/gluon_ws_prefill_probe.py --sass [--causal [--persistent]]  # no GPU: sm_90
    python lab/gluon_ws_prefill_probe.py --sass --varlen [--causal] [--pv fp16]
        [--head-dim 64] [--rotate on]  # no GPU: sm_90
    python lab/gluon_ws_prefill_probe.py --selfcheck  # no GPU: the barrier protocol
    python lab/gluon_ws_prefill_probe.py --out ws.json  # GPU: check, then time
    python lab/gluon_ws_prefill_probe.py --varlen --out ws-varlen.json  # GPU: varlen
    python lab/gluon_ws_prefill_probe.py --varlen --pv fp8,fp16 --head-dim 128,64 \
        --rotate off,on --timings none  # GPU: varlen checks, every numerics
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton

from lab.gluon_ws.config import DEFAULT_STAGES, MAXNREG
from lab.gluon_ws.gpu import WS_VARIANTS, run
from lab.gluon_ws.gpu_varlen import VARLEN_VARIANTS, _main_varlen, numerics_grid
from lab.gluon_ws.sass import sass_report
from lab.gluon_ws.selfcheck import selfcheck


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--causal", action="store_true", help="with --sass: the causal kernel")
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="with --sass --causal: the persistent grid's order of work items",
    )
    parser.add_argument(
        "--varlen",
        action="store_true",
        help="the varlen kernel (with --sass: compile it; alone: its GPU check and timing)",
    )
    parser.add_argument(
        "--selfcheck",
        action="store_true",
        help="no GPU: the barrier protocol under random interleavings (widener included)",
    )
    parser.add_argument("--pv", default="fp8",
                        help="--varlen: P·V in fp8 (FP8 V) or fp16 (INT8 V widened), or both "
                        "(fp8,fp16; GPU mode)")  # fmt: skip
    parser.add_argument("--head-dim", default="128", help="--varlen: 128, 64 or 128,64")
    parser.add_argument("--rotate", default="off",
                        help="--varlen: Hadamard-rotated Q (in the kernel) and K (the store): "
                        "off, on or off,on")  # fmt: skip
    parser.add_argument("--stages", type=int, default=None,
                        help=f"K/V stages (default: the launcher's per build; {DEFAULT_STAGES} "
                        "for --sass and the equal-length kernel)")  # fmt: skip
    parser.add_argument("--block-keys", type=int, default=64,
                        help="with --sass --varlen: keys per block, 64 or 128")  # fmt: skip
    parser.add_argument("--maxnreg", type=int, default=MAXNREG)
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=None,
        help=f"variants to check and time, of {list(WS_VARIANTS)} (default all), with "
        f"--varlen of {list(VARLEN_VARIANTS)}",
    )
    parser.add_argument("--masks", default="none,causal", help="none,causal or one")
    parser.add_argument(
        "--timings",
        default="serving,prompt16k",
        help="with --varlen: timed batches, of serving,prompt16k, or none (checks only)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.selfcheck:
        return selfcheck()
    if args.sass:
        grid = numerics_grid(args)
        if len(grid) != 1:
            parser.error("--sass compiles one --pv, --head-dim and --rotate")
        n = grid[0]
        stages = args.stages or DEFAULT_STAGES
        return sass_report(args.causal, stages, args.maxnreg, args.persistent, args.varlen,
                           n.pv, n.head_dim, n.rotate, args.block_keys)  # fmt: skip
    if args.varlen:
        return _main_varlen(args, parser)
    variants = (args.variants or ",".join(WS_VARIANTS)).split(",")
    if unknown := set(variants) - set(WS_VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    masks = [{"none": False, "causal": True}[m] for m in args.masks.split(",")]
    stages = args.stages or DEFAULT_STAGES
    rows = run([int(s) for s in args.seqs.split(",")], args.rounds, stages, variants, masks)
    result = {
        "what": "Gluon 8-bit prefill, warp-specialized (producer warp + 2 ping-pong consumer "
        "warpgroups, 128-row tiles, FP8 P·V, page 64; one program per tile, and persistent) "
        "vs the v2 probe, the Triton kernel and "
        "cuDNN; attention only, 16k tokens x 32 heads, D 128; TOPS halved for causal",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "stages": args.stages, "maxnreg": args.maxnreg,
        "variants": {name: {"persistent": WS_VARIANTS[name]} for name in variants},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "rows": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
