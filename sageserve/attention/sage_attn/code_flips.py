"""How far two 8-bit caches, written from the same rows by two float paths, may differ.

The tensor-core Hadamard rotation (`kernels/rotate.py`) adds the same products as the
butterfly in another order, so a rotated key moves by ~1e-7 relative, and a K code that sat
that close to a rounding boundary moves by one step (as may its fp16 row scale, through the
row's largest value). Measured: 1 code in 131,072 (fp16 keys, head_dim 128, through Triton's
interpreter, 2026-12-05). `MAX_FLIP_SHARE` leaves two orders of magnitude over that for the
tensor cores' own fp32 accumulation, and still fails on what a wrong rotation does (most
codes move, by many steps).
"""

from __future__ import annotations

import torch

MAX_FLIP_SHARE = 1e-3


def signed_bits(t: torch.Tensor) -> torch.Tensor:
    """int8 codes (INT8 or FP8) or fp16 scales as a same-width signed integer view: one step
    apart is one integer apart, and torch.equal compares bit for bit (NaN poison included)."""
    return t.view(torch.int8 if t.element_size() == 1 else torch.int16)


def codes_within_flips(
    got: torch.Tensor, want: torch.Tensor, max_share: float = MAX_FLIP_SHARE
) -> bool:
    """got, want: same-shape integer views of codes (int8) or of fp16 scales (int16, where
    adjacent positive values are adjacent integers). True when every entry is equal or one
    step apart, and at most max_share of them are apart."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(f"compare like with like: {got.dtype} {tuple(got.shape)} vs "
                         f"{want.dtype} {tuple(want.shape)}")  # fmt: skip
    apart = (got.int() - want.int()).abs()
    return bool(apart.max() <= 1) and apart.ne(0).double().mean().item() <= max_share
