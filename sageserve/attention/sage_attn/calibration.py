"""The key mean (K smoothing) and the Q/K channel balance, measured once per model.

Softmax is invariant to a shift shared by every key a query sees, so subtracting one mean
vector per (layer, KV head) from every key — prefix pages, new chunks, decode tokens and
pages shared through the prefix cache alike — changes nothing exactly, while taking the
large common component out of the keys before they are quantized to INT8. One vector per
model (not per sequence) is what lets the prefix cache share 8-bit pages between requests.

The channel balance c = sqrt(max|k| / max|q|) per (layer, KV head, channel) is likewise
fixed per model: Q·c and K/c give the same product while sharing the outlier channels'
range between the two INT8 quantizations.

Rotary embeddings make post-rotary statistics depend on position: a channel pair turning
slowly is seen at one phase by a short calibration text and at another phase 8k tokens
later. So every statistic is taken over the calibration tokens as they would be at many
positions across the model's whole context (`ROTARY_OFFSETS` shifts, applied exactly by
rotating the collected q and k further, since a shift of every position rotates each
pair by a fixed angle). Measured on SmolLM2 at 8k positions, statistics from positions
0..511 alone gave a mean KL of 5.0e-3 (1.1e-3 without the balance).

With the Hadamard rotation on (`rotation.py`), every statistic is taken of the rotated
queries and keys, which is what the quantizers then see.

Both come from the post-rotary keys and queries over a fixed calibration text (bundled, so
every machine computes the same vector), or over seeded random token ids for a model
without a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sageserve.attention.sage_attn.rotation import hadamard_rotate
from sageserve.layers.rotary import RotaryEmbedding, apply_rotary

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_TOKENS = 512
ROTARY_OFFSETS = 64  # position shifts the statistics cover, spread over the context
# Offsets whose shifted queries are held at once: [8, 512, 32, 128] fp32 is 67 MB for an
# 8B model, where all 64 would be 0.5 GB (twice that while the rotation runs).
QUERY_OFFSET_CHUNK = 8


@dataclass
class QKCalibration:
    """Per (layer, KV head, channel) statistics: each [num_layers, num_kv_heads, head_dim]."""

    k_mean: torch.Tensor
    k_absmax: torch.Tensor  # max |k - k_mean| over the calibration tokens
    k_absmax_raw: torch.Tensor  # max |k|, for when smoothing is off
    q_absmax: torch.Tensor  # max |q| over the tokens and the query heads of the KV head

    def channel_scale(self, smoothed: bool) -> torch.Tensor:
        """c = sqrt(max|k| / max|q|): Q·c and K/c then have equal per-channel ranges."""
        k_absmax = self.k_absmax if smoothed else self.k_absmax_raw
        return (k_absmax.clamp_min(1e-6) / self.q_absmax.clamp_min(1e-6)).sqrt()


def exact_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence, causal. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (SDPA)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


class QKStatsCollector:
    """An AttentionContext for one sequence: exact causal attention, recording q and k."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.queries: dict[int, torch.Tensor] = {}

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (causal, one sequence)."""
        tokens, kv_heads = k.shape[0], k.shape[1]
        self.keys[layer_id] = k.float().clone()
        self.queries[layer_id] = q.float().view(tokens, kv_heads, -1, q.shape[-1]).clone()
        return exact_causal_attention(q, k, v)

    def result(self, cos: torch.Tensor, sin: torch.Tensor, hadamard: bool) -> QKCalibration:
        """Statistics over the collected tokens shifted by each offset.

        cos, sin: [O, D/2], the rotation of each position offset; hadamard: of the
        Hadamard-rotated queries and keys.
        """
        layers = sorted(self.keys)
        stats = [_layer_stats(self.queries[i], self.keys[i], cos, sin, hadamard) for i in layers]
        return QKCalibration(*(torch.stack(parts) for parts in zip(*stats, strict=True)))


def _shifted(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D] rotated by each offset: [O, T, ..., D]."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 1) + (cos.shape[1],)
    return apply_rotary(x[None], cos.view(shape), sin.view(shape))


def _layer_stats(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hadamard: bool
) -> tuple[torch.Tensor, ...]:
    """(k_mean, k_absmax, k_absmax_raw, q_absmax), each [Hkv, D], for one layer.

    q: [T, Hkv, group, D]; k: [T, Hkv, D], post-rotary at positions 0..T-1.
    """
    rotate = hadamard_rotate if hadamard else torch.Tensor.float
    keys = rotate(_shifted(k, cos, sin).flatten(0, 1))  # [O * T, Hkv, D]
    k_mean = keys.double().mean(dim=0).float()
    q_absmax = torch.stack([
        rotate(_shifted(q, cos[i : i + QUERY_OFFSET_CHUNK], sin[i : i + QUERY_OFFSET_CHUNK]))
        .abs().amax(dim=(0, 1, 3))
        for i in range(0, cos.shape[0], QUERY_OFFSET_CHUNK)
    ]).amax(dim=0)  # fmt: skip
    return (
        k_mean,
        (keys - k_mean).abs().amax(dim=0),
        keys.abs().amax(dim=0),
        q_absmax,
    )


def calibration_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """CALIBRATION_TOKENS ids of the bundled text, or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(), add_special_tokens=False)
        return list(ids[:CALIBRATION_TOKENS])
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (CALIBRATION_TOKENS,), generator=gen).tolist()


@torch.inference_mode()
def calibrate_qk(
    model: torch.nn.Module, token_ids: list[int], hadamard: bool = False
) -> QKCalibration:
    """Post-rotary Q and K statistics of `model` over one sequence of token ids, of the
    Hadamard-rotated queries and keys when `hadamard`."""
    device = next(model.parameters()).device
    collector = QKStatsCollector()
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
    model(ids, torch.arange(len(token_ids), device=device), collector)
    cos, sin = _offset_rotations(model, len(token_ids))
    return collector.result(cos, sin, hadamard)


def _offset_rotations(model: torch.nn.Module, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [O, D/2] of up to ROTARY_OFFSETS shifts spread over the model's positions."""
    rotary = next(m for m in model.modules() if isinstance(m, RotaryEmbedding))
    last = max(rotary.max_positions - tokens, 0)
    offsets = torch.linspace(0, last, min(ROTARY_OFFSETS, last + 1)).round().long().unique()
    cos, sin = rotary.cos_sin[offsets.to(rotary.cos_sin.device)].float().chunk(2, dim=-1)
    return cos, sin
