"""The garbage collector in the server's processes (`server/gc_heap.py`): each collection
timed and reported, the startup heap frozen once the engine is ready (or not, when asked),
the pauses in /metrics and in `bench serving`'s summary."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sageserve.bench import server_steps
from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.info import EngineStats
from sageserve.engine.sampling_params import SamplingParams
from sageserve.launch_server import build_parser
from sageserve.server.args import server_args_from_args
from sageserve.server.engine_core import EngineCore, Report, Stop
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.engine_process import EngineProcess
from sageserve.server.gc_heap import GcPauses, freeze_startup_heap
from sageserve.server.metrics import ServerMetrics


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Each test starts and ends with nothing frozen: a frozen object is never collected."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_every_collection_is_timed_in_order_until_uninstalled() -> None:
    pauses = GcPauses().install()
    try:
        pauses.drain()  # whatever the test's own start-up collected
        gc.collect(0)
        gc.collect(2)
        gc.collect(1)
        drained = pauses.drain()
    finally:
        pauses.uninstall()
    assert [generation for generation, _ in drained] == [0, 2, 1]
    assert all(0 < seconds < 10 for _, seconds in drained)
    assert pauses.drain() == []
    gc.collect(0)
    assert pauses.drain() == []  # uninstalled
    pauses.uninstall()  # twice is harmless


def test_freezing_leaves_the_startup_heap_out_of_collections(unfrozen: None) -> None:
    frozen = freeze_startup_heap("test")
    assert frozen == gc.get_freeze_count() > 1000  # pytest's and torch's objects at least
    pauses = GcPauses().install()
    try:
        gc.collect(2)
        ((_, frozen_pause),) = pauses.drain()
        gc.unfreeze()
        gc.collect(2)
        ((_, full_pause),) = pauses.drain()
    finally:
        pauses.uninstall()
    # Walking only what came after the freeze takes a fraction of walking everything.
    assert frozen_pause < full_pause


class _StubEngine:
    """The little of an Engine that EngineCore uses: `steps` steps of work, each collecting
    generation 1 once (as the engine's allocations would)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.warmed_up = False

    def warm_up(self) -> None:
        self.warmed_up = True

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(num_unfinished=0)

    def has_unfinished_requests(self) -> bool:
        return self.steps > 0

    def step(self) -> list:
        self.steps -= 1
        gc.collect(1)
        return []

    @property
    def last_step(self) -> None:
        return None

    def request_ids(self) -> list[str]:
        return []


def _run_core(freeze_heap: bool, gc_pauses: GcPauses | None) -> tuple[list[Report], int]:
    """Serve three steps then a Stop; the reports and the freeze count seen at ready."""
    reports: list[Report] = []
    frozen_at_ready: list[int] = []

    def send(report: Report) -> None:
        if report.ready:
            frozen_at_ready.append(gc.get_freeze_count())
        reports.append(report)

    inbox = [[], [], [], [Stop()]]
    core = EngineCore(_StubEngine(3), None, send, freeze_heap, gc_pauses)  # type: ignore[arg-type]
    core.serve(lambda block: inbox.pop(0))
    return reports, frozen_at_ready[0]


def test_the_engine_loop_freezes_its_heap_before_it_says_ready(unfrozen: None) -> None:
    reports, frozen = _run_core(freeze_heap=True, gc_pauses=None)
    assert reports[0].ready and frozen > 1000
    gc.unfreeze()
    pauses = GcPauses().install()
    try:
        reports, _ = _run_core(freeze_heap=True, gc_pauses=pauses)
    finally:
        pauses.uninstall()
    # The freeze's own full collection is the start-up's: it comes with the ready report.
    assert 2 in [generation for generation, _ in reports[0].gc_pauses]
    gc.unfreeze()
    reports, frozen = _run_core(freeze_heap=False, gc_pauses=None)
    assert reports[0].ready and frozen == 0
    assert all(report.gc_pauses == [] for report in reports)  # no recorder: none reported


def test_the_engine_loop_reports_its_collections_with_each_iteration(unfrozen: None) -> None:
    pauses = GcPauses().install()
    try:
        reports, _ = _run_core(freeze_heap=False, gc_pauses=pauses)
    finally:
        pauses.uninstall()
    ready, *stepping = reports  # the ready report, then one per iteration
    assert len(stepping) == 3
    for report in stepping:
        assert [generation for generation, _ in report.gc_pauses].count(1) >= 1
    assert ready.ready


def test_collections_reach_metrics_and_the_bench_summary() -> None:
    info = SimpleNamespace(page_size=16)
    stats = EngineStats(0, 0, 0, 0, 64, 64, 0, 0)
    metrics = ServerMetrics(info, lambda: stats)  # type: ignore[arg-type]
    metrics.observe_gc("engine", [(0, 0.0002)] * 5)
    before = server_steps.parse(metrics.render().decode())
    metrics.observe_gc("engine", [(0, 0.0003)] * 4 + [(2, 0.03)])
    metrics.observe_gc("server", [(1, 0.002)])
    after = server_steps.parse(metrics.render().decode())
    assert before is not None and after is not None
    summary = server_steps.gc_summary(before, after)
    assert set(summary) == {"engine gen 0", "engine gen 2", "server gen 1"}
    assert summary["engine gen 0"]["collections"] == 4
    assert summary["engine gen 0"]["total_s"] == pytest.approx(0.0012)
    assert summary["engine gen 2"] == pytest.approx(
        {"collections": 1, "total_s": 0.03, "mean_s": 0.03, "max_at_most_s": 0.05}
    )
    line = server_steps.format_gc(summary)
    assert "engine gen 2 1 x 30.00 ms (total 30.0, max <= 50)" in line
    assert server_steps.step_summary(before, after) == {}  # no steps: gc samples kept apart
    assert server_steps.format_gc({}) == "server gc pauses: none"
    assert server_steps.format_gc(None) == "server gc pauses: not reported by the server"


@pytest.mark.parametrize("freeze", [True, False])
def test_the_engine_process_freezes_its_heap_unless_told_not_to(
    smollm2_gguf: Path, capfd: pytest.CaptureFixture[str], freeze: bool
) -> None:
    config = EngineConfig(
        model_path=str(smollm2_gguf),
        dtype="float32",
        device="cpu",
        context_length=256,
        cache=CacheConfig(max_total_tokens=1024),
    )
    loop = EngineLoop(EngineProcess(config, log_level="info", freeze_heap=freeze))

    async def serve_one() -> None:
        loop.start()
        try:
            assert await loop.wait_ready()
            stream = await loop.submit(["Hi"], [SamplingParams(max_new_tokens=3)])
            assert (await stream.finals())[0].num_completion_tokens == 3
        finally:
            loop.stop()

    asyncio.run(serve_one())
    logged = capfd.readouterr().err  # the child's log goes to the inherited stderr
    assert ("engine: startup heap frozen" in logged) == freeze
    assert "engine loop started" in logged


def test_the_flag_turns_the_freezing_off() -> None:
    parser = build_parser()
    assert server_args_from_args(parser.parse_args([])).freeze_gc
    assert not server_args_from_args(parser.parse_args(["--disable-gc-freeze"])).freeze_gc


def test_a_scrape_counts_the_servers_own_collections_so_far() -> None:
    """An idle server gets no engine reports: its freeze's full collection must still be
    counted by the first scrape after it, not by a benchmark's window later on."""
    stats = EngineStats(0, 0, 0, 0, 64, 64, 0, 0)
    pauses = GcPauses().install()
    gc.disable()  # only the collection below: none may start while rendering
    try:
        metrics = ServerMetrics(SimpleNamespace(page_size=16), lambda: stats, pauses)  # type: ignore[arg-type]
        pauses.drain()
        gc.collect(2)
        first = server_steps.parse(metrics.render().decode())
        second = server_steps.parse(metrics.render().decode())
    finally:
        gc.enable()
        pauses.uninstall()
    assert first is not None and second is not None
    assert first[("sageserve_gc_pause_seconds_count", "server gen 2", None)] == 1
    assert server_steps.gc_summary(first, second) == {}  # nothing new between the scrapes
