"""`torch`: exact attention through torch SDPA over a 16/32-bit paged cache (any device)."""

from sageserve.attention.torch_native import options as options
