"""Linear layers of the decoder: a one-row product as a GEMV kernel, and several HF
projections fused into one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sageserve.layers.fused.gemv import MAX_ROWS, gemv


class DecodeLinear(nn.Linear):
    """`nn.Linear` that computes up to MAX_ROWS (4) rows with the Triton GEMV
    (layers/fused/gemv.py) when `use_gemv` is set: small decode batches, where cuBLAS's
    small products read the weights below the copy bandwidth. More rows, and `use_gemv`
    off, take `F.linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.use_gemv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features]."""
        if self.use_gemv and x.shape[0] <= MAX_ROWS:
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(DecodeLinear):
    """One matmul for several projections of the same input, stacked along the output dim.

    The weight is [sum(out_sizes), in_features]; shard i occupies rows
    offsets[i]:offsets[i] + out_sizes[i]; `shard` gives the rows an HF projection loads into.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of `param` (weight or bias) that belong to projection `index`."""
        return param.narrow(0, self.offsets[index], self.out_sizes[index])
