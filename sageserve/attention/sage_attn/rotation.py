"""The Hadamard rotation of Q and K along head_dim, applied before their INT8 codes.

A few channels of post-rotary queries and keys carry most of their range; per-token INT8
then spends its 255 codes on those outliers and rounds every other channel coarsely. An
orthogonal transform R leaves every product unchanged, (q R)·(k R) = q·k, while a Hadamard
matrix spreads each outlier over all D channels (FlashAttention-3 does this before FP8).
Measured on SmolLM2 (BENCHMARKS.md, issue 18): it cuts the 8-bit path's mean KL 2.3-2.6×.

Here R is the unnormalized Sylvester matrix H (entries ±1, H Hᵀ = D·I), so the product of
rotated vectors is D·(q·k): the softmax scale absorbs it as an exact power of two
(`rotated_sm_scale`). x H is computed in fp32 as a fast Walsh-Hadamard
transform in a fixed order (log2 D stages; each takes the even and odd channels a, b and
returns the concatenation [a + b, a - b]), so every output is one fixed tree of IEEE
additions: bit-identical in `hadamard_rotate` here and in the Triton kernel
(`kernels/rotate.py`), and independent of how many rows are rotated together. The
quantizing kernels then see ordinary inputs, and the key mean and channel balance are
calibrated in the rotated basis (`calibration.py`).
"""

from __future__ import annotations

import torch


def check_head_dim(dim: int) -> None:
    """ValueError unless dim is a power of two >= 2 (what the transform's stages need)."""
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim >= 2, got {dim}")


def hadamard_matrix(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[dim, dim] Sylvester Hadamard matrix, entries ±1 (H Hᵀ = dim·I)."""
    check_head_dim(dim)
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x: [..., D] -> x H, [..., D] (a new tensor) in fp32, or fp64 for fp64 input."""
    dim = x.shape[-1]
    check_head_dim(dim)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    for _ in range(dim.bit_length() - 1):
        pairs = x.unflatten(-1, (dim // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        x = torch.cat([even + odd, even - odd], dim=-1)
    return x


def rotated_sm_scale(sm_scale: float, head_dim: int) -> float:
    """The softmax scale for rotated q and k: (q H)·(k H) = D·(q·k), so sm_scale / D."""
    return sm_scale / head_dim
