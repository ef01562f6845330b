"""Triton kernels that fuse a decoder layer's small elementwise steps (CUDA).

Each kernel computes what its torch counterpart in `sageserve.layers` computes, with the same
roundings: an intermediate the torch ops store in the model dtype is rounded to that dtype
here too, so a fused model's greedy tokens follow the unfused model's. Only the reduction
order of RMSNorm's sum of squares differs (a last-bit difference of its fp32 mean).
"""
