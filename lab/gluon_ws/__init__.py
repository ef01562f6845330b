"""The warp-specialized Gluon prefill probe, one concept per module; the CLI is
`lab/gluon_ws_prefill_probe.py`. The varlen kernel it measures is the served one,
`sageserve.attention.sage_attn.kernels.gluon` (`--sage-impl gluon`).

- `config`: the equal-length kernel's constants and launch options;
- `equal`: the equal-length kernel (producer + consumers) and `gluon_ws_prefill`;
- `sass`: the offline sm_90 compile of both kernels and its report (`--sass`);
- `selfcheck`: the CPU self-check of the served kernel's block ranges, work plan and barrier
  protocol (`--selfcheck`);
- `gpu`, `gpu_varlen`: the GPU check and timing harnesses.
"""
