"""Was the machine busy while throughput was timed? Load average against the core count.

Timings taken while other processes compete for the cores are not the backend's speed. The
1-minute load average, sampled after every timed case, counts runnable threads. This run
keeps about one per core busy plus brief extra ones (tokenizer, kernel compilation): alone on
an idle 2-core machine it peaked at 2.1 (README's first command in CI, 2026-12-03). So the
machine counts as busy only from one whole extra runnable thread on top of the cores
(`BUSY_MARGIN`): then something besides this run wanted the CPU, and the report warns next to
its figures.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

BUSY_MARGIN = 1.0


@dataclass
class LoadSampler:
    """1-minute load averages sampled during a timed phase (none where the OS has none)."""

    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        if hasattr(os, "getloadavg"):
            self.samples.append(os.getloadavg()[0])

    @property
    def busy(self) -> bool:
        return bool(self.samples) and max(self.samples) >= self.cores + BUSY_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "cores": self.cores,
            "max_load_1min": max(self.samples) if self.samples else None,
            "samples": len(self.samples),
            "busy": self.busy,
        }

    def warn_if_busy(self) -> None:
        if self.busy:
            logger.warning(busy_warning(self.to_dict()))


def busy_warning(load: dict[str, Any]) -> str:
    """The report's and the log's words for a busy machine."""
    return (
        f"the machine was busy while throughput was timed: 1-minute load average up to "
        f"{load['max_load_1min']:.1f} on {load['cores']} cores; other work competed for the "
        "CPU, so these timings understate every backend's speed and their ratios are noisy"
    )
