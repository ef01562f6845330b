"""Per-layer attention precision (`--sage-calibrate`): the fewest layers kept exact.

The 8-bit path's error is close to additive over layers and a few layers carry much of it
(BENCHMARKS.md, issue 18: on SmolLM2 the 30 one-layer KLs sum to 9.3e-4 against 8.9e-4 with
every layer in 8 bits; layer 10 alone carries 18%). So at start-up, over the calibration
tokens, with exact attention elsewhere:

1. KL(exact || 8-bit in layer i only), per token and averaged, for every candidate layer;
2. the KL with every candidate in 8 bits;
3. layers are kept exact, the largest first, until the one-layer KLs taken away bring the
   sum under the budget; the whole model is then measured with the rest in 8 bits, and more
   layers follow one at a time while that measurement is still over the budget.

The plan can be saved to and read from a JSON file (`--sage-calibration-file`), which
skips the measurements on later starts; a file made for another model shape, budget or
8-bit configuration is refused, never silently used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sageserve.attention.sage_attn.calibration import exact_causal_attention

# layer_id, q [T, Hq, D], k, v [T, Hkv, D] -> [T, Hq, D]: 8-bit attention of one sequence.
QuantizedAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerPrecisionPlan:
    """What `plan_layer_precision` measured and chose.

    kl_per_layer: KL with only that layer in 8 bits; kl_all_8bit: every candidate in 8 bits;
    kl_planned: with `exact_layers` exact and the other candidates in 8 bits. KLs are mean
    KL(exact || mixed) per token of the next-token distributions, in nats.
    key: what the plan is valid for (model shape, 8-bit options, budget, tokens).
    """

    key: dict
    budget: float
    tokens: int
    kl_per_layer: dict[int, float]
    kl_all_8bit: float
    exact_layers: tuple[int, ...]
    kl_planned: float

    def save(self, path: Path) -> None:
        data = asdict(self) | {"kl_per_layer": {str(k): v for k, v in self.kl_per_layer.items()}}
        path.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path, key: dict) -> LayerPrecisionPlan:
        """The plan in `path`; ValueError when it was made for another `key`."""
        data = json.loads(path.read_text())
        if data.get("key") != key:
            raise ValueError(
                f"{path} was made for {data.get('key')}, not for {key}: delete it or give "
                "another --sage-calibration-file to measure again"
            )
        data["kl_per_layer"] = {int(k): v for k, v in data["kl_per_layer"].items()}
        data["exact_layers"] = tuple(data["exact_layers"])
        return cls(**data)


class MixedPrecisionAttention:
    """An AttentionContext for one sequence: 8-bit attention in `eight_bit` layers, exact
    causal attention (SDPA) in the others."""

    def __init__(self, eight_bit: Iterable[int], quantized: QuantizedAttention) -> None:
        self.eight_bit = frozenset(eight_bit)
        self.quantized = quantized

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] in q's dtype."""
        if layer_id in self.eight_bit:
            return self.quantized(layer_id, q, k, v).to(q.dtype)
        return exact_causal_attention(q, k, v)


class _Scorer:
    """KL of the model with a given set of 8-bit layers against all-exact attention."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, quantized: QuantizedAttention):
        self.model, self.ids, self.quantized = model, ids, quantized
        self.positions = torch.arange(len(ids), device=ids.device)
        self.reference = self._logprobs(())

    def _logprobs(self, eight_bit: Iterable[int]) -> torch.Tensor:
        """[T, vocab] fp32 next-token log-probabilities."""
        context = MixedPrecisionAttention(eight_bit, self.quantized)
        hidden = self.model(self.ids, self.positions, context)
        return F.log_softmax(self.model.compute_logits(hidden), dim=-1)

    def kl(self, eight_bit: list[int]) -> float:
        """Mean over tokens of KL(exact || these layers in 8 bits)."""
        test = self._logprobs(eight_bit)
        if test.isnan().any() or self.reference.isnan().any():
            raise RuntimeError(f"NaN log-probabilities with 8-bit layers {sorted(eight_bit)}")
        prob = self.reference.exp()
        # Tokens of probability 0 (log-prob -inf) add nothing, not 0 * inf.
        terms = torch.where(prob > 0, prob * (self.reference - test), 0.0)
        kl = terms.sum(dim=-1).mean().item()
        if not math.isfinite(kl):
            raise RuntimeError(f"the KL of 8-bit layers {sorted(eight_bit)} is {kl}")
        return kl


@torch.inference_mode()
def plan_layer_precision(
    model: torch.nn.Module,
    token_ids: list[int],
    quantized: QuantizedAttention,
    candidates: list[int],
    budget: float,
    key: dict,
) -> LayerPrecisionPlan:
    """The fewest `candidates` (layers that would run in 8 bits) to keep exact so that the
    measured KL over `token_ids` is at most `budget` (module docstring)."""
    device = next(model.parameters()).device
    scorer = _Scorer(model, torch.tensor(token_ids, dtype=torch.int64, device=device), quantized)
    per_layer = {layer: scorer.kl([layer]) for layer in candidates}
    kl_all = scorer.kl(candidates)
    exact, kl = _choose_exact(per_layer, kl_all, budget, scorer, candidates)
    return LayerPrecisionPlan(key, budget, len(token_ids), per_layer, kl_all, exact, kl)


def _choose_exact(
    per_layer: dict[int, float],
    kl_all: float,
    budget: float,
    scorer: _Scorer,
    candidates: list[int],
) -> tuple[tuple[int, ...], float]:
    """(layers kept exact, the KL measured with them), largest one-layer KL first."""
    exact: list[int] = []
    measured = predicted = kl_all
    for layer in sorted(per_layer, key=per_layer.__getitem__, reverse=True):
        if measured <= budget:
            break
        exact.append(layer)
        predicted -= per_layer[layer]
        if predicted <= budget or len(exact) == len(candidates):
            measured = predicted = scorer.kl([i for i in candidates if i not in exact])
    return tuple(sorted(exact)), measured
