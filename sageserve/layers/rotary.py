"""Rotary position embeddings (NeoX / HF "rotate_half" layout) with linear and llama3 scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sageserve.layers.fused.rotary import rotary_qk


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies theta^(-2i/head_dim), rescaled per `scaling`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = None if scaling is None else scaling["rope_type"]
    if rope_type is None:
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: linear, llama3")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for every position up to `max_positions`.

    The tables are a non-persistent buffer in the model dtype (HF also rounds cos/sin to the
    activation dtype); call `reset_tables` after materialising a module built on the meta device.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim), persistent=False)
        self.use_triton = False  # rotate in one fused kernel per layer (layers/fused)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Fill `cos_sin` [max_positions, head_dim] = cat(cos, sin) of position * inv_freq."""
        if self.cos_sin.is_meta:
            return
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        self.cos_sin.copy_(torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim // 2], broadcastable over heads."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

    def at(self, positions: torch.Tensor) -> Rotation:
        """The rotation of one step's tokens, positions [T], applied by every layer."""
        if self.use_triton:
            return Rotation(positions, self.cos_sin)
        return Rotation(positions, self.cos_sin, *self.lookup(positions))


@dataclass(frozen=True)
class Rotation:
    """Rotates a step's q [T, Hq, D] and k [T, Hkv, D]: by cos/sin [T, 1, D/2] gathered once
    per step (torch ops), or, when they are None, by the fused kernel, which reads the
    table rows of `positions` itself."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None:
            return rotary_qk(q, k, self.positions, self.cos_sin)
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by (cos, sin) [T, 1, D/2]: halves (x1, x2) -> (x1c - x2s, x2c + x1s)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
