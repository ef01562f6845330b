"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from sageserve.layers.fused.add_rmsnorm import add_rmsnorm


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalised in fp32 like the HF reference."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.use_triton = False  # one fused kernel (layers/fused) instead of torch ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, hidden]. Returns (norm(x + residual), x + residual).

        Without a residual, x itself is returned as the new residual stream.
        """
        if self.use_triton:
            return add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype), x
