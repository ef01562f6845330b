"""The key mean used for K smoothing, measured once per model at start-up.

Softmax is invariant to a shift shared by every key a query sees, so subtracting one mean
vector per (layer, KV head) from every key — prefix pages, new chunks, decode tokens and
pages shared through the prefix cache alike — changes nothing exactly, while taking the
large common component out of the keys before they are quantized to INT8. One vector per
model (not per sequence) is what lets the prefix cache share 8-bit pages between requests.

The vector is the mean of the post-rotary keys over a fixed calibration text (bundled, so
every machine computes the same vector), or over seeded random token ids for a model
without a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
CALIBRATION_TOKENS = 512


class KeyMeanCollector:
    """An AttentionContext for one sequence: exact causal attention, summing keys per layer."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device) -> None:
        self.sums = torch.zeros(
            num_layers, num_kv_heads, head_dim, dtype=torch.float64, device=device
        )
        self.count = 0

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (causal, one sequence)."""
        self.sums[layer_id] += k.double().sum(dim=0)
        if layer_id == 0:
            self.count += k.shape[0]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            enable_gqa=True,
        )
        return out.transpose(0, 1)

    def means(self) -> torch.Tensor:
        """[num_layers, num_kv_heads, head_dim] float32."""
        return (self.sums / max(self.count, 1)).float()


def calibration_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """CALIBRATION_TOKENS ids of the bundled text, or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(), add_special_tokens=False)
        return list(ids[:CALIBRATION_TOKENS])
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (CALIBRATION_TOKENS,), generator=gen).tolist()


@torch.inference_mode()
def measure_key_means(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Mean post-rotary key per (layer, KV head): [num_layers, num_kv_heads, head_dim] fp32."""
    cfg = model.config
    device = next(model.parameters()).device
    collector = KeyMeanCollector(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, device)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
    model(ids, torch.arange(len(token_ids), device=device), collector)
    return collector.means()
