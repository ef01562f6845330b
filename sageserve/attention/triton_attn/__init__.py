"""`triton`: the 16-bit baseline, Triton kernels over the shared 16-bit paged cache."""

from sageserve.attention.triton_attn import options as options
