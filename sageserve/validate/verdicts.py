"""Pass/fail verdicts per section, against the thresholds of `Thresholds`.

The agreement, perplexity and MMLU verdicts judge each backend by its profile (profiles.py:
16-bit backends by SGLang's per-token rule, 8-bit ones by bars fit for quantized attention);
a check's name carries the profile's note when it is not the backend's own. A backend run
in a lower dtype than the reference, beside exact attention in that dtype (its floor), is
judged by what it adds to the floor (floors.py); the floor is shown, not judged. A section whose
figures have no threshold set gets status "info"; one that did not run gets "not_run" or
"unsupported" with the reason. The run passes when no verdict is "fail".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sageserve.validate.config import Thresholds
from sageserve.validate.floors import NO_FLOORS, Floors
from sageserve.validate.profiles import ProfileChoice


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


def agreement_verdict(
    per_backend: dict[str, dict[str, dict[str, Any]]],
    th: Thresholds,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> Verdict:
    """Every compared backend and group, by its profile (module docstring); a dtype floor
    is shown, not judged, and a backend with a floor is judged by what it adds to it."""
    checks = []
    for label, groups in per_backend.items():
        choice = profiles[label]
        note = choice.note + floors.note(label)
        for group, s in groups.items():
            name = f"{label} {group}"
            if "floor" in s:
                judge = _over_floor_8bit if choice.profile == "8bit" else _over_floor_16bit
            else:
                judge = _agreement_8bit if choice.profile == "8bit" else _agreement_16bit
            group_checks = judge(name, s, th, note)
            checks += _as_floors_allow(label, group_checks, floors)
    return from_checks(checks)


def _as_floors_allow(label: str, checks: list[Check], floors: Floors) -> list[Check]:
    """checks as given, or shown and not judged when label is a dtype floor."""
    if label not in floors.floors:
        return checks
    return [Check(c.name, c.value, f"shown, not judged ({c.limit})", None) for c in checks]


def _over_floor_16bit(name: str, s: dict[str, Any], th: Thresholds, note: str) -> list[Check]:
    frac, kl = s["frac_within_vs_floor"], s["excess_mean_kl"]
    return [
        Check(f"{name}: share |log p − log p floor| < {th.logprob_delta:g}{note}", frac,
              f">= {th.logprob_delta_quantile:g}", frac >= th.logprob_delta_quantile),
        Check(f"{name}: excess mean KL over the floor{note}", kl, f"< {th.mean_kl:g}",
              kl < th.mean_kl),
    ]  # fmt: skip


def _over_floor_8bit(name: str, s: dict[str, Any], th: Thresholds, note: str) -> list[Check]:
    kl_high, top1_high = s["excess_mean_kl_ci"][1], s["top1_vs_floor_ci"][1]
    return [
        _share_check(name, s, th, False, note),
        Check(f"{name}: excess mean KL over the floor, upper CI{note}", kl_high,
              f"< {th.mean_kl:g}", kl_high < th.mean_kl),
        Check(f"{name}: top-1 against the floor, upper CI{note}", top1_high,
              f">= {th.min_top1:g}", top1_high >= th.min_top1),
    ]  # fmt: skip


def _share_check(name: str, s: dict[str, Any], th: Thresholds, judged: bool, note: str) -> Check:
    frac = s["frac_within_logprob_delta"]
    limit = f">= {th.logprob_delta_quantile:g}" if judged else "shown (not judged for 8-bit)"
    return Check(
        f"{name}: share |Δ logprob| < {th.logprob_delta:g}{note}",
        frac,
        limit,
        frac >= th.logprob_delta_quantile if judged else None,
    )


def _agreement_16bit(name: str, s: dict[str, Any], th: Thresholds, note: str) -> list[Check]:
    kl = s["mean_kl"]
    return [
        _share_check(name, s, th, True, note),
        Check(f"{name}: mean KL{note}", kl, f"< {th.mean_kl:g}", kl < th.mean_kl),
    ]


def _agreement_8bit(name: str, s: dict[str, Any], th: Thresholds, note: str) -> list[Check]:
    kl_high = s["mean_kl_ci"][1]
    # Judged like the KL, through its interval: a few near-tie flips in a short context
    # (64 tokens: 62/64 is 96.9%) must not fail it; only agreement significantly below the
    # floor does.
    top1_high = s["top1_ci"][1]
    return [
        _share_check(name, s, th, False, note),
        Check(f"{name}: mean KL, upper CI{note}", kl_high, f"< {th.mean_kl:g}",
              kl_high < th.mean_kl),
        Check(f"{name}: top-1 agreement, upper CI{note}", top1_high, f">= {th.min_top1:g}",
              top1_high >= th.min_top1),
    ]  # fmt: skip


def perplexity_verdict(
    per_backend: dict[str, dict[str, Any]],
    th: Thresholds,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> Verdict:
    """16-bit: |Δ perplexity| < limit; 8-bit: both ends of its CI within ±limit. Against
    the dtype floor where the label has one; a floor itself is shown, not judged."""
    checks = []
    for label, r in per_backend.items():
        if "delta_rel" not in r:
            continue
        choice = profiles[label]
        key = "delta_rel_vs_floor" if "floor" in r else "delta_rel"
        what = "Δ perplexity against the floor" if "floor" in r else "Δ perplexity"
        note = choice.note + floors.note(label)
        if choice.profile == "8bit":
            worst = max(abs(end) for end in r[f"{key}_ci"])
            name = f"{label}: |{what}| (relative), farther CI end{note}"
        else:
            worst = abs(r[key])
            name = f"{label}: |{what}| (relative){note}"
        check = Check(name, worst, f"< {th.ppl_delta_rel:g}", worst < th.ppl_delta_rel)
        checks += _as_floors_allow(label, [check], floors)
    return from_checks(checks)


def mmlu_verdict(
    per_backend: dict[str, dict[str, Any]],
    th: Thresholds,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> Verdict:
    """The answer-flip rate against its limit when set; for 8-bit also McNemar's test.
    Against the dtype floor where the label has one; a floor itself is shown, not judged."""
    limit = th.max_mmlu_flip_rate
    checks = []
    for label, r in per_backend.items():
        if "flip_rate" not in r:
            continue
        choice = profiles[label]
        note = choice.note + floors.note(label)
        against, whom = (r["vs_floor"], "the floor") if "floor" in r else (r, "the reference")
        label_checks = [Check(
            f"{label}: answer-flip rate against {whom}{note}",
            against["flip_rate"],
            "no threshold" if limit is None else f"<= {limit:g}",
            None if limit is None else against["flip_rate"] <= limit,
        )]  # fmt: skip
        if choice.profile == "8bit":
            p = against["mcnemar_p"]
            label_checks.append(Check(
                f"{label}: McNemar p, correct answers vs {whom}{note}",
                p, f">= {th.mcnemar_alpha:g} (no significant change)", p >= th.mcnemar_alpha,
            ))  # fmt: skip
        checks += _as_floors_allow(label, label_checks, floors)
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
