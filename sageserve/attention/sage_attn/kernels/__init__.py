"""The 8-bit backend's Triton kernels: quantizing KV store, paged prefill, split-KV decode.

Kernels and their launch wrappers only: host-side metadata lives in the backend."""

# Keys per block of the FP8 P·V mode's per-block scaling (the reference uses it too).
PV_BLOCK = 64
