"""Log lines per start-up phase (load, calibrate, allocate), with its time.

Start-up can take tens of seconds (an 8-bit backend calibrates; CUDA-graph capture logs
its own time); a line when a phase begins says what the process is doing, one when it ends
says how long it took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("sageserve.startup")


@contextmanager
def startup_phase(name: str, detail: str = "") -> Iterator[None]:
    """Log `name: detail ...` on entry and `name: done in X s` on a normal exit."""
    logger.info("%s: %s...", name, f"{detail} " if detail else "")
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", name, time.perf_counter() - start)
