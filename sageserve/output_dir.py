"""Where `sageserve validate` and `sageserve bench` write when no output path is given."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

# Untracked (.gitignore), one entry per run, so a user's run never overwrites the reports
# and results committed under reports/ and benchmarks/results/.
DEFAULT_OUT_ROOT = "sageserve-reports"


def default_out_dir(mode: str, now: datetime | None = None) -> Path:
    """sageserve-reports/<UTC date>-<time>-<mode> under the current directory."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%d-%H%M%S")
    return Path(DEFAULT_OUT_ROOT) / f"{stamp}-{mode}"
