"""`sage_attn`: SageAttention-style 8-bit attention over an 8-bit paged KV cache."""

from sageserve.attention.sage_attn import options as options
