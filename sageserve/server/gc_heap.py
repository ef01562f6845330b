"""The garbage collector in the server's two processes: the startup heap frozen, pauses timed.

A full (generation 2) collection walks every tracked object of the process: after loading a
model, importing torch and Triton and capturing CUDA graphs that is ~10^6 objects, and the
walk stops the process for tens of milliseconds (a 2-core CPU took 120 ms for torch and
transformers' imports alone). The objects made at startup live as long as the process, so
each process collects the startup's garbage once and freezes the rest out of later
collections (`gc.freeze`, as vLLM's engine and API processes and SGLang's do), right before
it serves. `GcPauses` times every collection (`gc.callbacks`), so /metrics shows what the
collector still costs: `sageserve_gc_pause_seconds` by process and generation.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> int:
    """Collect the startup's garbage, then move every surviving object to the permanent
    generation. Returns how many objects are frozen (logged with `process`)."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "%s: startup heap frozen, %d objects left out of garbage collection (%.0f ms)",
        process,
        frozen,
        (time.perf_counter() - start) * 1e3,
    )
    return frozen


class GcPauses:
    """Times every garbage collection of this process while installed.

    The callback only appends to a list: it runs inside the collector, on whichever thread
    allocated, where taking a lock (a Prometheus metric's) could deadlock. The owner drains
    the list on its own thread (`drain`).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, float]] = []
        self._started: float | None = None

    def install(self) -> GcPauses:
        gc.callbacks.append(self._on_collect)
        return self

    def uninstall(self) -> None:
        if self._on_collect in gc.callbacks:
            gc.callbacks.remove(self._on_collect)

    def drain(self) -> list[tuple[int, float]]:
        """(generation, seconds) of each collection since the last drain, in order."""
        # A collection that ends while the lists are swapped appends to the list returned
        # or to the new one: none is lost.
        pauses, self._pending = self._pending, []
        return pauses

    def _on_collect(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._pending.append((info["generation"], time.perf_counter() - self._started))
            self._started = None
