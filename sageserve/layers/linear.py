"""Linear layers that fuse several HF projections into one matmul."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input, stacked along the output dim.

    The weight is [sum(out_sizes), in_features]; shard i occupies rows
    offsets[i]:offsets[i] + out_sizes[i]. `load_shard` copies an HF projection into its rows.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of `param` (weight or bias) that belong to projection `index`."""
        return param.narrow(0, self.offsets[index], self.out_sizes[index])
