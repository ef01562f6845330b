"""Host time per call of something that launches GPU work, shared by the launch probes.

Launches are asynchronous, so the host's time per call is what the clock sees while calls
go back to back. Every SYNC_EVERY calls the GPU is synchronized outside the clock, so that
a full launch queue never blocks the host and the figure stays host time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Calls between GPU syncs (untimed): fewer than fill the launch queue.
SYNC_EVERY = 20


def host_seconds_per_call(call: Callable[[], object], repeats: int,
                          device: torch.device) -> float:  # fmt: skip
    """Seconds of host time per call of `call`, over `repeats` calls (CUDA: the syncs every
    SYNC_EVERY calls untimed; CPU: plain wall time)."""
    total = 0.0
    for done in range(0, repeats, SYNC_EVERY):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(min(SYNC_EVERY, repeats - done)):
            call()
        total += time.perf_counter() - start
    return total / repeats
