"""The Hopper (sm_90) 8-bit prefill in Gluon, warp-specialized (`--sage-impl gluon`).

FlashAttention-3's structure over the backend's 8-bit paged cache: a producer warp loads K
and V pages by TMA into a ring of stages and makes each block's scales; two consumer
warpgroups of 64 query rows each ping-pong through mbarriers, so that one's softmax runs
under the other's tensor-core products; the causal mask is applied only on the blocks that
cross a row's last key. With fp16 P·V, a widener partition turns each stage's INT8 V codes
into fp16 in shared memory. One concept per module:

- `config`: block sizes, stages, register split and launch options;
- `plan`: the host work plan (128-row tiles, longest first) and each consumer's block range;
- `partitions`: the consumer pieces (turns, QKᵀ, softmax, one turn of P·V);
- `prefill`: the kernel, its producer and widener partitions, and `sage_attention_ws`.

The numerics are `kernels/prefill.py`'s (INT8 Q per row, INT8 K and FP8 or INT8 V per
token, P times each key's V scale before its FP8 or fp16 rounding), up to the e4m3 scale of
P in diagonal blocks and the order of the rotation's fp32 additions (lab/KERNEL_NOTES.md,
"v3, round 3" and "round 4"). The Triton prefill stays the portable path and the oracle.
"""
