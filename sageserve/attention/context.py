"""The one thing a model needs from attention: a per-step context it calls in every layer."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    """Per-step attention for a flat batch of tokens.

    The engine builds one per step (metadata computed once, never per layer); every
    attention layer calls `attend` with its own index.
    """

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store k, v for the step's tokens, then attend.

        q: [tokens, num_q_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim]
        (rotary already applied). Returns [tokens, num_q_heads, head_dim] in q's dtype.
        """
        ...
