"""Turn raw local measurements (`runner.LocalResults`) into report sections with verdicts.

Each section is {"verdict": Verdict.to_dict(), "results": {...}, "method": str}; the
agreement section also hands per-token vectors to the plots (`PlotData`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.bench.offline_measure import summarize
from sageserve.validate import determinism, mmlu, throughput, verdicts
from sageserve.validate.agreement import PREFIX_GROUP
from sageserve.validate.config import CONTEXT_GROUPS, ValidateConfig
from sageserve.validate.floors import NO_FLOORS, Floors, excess_stats, find_floors
from sageserve.validate.metrics import TokenComparison, agreement_stats
from sageserve.validate.perplexity import perplexity_results
from sageserve.validate.profiles import ProfileChoice
from sageserve.validate.runner import LocalResults
from sageserve.validate.verdicts import Verdict


@dataclass
class PlotData:
    """Per-token vectors for the plots: label -> group -> [n] values / per-window lists."""

    kl: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    delta_by_window: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)


def _section(verdict: Verdict, results: Any, method: str) -> dict[str, Any]:
    return {"verdict": verdict.to_dict(), "results": results, "method": method}


def not_run(reason: str) -> dict[str, Any]:
    return _section(Verdict("not_run", reason=reason), {}, "")


def agreement_section(
    cfg: ValidateConfig,
    res: LocalResults,
    plots: PlotData,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> dict[str, Any]:
    th = cfg.thresholds
    per_backend: dict[str, dict[str, Any]] = {}
    joined = {
        (label, group): TokenComparison.cat(parts)
        for label, scores in res.scores.items()
        for group, parts in scores.comparisons.items()
    }
    for label, scores in res.scores.items():
        for group, parts in scores.comparisons.items():
            cmp = joined[label, group]
            stats = agreement_stats(cmp, cfg.confidence, cfg.seed).to_dict()
            within = (cmp.abs_logprob_delta < th.logprob_delta).double().mean().item()
            stats |= {"windows": len(parts), "frac_within_logprob_delta": within}
            if (floor := floors.of.get(label)) is not None:
                stats |= {"floor": floor} | excess_stats(
                    cmp, joined[floor, group], th.logprob_delta, cfg.confidence
                )
            if group == PREFIX_GROUP:
                stats["cached_prefix_tokens"] = scores.cached_tokens
            if label != cfg.reference or group == PREFIX_GROUP:
                per_backend.setdefault(label, {})[group] = stats
            plots.kl.setdefault(label, {})[group] = cmp.kl
            deltas = [p.abs_logprob_delta for p in parts]
            plots.delta_by_window.setdefault(label, {})[group] = deltas
    skipped = [g for g in CONTEXT_GROUPS if cfg.sizes.group(g).count == 0]
    results = {"backends": per_backend, "groups_not_run": skipped, "windows": _windows(res)}
    method = (
        "teacher-forced on identical tokens; KL(reference || backend) per token in float64; "
        f"|Δ logprob| of the actual next token; {PREFIX_GROUP}: suffix scored through the "
        "request path after its prefix was served once (prefix cache), against the "
        "reference's from-scratch teacher forcing"
    )
    if floors.floors:
        method += (
            f"; dtype floors ({', '.join(sorted(floors.floors))}): exact attention in a lower "
            "dtype than the reference, shown, not judged; a backend in that dtype is judged by "
            "what it adds to its floor on the same tokens (validate/floors.py)"
        )
    verdict = verdicts.agreement_verdict(per_backend, th, profiles, floors)
    return _section(verdict, results, method)


def _windows(res: LocalResults) -> list[dict[str, Any]]:
    plan = res.plan
    rows = [
        {"group": w.group, "index": w.index, "token_offset": w.offset, "tokens": len(w.token_ids)}
        for w in plan.windows
    ]
    if plan.prefix:
        rows.append(
            {
                "group": PREFIX_GROUP,
                "index": 0,
                "token_offset": plan.prefix_offset,
                "tokens": len(plan.prefix) + len(plan.suffix),
                "prefix_tokens": len(plan.prefix),
            }
        )
    return rows


def perplexity_section(
    cfg: ValidateConfig,
    res: LocalResults,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> dict[str, Any]:
    group = cfg.sizes.ppl_group
    keys = [w.key for w in res.plan.windows if w.group == group]
    if not keys:
        return not_run(f"the {group!r} window group has no windows in this run")
    target_lp = {label: s.target_lp for label, s in res.scores.items()}
    per_backend = perplexity_results(
        target_lp, keys, cfg.reference, cfg.confidence, cfg.seed, floors.of
    )
    windows = [w for w in res.plan.windows if w.group == group]
    results = {
        "backends": per_backend,
        "group": group,
        "window_tokens": len(windows[0].token_ids),
        "token_offsets": [w.offset for w in windows],
    }
    method = "exp(-mean log p) over the windows' next tokens; delta CI: paired block bootstrap"
    verdict = verdicts.perplexity_verdict(per_backend, cfg.thresholds, profiles, floors)
    return _section(verdict, results, method)


def mmlu_section(
    cfg: ValidateConfig,
    res: LocalResults,
    profiles: dict[str, ProfileChoice],
    floors: Floors = NO_FLOORS,
) -> dict[str, Any]:
    qs = res.plan.questions
    per_backend = mmlu.mmlu_results(res.mmlu, qs, cfg.reference, cfg.confidence, floors.of)
    results = {
        "backends": per_backend,
        "questions": len(qs),
        "subjects": len({q.subject for q in qs}),
        "per_subject": cfg.sizes.mmlu_per_subject,
    }
    method = (
        "zero-shot prompt; choice = argmax logprob of ' A'..' D'; Wilson 95% CIs; "
        "McNemar's exact test on the questions only one side answered correctly"
    )
    verdict = verdicts.mmlu_verdict(per_backend, cfg.thresholds, profiles, floors)
    return _section(verdict, results, method)


def throughput_section(cfg: ValidateConfig, res: LocalResults) -> dict[str, Any]:
    summary = {
        label: {key: summarize(runs) for key, runs in per_case.items()}
        for label, per_case in res.throughput.items()
    }
    ups = throughput.speedups(summary, cfg.reference)
    results = {
        "backends": summary,
        "speedup_vs_reference": ups,
        "machine_load": res.machine_load,
    }
    method = (
        "greedy, EOS ignored, prefix cache off; backends alternated over rounds on fresh "
        "engines; median [min, max] over rounds; 1-minute load average sampled after each case"
    )
    return _section(verdicts.throughput_verdict(ups, cfg.thresholds), results, method)


def memory_section(cfg: ValidateConfig, res: LocalResults) -> dict[str, Any]:
    verdict = verdicts.memory_verdict(res.memory, cfg.reference, cfg.thresholds)
    method = "tensor bytes of weights and KV pool; peak: sampled process RSS (CPU) or "
    method += "torch.cuda.max_memory_allocated (CUDA) during each backend's phase"
    return _section(verdict, {"backends": res.memory}, method)


def determinism_section(cfg: ValidateConfig, res: LocalResults) -> dict[str, Any]:
    verdict = verdicts.determinism_verdict(res.determinism, cfg.thresholds)
    summary = {label: determinism.all_identical(r) for label, r in res.determinism.items()}
    results = {"backends": res.determinism, "all_identical": summary}
    method = "temperature 0, EOS ignored; prefix cache emptied before every cold run"
    return _section(verdict, results, method)


def logprobs_section(cfg: ValidateConfig, res: LocalResults) -> dict[str, Any]:
    results = {"backends": res.logprobs, "top_n": 5, "api": "offline (logprobs, prompt_logprobs)"}
    method = (
        "shape, order, range and teacher-forced equality of every returned position: prompt "
        "positions within consistency_tol, decoded ones within logprob_delta (16-bit profile, "
        "fp32 model), cross_path_tol_16bit_model (16-bit profile, bf16/fp16 model: its decode "
        "and prefill GEMMs round differently) or cross_path_tol_8bit (8-bit profile)"
    )
    return _section(verdicts.logprobs_verdict(res.logprobs), results, method)


def local_sections(
    cfg: ValidateConfig, res: LocalResults, profiles: dict[str, ProfileChoice]
) -> tuple[dict[str, Any], PlotData]:
    """Every section of the report, in REPORT_SECTIONS order, and the plots' data; the
    verdicts judge each backend label by its profile, against its dtype floor where it has
    one (floors.py)."""
    plots = PlotData()
    backends = {label: choice.backend for label, choice in profiles.items()}
    floors = find_floors(res.dtypes, backends, cfg.reference)
    build = {
        "logprobs": lambda: logprobs_section(cfg, res),
        "agreement": lambda: agreement_section(cfg, res, plots, profiles, floors),
        "perplexity": lambda: perplexity_section(cfg, res, profiles, floors),
        "mmlu": lambda: mmlu_section(cfg, res, profiles, floors),
        "throughput": lambda: throughput_section(cfg, res),
        "memory": lambda: memory_section(cfg, res),
        "determinism": lambda: determinism_section(cfg, res),
    }
    sections = {}
    for name, make in build.items():
        ran = cfg.runs(name) and (name != "mmlu" or res.plan.questions)
        sections[name] = make() if ran else not_run("not selected (--sections)")
    return sections, plots
