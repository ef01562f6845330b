"""The 16-bit backend's Triton kernels: KV store, varlen paged prefill, split-KV decode.

Kernels and their launch wrappers only: host-side metadata lives in the backend."""
