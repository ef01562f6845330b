"""Section 3: perplexity of the text per backend, and its change against the reference.

Uses the target log-probabilities the agreement section already computed for one context
group's windows (`Sizes.ppl_group`), so no window is scored twice.
"""

from __future__ import annotations

from typing import Any

import torch

from sageserve.validate.metrics import perplexity, ppl_delta_ci


def perplexity_results(
    target_lp: dict[str, dict[str, torch.Tensor]],
    keys: list[str],
    reference: str,
    confidence: float,
    seed: int,
    floor_of: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per backend label: perplexity over the windows `keys`; delta and CI against reference,
    and against its dtype floor for a label in `floor_of` (label -> floor label, floors.py).

    target_lp: label -> window key -> [n - 1] log p(actual next token).
    """
    ref = torch.cat([target_lp[reference][k] for k in keys]).double()
    ppl_ref = perplexity(ref)
    out: dict[str, dict[str, Any]] = {}
    for label, per_window in target_lp.items():
        lp = torch.cat([per_window[k] for k in keys]).double()
        ppl = perplexity(lp)
        row: dict[str, Any] = {"tokens": int(lp.numel()), "perplexity": ppl}
        if label != reference:
            lo, hi = ppl_delta_ci(ref, lp, confidence, seed=seed)
            row |= {"delta_rel": ppl / ppl_ref - 1, "delta_rel_ci": [lo, hi]}
        if floor := (floor_of or {}).get(label):
            floor_lp = torch.cat([target_lp[floor][k] for k in keys]).double()
            lo, hi = ppl_delta_ci(floor_lp, lp, confidence, seed=seed)
            row |= {"floor": floor, "delta_rel_vs_floor": ppl / perplexity(floor_lp) - 1,
                    "delta_rel_vs_floor_ci": [lo, hi]}  # fmt: skip
        out[label] = row
    return out
