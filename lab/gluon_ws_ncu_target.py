"""One launch of the served Gluon prefill for Nsight Compute (issue 17: where the time goes).

Builds the varlen probe's "prompt16k" batch (one 16k prompt, 32 query / 8 KV heads, page 64,
Q and K rotated unless --no-rotate), launches `sage_attention_ws` twice to compile and warm
up, then once more inside an NVTX range named "profiled"; run it under ncu with that range:

    ncu --clock-control none --nvtx --nvtx-include "profiled/" --section SpeedOfLight \
        --section WarpStateStats \
        --section InstructionStats --section ComputeWorkloadAnalysis --section SchedulerStats \
        python3 lab/gluon_ws_ncu_target.py --pv fp16 --block-keys 64
"""

from __future__ import annotations

import argparse

import torch

from lab.gluon_ws.gpu_varlen import VARLEN_HEADS, Numerics, _varlen_batch
from sageserve.attention.sage_attn.kernels.gluon.plan import work_plan
from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pv", choices=("fp16", "fp8"), default="fp16")
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
    parser.add_argument("--block-keys", type=int, choices=(64, 128), default=64)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--no-rotate", action="store_true", help="Q and K not rotated")
    args = parser.parse_args()
    rotate = not args.no_rotate
    numerics = Numerics(args.pv, args.head_dim, rotate=rotate)
    b = _varlen_batch([args.tokens], [0], torch.Generator().manual_seed(0), False, numerics)
    plan = work_plan(b.q_lens, b.kv_lens, VARLEN_HEADS, args.causal)
    plan = torch.from_numpy(plan).to(b.q.device)
    out = torch.full_like(b.q, float("nan"))
    for name in ("warm-up", "warm-up", "profiled"):
        torch.cuda.nvtx.range_push(name)
        sage_attention_ws(b.q, *b.caches, b.table, b.q_start, b.q_len, b.kv_len, plan, out,
                          numerics.sm_scale(), causal=args.causal, rotate=rotate,
                          block_keys=args.block_keys)  # fmt: skip
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "the profiled launch left rows unwritten"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
