"""The key mean (K smoothing) and the Q/K channel balance, measured once per model.

Softmax is invariant to a shift shared by every key a query sees, so subtracting one mean
vector per (layer, KV head) from every key — prefix pages, new chunks, decode tokens and
pages shared through the prefix cache alike — changes nothing exactly, while taking the
large common component out of the keys before they are quantized to INT8. One vector per
model (not per sequence) is what lets the prefix cache share 8-bit pages between requests.

The channel balance c = sqrt(max|k| / max|q|) per (layer, KV head, channel) is likewise
fixed per model: Q·c and K/c give the same product while sharing the outlier channels'
range between the two INT8 quantizations.

Both come from the post-rotary keys and queries over a fixed calibration text (bundled, so
every machine computes the same vector), or over seeded random token ids for a model
without a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_TOKENS = 512


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


class QKStatsCollector:
    """An AttentionContext for one sequence: exact causal attention, recording q and k."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.q_absmax: dict[int, torch.Tensor] = {}

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (causal, one sequence)."""
        tokens, kv_heads = k.shape[0], k.shape[1]
        self.keys[layer_id] = k.float().clone()
        grouped = q.float().abs().view(tokens, kv_heads, -1, q.shape[-1])
        self.q_absmax[layer_id] = grouped.amax(dim=(0, 2))
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def result(self) -> QKCalibration:
        layers = sorted(self.keys)
        keys = torch.stack([self.keys[i] for i in layers])  # [L, T, Hkv, D]
        k_mean = keys.double().mean(dim=1).float()
        return QKCalibration(
            k_mean=k_mean,
            k_absmax=(keys - k_mean[:, None]).abs().amax(dim=1),
            k_absmax_raw=keys.abs().amax(dim=1),
            q_absmax=torch.stack([self.q_absmax[i] for i in layers]),
        )


def calibration_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """CALIBRATION_TOKENS ids of the bundled text, or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(), add_special_tokens=False)
        return list(ids[:CALIBRATION_TOKENS])
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (CALIBRATION_TOKENS,), generator=gen).tolist()


@torch.inference_mode()
def calibrate_qk(model: torch.nn.Module, token_ids: list[int]) -> QKCalibration:
    """Post-rotary Q and K statistics of `model` over one sequence of token ids."""
    device = next(model.parameters()).device
    collector = QKStatsCollector()
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
    model(ids, torch.arange(len(token_ids), device=device), collector)
    return collector.result()
