"""Pass/fail verdicts per section, against the thresholds of `Thresholds`.

A section whose figures have no threshold set gets status "info"; one that did not run gets
"not_run" or "unsupported" with the reason. The run passes when no verdict is "fail".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sageserve.validate.config import Thresholds


@dataclass(frozen=True)
class Check:
    """One figure against one limit; passed is None when no limit applies."""

    name: str
    value: float | bool | None
    limit: str
    passed: bool | None


@dataclass(frozen=True)
class Verdict:
    status: str  # pass | fail | info | not_run | unsupported
    checks: list[Check] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_checks(checks: list[Check]) -> Verdict:
    """fail if any check failed, pass if some passed, else info."""
    if any(c.passed is False for c in checks):
        return Verdict("fail", checks)
    if any(c.passed for c in checks):
        return Verdict("pass", checks)
    return Verdict("info", checks)


def logprobs_verdict(per_backend: dict[str, dict[str, Any]]) -> Verdict:
    checks = [
        Check(f"{label}: inconsistent positions", r["num_failures"], "== 0", r["num_failures"] == 0)
        for label, r in per_backend.items()
    ]
    return from_checks(checks)


def agreement_verdict(per_backend: dict[str, dict[str, dict[str, Any]]], th: Thresholds) -> Verdict:
    """Every compared backend and group: the |Δ logprob| quantile and the mean KL."""
    checks = []
    share = f">= {th.logprob_delta_quantile:g}"
    for label, groups in per_backend.items():
        for group, s in groups.items():
            frac = s["frac_within_logprob_delta"]
            checks.append(
                Check(
                    f"{label} {group}: share |Δ logprob| < {th.logprob_delta:g}",
                    frac,
                    share,
                    frac >= th.logprob_delta_quantile,
                )
            )
            checks.append(
                Check(
                    f"{label} {group}: mean KL",
                    s["mean_kl"],
                    f"< {th.mean_kl:g}",
                    s["mean_kl"] < th.mean_kl,
                )
            )
    return from_checks(checks)


def perplexity_verdict(per_backend: dict[str, dict[str, Any]], th: Thresholds) -> Verdict:
    checks = [
        Check(
            f"{label}: |Δ perplexity| (relative)",
            abs(r["delta_rel"]),
            f"< {th.ppl_delta_rel:g}",
            abs(r["delta_rel"]) < th.ppl_delta_rel,
        )
        for label, r in per_backend.items()
        if "delta_rel" in r
    ]
    return from_checks(checks)


def mmlu_verdict(per_backend: dict[str, dict[str, Any]], th: Thresholds) -> Verdict:
    limit = th.max_mmlu_flip_rate
    checks = [
        Check(
            f"{label}: answer-flip rate",
            r["flip_rate"],
            "no threshold" if limit is None else f"<= {limit:g}",
            None if limit is None else r["flip_rate"] <= limit,
        )
        for label, r in per_backend.items()
        if "flip_rate" in r
    ]
    return from_checks(checks)


def throughput_verdict(speedups: dict[str, dict[str, dict[str, float]]], th: Thresholds) -> Verdict:
    limit = th.min_decode_speedup
    checks = []
    for label, per_case in speedups.items():
        worst = min(s["decode"] for s in per_case.values())
        checks.append(
            Check(
                f"{label}: slowest decode speedup over cases",
                worst,
                "no threshold" if limit is None else f">= {limit:g}",
                None if limit is None else worst >= limit,
            )
        )
    return from_checks(checks)


def memory_verdict(
    per_backend: dict[str, dict[str, Any]], reference: str, th: Thresholds
) -> Verdict:
    limit = th.max_kv_bytes_ratio
    ref = per_backend[reference]["kv_bytes_per_token"]
    checks = []
    for label, r in per_backend.items():
        if label == reference:
            continue
        ratio = r["kv_bytes_per_token"] / ref
        checks.append(
            Check(
                f"{label}: KV bytes per token / reference's",
                ratio,
                "no threshold" if limit is None else f"<= {limit:g}",
                None if limit is None else ratio <= limit,
            )
        )
    return from_checks(checks)


def determinism_verdict(per_backend: dict[str, dict[str, Any]], th: Thresholds) -> Verdict:
    """Greedy tokens identical everywhere; chosen logprobs within a tolerance when one is set."""
    checks = []
    for label, r in per_backend.items():
        named = [(f"repeat {i + 2}", d) for i, d in enumerate(r["repeats"])]
        named += [
            ("alone vs batch", r["alone_vs_batch"]),
            ("cache miss vs hit", r["cache_miss_vs_hit"]),
        ]
        for name, d in named:
            where = "" if d["first_token_diff"] is None else f" (first at {d['first_token_diff']})"
            checks.append(
                Check(
                    f"{label} {name}: same tokens{where}",
                    d["identical_tokens"],
                    "identical",
                    d["identical_tokens"],
                )
            )
            if th.determinism_logprob_tol is not None:
                tol = th.determinism_logprob_tol
                checks.append(
                    Check(
                        f"{label} {name}: max |Δ logprob|",
                        d["max_logprob_delta"],
                        f"<= {tol:g}",
                        d["max_logprob_delta"] <= tol,
                    )
                )
        hit = r["cache_miss_vs_hit"]["cached_tokens"][1]
        # Without a hit the miss-vs-hit comparison would not test the cache at all.
        checks.append(Check(f"{label} cache-hit run: tokens from the cache", hit, "> 0", hit > 0))
    return from_checks(checks)
