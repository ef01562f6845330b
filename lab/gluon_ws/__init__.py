"""The warp-specialized Gluon prefill probe, one concept per module; the CLI is
`lab/gluon_ws_prefill_probe.py`.

- `config`: constants (module-level `gl.constexpr`s) and launch options;
- `plan`: the varlen host work plan and per-consumer block ranges (shared with the kernel);
- `partitions`: the consumer pieces both kernels share (turns, softmax, `_step`);
- `equal`: the equal-length kernel (producer + consumers) and `gluon_ws_prefill`;
- `varlen`: the varlen kernel (FP8 or fp16 P·V, head_dim 64 or 128, Q rotation) and
  `gluon_ws_prefill_varlen`;
- `sass`: the offline sm_90 compile and its report (`--sass`);
- `selfcheck`: the CPU self-check (`--selfcheck`);
- `gpu`, `gpu_varlen`: the GPU check and timing harnesses.
"""
