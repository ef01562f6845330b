"""Section 6: memory -- weights, KV bytes per token, pool capacity, and the measured peak.

The first three are the engine's own account (`Engine.info.memory`); this module measures
the peak.

The peak is torch.cuda.max_memory_allocated on CUDA; on CPU it is the process's resident set
size, sampled every few milliseconds by a thread for the duration of one backend's phase
(`PeakMemory`), because the process-wide high-water mark would mix the backends.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_SAMPLE_S = 0.005


def rss_bytes() -> int:
    """The process's current resident set size (Linux /proc)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS missing from /proc/self/status")


class PeakMemory:
    """Context manager measuring the peak memory of a phase (see module docstring).

    After exit: `peak_bytes`, `start_bytes` and `kind` ("cuda_max_allocated" or "cpu_rss").
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss"
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            time.sleep(_SAMPLE_S)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes}
