"""Timing for `sageserve bench kernels`: CUDA events, warmup, round-robin samples, graphs.

Every figure is a median over `repeats` samples; a sample times `iters` back-to-back calls
between two CUDA events (on CPU: `time.perf_counter`) after a device synchronize, and
divides by the number of kernel calls it covered. Within a shape the variants are sampled
round-robin, so a clock or thermal drift hits all of them alike, in an order that changes
every round (`balanced_order`): at a fixed order one variant would always run right after
the same other one, and on a card near its power cap a sample that follows the most
power-hungry kernel (cuDNN's) may start at a lower clock.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median

import torch

# Calls per sample are capped: tiny CPU shapes would otherwise ask for thousands.
MAX_ITERS = 2000
# Bytes of the buffer `copy_bandwidth` copies, per device type.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


@dataclass
class Timed:
    """Something to time: `call` runs `per_call` kernel calls (a graph replays several)."""

    call: Callable[[], object]
    per_call: int = 1
    iters: int = 1  # calls of `call` per sample, set by `Timer.plan`
    samples_ms: list[float] = field(default_factory=list)  # ms per kernel call

    @property
    def median_ms(self) -> float:
        return median(self.samples_ms)


@dataclass(frozen=True)
class Timer:
    """Warmup, sample sizing and round-robin sampling on one device."""

    device: torch.device
    warmup: int
    repeats: int
    sample_ms: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, call: Callable[[], object], iters: int) -> float:
        """Milliseconds of `iters` back-to-back calls (GPU time between two events)."""
        self.sync()  # nothing queued before the start event
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(iters):
                call()
            return (time.perf_counter() - start) * 1e3
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        for _ in range(iters):
            call()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event)

    def plan(self, timed: Timed) -> None:
        """Warm up (at least one call), then size a sample to about sample_ms."""
        ms = min(self.elapsed_ms(timed.call, 1) for _ in range(max(self.warmup, 1)))
        timed.iters = max(1, min(MAX_ITERS, math.ceil(self.sample_ms / max(ms, 1e-3))))

    def round_robin(self, entries: dict[str, Timed]) -> dict[str, str]:
        """`repeats` samples of each entry, alternating entries within every round.

        Returns {key: error} for entries whose call raised (they are not sampled again;
        the caller reports them): one failing variant must not lose the others' figures.
        """
        errors: dict[str, str] = {}
        for round_index in range(self.repeats):
            for key in balanced_order(list(entries), round_index):
                timed = entries[key]
                if key in errors:
                    continue
                try:
                    ms = self.elapsed_ms(timed.call, timed.iters)
                except Exception as err:  # returned to the caller, which records it
                    errors[key] = f"{type(err).__name__}: {err}"[:2000]
                    continue
                timed.samples_ms.append(ms / (timed.iters * timed.per_call))
        return errors


def balanced_order(keys: list[str], round_index: int) -> list[str]:
    """keys in the order of row round_index of a Williams design: over a full cycle of rows
    (len(keys) rows when even, twice that when odd) each key is sampled equally often in
    every position and right after every other key equally often."""
    n = len(keys)
    if n < 2:
        return list(keys)
    # 0, 1, n-1, 2, n-2, ...: the first row; the others shift it.
    zigzag = [0] + [(i + 1) // 2 if i % 2 else n - i // 2 for i in range(1, n)]
    row = [keys[(first + round_index) % n] for first in zigzag]
    mirrored = n % 2 == 1 and (round_index // n) % 2 == 1
    return row[::-1] if mirrored else row


def capture_graph(calls: list[Callable[[], object]], device: torch.device) -> torch.cuda.CUDAGraph:
    """A CUDA graph of the calls in order (each already run once, so compiled).

    Warmed up on a side stream first, as torch requires before a capture.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def eager_and_graph(
    name: str, calls: list[Callable[[], object]], timer: Timer, graph: bool
) -> tuple[dict[str, Timed], str | None]:
    """`name`:eager cycling `calls` (every one run once first: compiled and warm before any
    timing or capture) and, when `graph` and on CUDA, `name`:graph replaying as many calls.

    Returns (entries, graph capture error or None): a failed capture keeps the eager figure.
    """
    for call in calls:
        call()
    cycle = itertools.cycle(calls)
    eager = Timed(lambda: next(cycle)())
    timer.plan(eager)
    entries = {f"{name}:eager": eager}
    if not (timer.cuda and graph):
        return entries, None
    n = min(MAX_ITERS, eager.iters)
    try:
        replay = capture_graph([calls[i % len(calls)] for i in range(n)], timer.device)
    except Exception as err:  # reported in the row ("graph_error") and the exit code
        return entries, f"{type(err).__name__}: {err}"[:2000]
    entries[f"{name}:graph"] = Timed(replay.replay, per_call=n)
    timer.plan(entries[f"{name}:graph"])
    return entries, None


def copy_bandwidth(timer: Timer, num_bytes: int) -> dict[str, float]:
    """The device's copy bandwidth: a large device-to-device copy, bytes read + written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=timer.device).fill_(1)
    dst = torch.empty_like(src)
    timed = Timed(lambda: dst.copy_(src))
    timer.plan(timed)
    timer.round_robin({"copy": timed})
    ms = timed.median_ms
    return {
        "bytes_copied": num_bytes,
        "ms": ms,
        "gb_per_s": 2 * num_bytes / ms / 1e6,
        "samples_ms": timed.samples_ms,
        "method": "dst.copy_(src) of one uint8 buffer on the device; GB/s = (bytes read + "
        "bytes written) / time, 1 GB = 1e9 bytes",
    }
