"""The dtype floor: judging a backend run in a lower dtype than the reference by what it adds.

In `torch@float32,torch,sage_attn --dtype bfloat16` the reference is exact attention in fp32
and both other entries run the model in bf16. Exact attention in bf16 already moves the
distribution (SmolLM2 on an H100: mean KL 1.1e-3 from fp32, top-1 agreement 95-98%, 76-80%
of tokens within SGLang's 0.05 per-token bar; BENCHMARKS.md, 2026-12-06), so judged against
fp32 every bf16 backend pays bf16's own rounding before its attention is looked at. The
bf16 torch entry is that **floor**: it is shown, not judged (it measures the model's dtype,
not an attention backend), and each other entry in bf16 is judged by what it adds to it,
token for token over the same positions:

- excess KL: the mean of KL(ref ‖ backend) − KL(ref ‖ floor), with its normal-approximation
  interval, against the same `mean_kl` bar;
- top-1 against the floor: 1 − (floor's agreement − backend's agreement), against
  `min_top1` (8-bit: its interval's upper end); above 1 where the backend agrees with the
  reference on tokens where the floor does not;
- the per-token share of |log p_backend − log p_floor| < `logprob_delta` (16-bit rule);
- perplexity: the change against the floor's, by the paired block bootstrap;
- MMLU: answer flips and McNemar's test against the floor's answers.

Without an exact entry in its dtype, a backend is judged against the reference as before.
Determinism is each backend's own in every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sageserve.validate.metrics import TokenComparison, mean_ci

EXACT_BACKEND = "torch"  # exact attention (`attention/torch_native`): the floor's backend


@dataclass(frozen=True)
class Floors:
    """of: label -> the label of its floor (exact attention in the label's dtype); floors:
    the labels that are a floor (exact attention in another dtype than the reference's)."""

    of: dict[str, str]
    floors: frozenset[str]

    def note(self, label: str) -> str:
        """What a check name carries: judged against a floor, or being one."""
        if label in self.floors:
            return " [dtype floor: exact attention in a lower dtype, shown, not judged]"
        if label in self.of:
            return f" [against its dtype floor {self.of[label]}]"
        return ""


NO_FLOORS = Floors({}, frozenset())


def find_floors(dtypes: dict[str, str], backends: dict[str, str], reference: str) -> Floors:
    """The floors of a run. dtypes: label -> its model's dtype (resolved: "float32",
    "bfloat16", "float16"); backends: label -> attention backend. Only a dtype less precise
    than the reference's has a floor; labels missing from dtypes (remote servers) get none."""
    if reference not in dtypes:
        return NO_FLOORS
    ref_eps = _eps(dtypes[reference])
    floors = {
        label
        for label, dtype in dtypes.items()
        if label != reference and _eps(dtype) > ref_eps and backends[label] == EXACT_BACKEND
    }
    first = {}
    for label in dtypes:  # the first exact entry of a dtype is its floor
        if label in floors:
            first.setdefault(dtypes[label], label)
    of = {
        label: first[dtype]
        for label, dtype in dtypes.items()
        if label != reference and label not in floors and dtype in first
    }
    return Floors(of, frozenset(floors))


def _eps(dtype: str) -> float:
    """Machine epsilon of a dtype name: the larger, the less precise."""
    return torch.finfo(getattr(torch, dtype)).eps


def excess_stats(
    test: TokenComparison, floor: TokenComparison, logprob_delta: float, confidence: float
) -> dict[str, Any]:
    """What `test` adds to `floor`, both against one reference on the same [n] tokens (see
    the module docstring): excess_mean_kl (+ _ci), top1_vs_floor (+ _ci), and
    frac_within_vs_floor."""
    if test.n_tokens != floor.n_tokens:
        raise ValueError(f"compared on different tokens: {test.n_tokens} vs {floor.n_tokens}")
    excess = test.kl - floor.kl
    lost = floor.top1.double() - test.top1.double()
    lost_low, lost_high = mean_ci(lost, confidence)
    within = ((test.test_lp - floor.test_lp).abs() < logprob_delta).double().mean().item()
    return {
        "excess_mean_kl": excess.mean().item(),
        "excess_mean_kl_ci": list(mean_ci(excess, confidence)),
        "top1_vs_floor": 1 - lost.mean().item(),
        "top1_vs_floor_ci": [1 - lost_high, 1 - lost_low],
        "frac_within_vs_floor": within,
    }
