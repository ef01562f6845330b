"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own.

Every RequestOutput the engine hands out is reported (`observe`, on the event loop as each
engine report arrives), so the counters and latency histograms see each request exactly once
at its end and each token as it comes. The
gauges are read at scrape time from the latest `EngineStats` snapshot::

    engine report (event loop)             scrape (event loop)
    step() / abort() -> observe(outputs)   render() -> counters, histograms
    step()           -> observe_step()                  gauges <- stats() snapshot
    step() raised    -> observe_failed()
    gc pauses        -> observe_gc()        (the engine's with its reports; render() counts
                                             the server's own)

Time to first token and end-to-end latency come from the engine's own timestamps
(`RequestOutput.metrics`); inter-token latency is the time between two outputs of a request
that carry new tokens, split evenly over the tokens the later one adds. Each step call's wall
time and the part of it spent waiting for the device (`StepTiming`), by the kind of step it
launched, tell a long inter-token gap made by the device from one made by the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from sageserve.engine.info import EngineInfo, EngineStats
    from sageserve.engine.request import RequestOutput
    from sageserve.engine.step_timing import StepTiming
    from sageserve.server.gc_heap import GcPauses

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

PREFIX = "sageserve"
# Seconds; wide enough for a CPU at the low end and a GPU at the high end.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
# Fine from 5 to 40 ms, where a GPU's decode steps and the mixed steps that stall them fall
# (issue 16's 32-client ITL p99 / p50).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03,
               0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # fmt: skip
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, *ITL_BUCKETS[3:])
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
# finish_reason label of requests lost to a failed engine step (they have no final output).
FAILED_REASON = "error"


class ServerMetrics:
    """Counters, histograms and gauges of one server, in their own CollectorRegistry.

    `observe` and `observe_failed` must be called from one thread (the event loop): they
    keep per-request progress. `render` may be called from any thread.
    """

    def __init__(
        self,
        info: EngineInfo,
        stats: Callable[[], EngineStats],
        own_gc: GcPauses | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._info = info
        self._stats = stats
        self._own_gc = own_gc  # this process's collections, counted at each scrape
        # request id -> (output tokens seen, monotonic time the last of them was seen)
        self._progress: dict[str, tuple[int, float]] = {}
        self._init_counters()
        self._init_histograms()
        self._init_step_histograms()
        self._init_gc_histogram()
        self._init_gauges()

    def _init_counters(self) -> None:
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests finished, by finish reason (stop, length, abort, error)",
            ["finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of the requests seen", registry=self.registry
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated", registry=self.registry
        )

    def _init_histograms(self) -> None:
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Seconds between two consecutive generated tokens of a request",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

    def _init_step_histograms(self) -> None:
        self.step_duration = self._step_histogram(
            "step_duration_seconds", "Wall seconds of one engine step call"
        )
        self.step_device_wait = self._step_histogram(
            "step_device_wait_seconds", "Seconds one engine step call waited for the device"
        )

    def _step_histogram(self, name: str, doc: str) -> Histogram:
        kind = "kind (decode, mixed, prefill, none: what the step launched)"
        return Histogram(f"{PREFIX}_{name}", f"{doc}, by {kind}", ["kind"],
                         buckets=STEP_BUCKETS, registry=self.registry)  # fmt: skip

    def _init_gc_histogram(self) -> None:
        self.gc_pause = Histogram(
            f"{PREFIX}_gc_pause_seconds",
            "Seconds a Python garbage collection stopped a process, by process (engine; "
            "server, which with the engine on its thread is the whole server) and generation",
            ["process", "generation"],
            buckets=GC_BUCKETS,
            registry=self.registry,
        )

    def _init_gauges(self) -> None:
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "num_requests_running": ("Requests running in the engine", self._running),
            "num_requests_waiting": ("Requests queued for a running slot", self._waiting),
            "kv_cache_used_pages": ("KV pages held by requests", self._used_pages),
            "kv_cache_usable_pages": ("KV pages the pool can hand out", self._usable_pages),
            "kv_cache_usage_ratio": ("Used / usable KV pages (0 to 1)", self._usage_ratio),
            "kv_cache_used_tokens": ("Token slots of the used KV pages", self._used_tokens),
            "kv_cache_capacity_tokens": ("Token slots of the usable KV pages", self._capacity),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"{PREFIX}_{name}", doc, registry=self.registry).set_function(read)

    # ------------------------------------------------------------- engine reports

    def observe(self, outputs: Iterable[RequestOutput]) -> None:
        """Count the progress of each output (once per step / abort, in order)."""
        now = time.monotonic()
        for out in outputs:
            self._observe_tokens(out, now)
            if out.finished:
                self._observe_finished(out)

    def observe_step(self, timing: StepTiming) -> None:
        """Count one engine step call's wall time and device wait, by its kind (engine
        thread)."""
        self.step_duration.labels(kind=timing.kind).observe(timing.wall_s)
        self.step_device_wait.labels(kind=timing.kind).observe(timing.device_wait_s)

    def observe_gc(self, process: str, pauses: Iterable[tuple[int, float]]) -> None:
        """Count garbage collections of `process`: (generation, seconds) each."""
        for generation, seconds in pauses:
            self.gc_pause.labels(process=process, generation=str(generation)).observe(seconds)

    def observe_failed(self, request_ids: Iterable[str]) -> None:
        """Count requests aborted by a failed engine step (they have no final output)."""
        for rid in request_ids:
            self._progress.pop(rid, None)
            self.requests.labels(finish_reason=FAILED_REASON).inc()

    def _observe_tokens(self, out: RequestOutput, now: float) -> None:
        seen = self._progress.get(out.request_id)
        if seen is None:
            self.prompt_tokens.inc(out.num_prompt_tokens)
            seen = (0, now)
        count, last = seen
        new = out.num_completion_tokens - count
        if new <= 0:
            self._progress[out.request_id] = seen
            return
        self.generation_tokens.inc(new)
        if count == 0:
            self._observe_first_token(out)
            last = out.metrics.first_token_time or now
            new -= 1  # the first token has no predecessor
        for _ in range(new):
            self.inter_token_latency.observe((now - last) / new)
        self._progress[out.request_id] = (out.num_completion_tokens, now)

    def _observe_first_token(self, out: RequestOutput) -> None:
        ttft = out.metrics.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.observe(ttft)

    def _observe_finished(self, out: RequestOutput) -> None:
        self._progress.pop(out.request_id, None)
        self.requests.labels(finish_reason=out.finish_reason or FAILED_REASON).inc()
        latency = out.metrics.latency
        if latency is not None:
            self.e2e_latency.observe(latency)

    # ---------------------------------------------------------------------- scrape

    def render(self) -> bytes:
        """The registry in Prometheus' text format (this process's collections up to now
        counted first: an idle server sends no engine reports to count them with)."""
        if self._own_gc is not None:
            self.observe_gc("server", self._own_gc.drain())
        return generate_latest(self.registry)

    def _running(self) -> float:
        return self._stats().num_running

    def _waiting(self) -> float:
        return self._stats().num_waiting

    def _used_pages(self) -> float:
        stats = self._stats()
        return stats.num_usable_pages - stats.num_free_pages

    def _usable_pages(self) -> float:
        return self._stats().num_usable_pages

    def _usage_ratio(self) -> float:
        stats = self._stats()
        if stats.num_usable_pages == 0:
            return 0.0
        return (stats.num_usable_pages - stats.num_free_pages) / stats.num_usable_pages

    def _used_tokens(self) -> float:
        return self._used_pages() * self._info.page_size

    def _capacity(self) -> float:
        return self._usable_pages() * self._info.page_size
