"""report.json and report.md: every number measured in the run, a verdict per section."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sageserve.validate.markdown import render

_REPO = Path(__file__).resolve().parents[2]


def machine() -> dict[str, Any]:
    """Where the run happened: CPU, threads, GPU if any, software versions."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def git_state() -> dict[str, Any] | None:
    """The commit measured and whether sageserve/ had uncommitted changes (None: no git)."""

    def git(*argv: str) -> str:
        cmd = ["git", "-C", str(_REPO), *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "sageserve")),
        }
    except (OSError, subprocess.CalledProcessError):
        return None


def envelope(
    mode: str,
    settings: dict[str, Any],
    sections: dict[str, Any],
    git: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report: metadata, settings, sections, and whether every verdict passed.

    git: `git_state()` taken when the run started, i.e. of the code that was loaded (files
    edited while a long run goes on do not change what it measured).
    """
    return {
        "tool": "sageserve validate",
        "mode": mode,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["sageserve", *sys.argv[1:]]),
        "machine": machine(),
        "git": git,
        "settings": settings,
        "sections": sections,
        "passed": all(s["verdict"]["status"] != "fail" for s in sections.values()),
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """NaN and infinities become None (strict JSON has no such values)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write(report: dict[str, Any], out: Path) -> None:
    """report.json and report.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(report), indent=2, default=_json_default, allow_nan=False)
    (out / "report.json").write_text(text + "\n")
    (out / "report.md").write_text(render(report))
