"""The engine's side of the server: commands in, one report per iteration out.

`EngineCore` owns the Engine and is the only code that touches it. It runs wherever its host
puts it (a thread of the server's process, or a process of its own: engine_thread.py,
engine_process.py) and speaks only in picklable messages, so both hosts run the same loop::

    inbox: Add / Abort / FlushCache / Stop        outbox: Report (one per iteration)
      Add        -> engine.add_request              settled: (ticket, error or None)
      Abort      -> engine.abort                    outputs: RequestOutputs of aborts + the step
      FlushCache -> engine.flush_prefix_cache       failed:  ids of a step that raised
      (work)     -> engine.step()                   step, stats, gc_pauses

Failures stay with the request that caused them: a bad request is refused at admission
(its ticket settles with the error), an internal fault while admitting it fails it alone, a
failing step fails the requests in flight and the loop goes on. Anything else escapes
`serve` and is the host's to report as the engine's death.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sageserve.engine.info import EngineStats
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.step_timing import StepTiming
from sageserve.server.errors import InvalidRequestError, QueueFullError, RequestFailedError
from sageserve.server.gc_heap import GcPauses, freeze_startup_heap

if TYPE_CHECKING:
    # Only the engine's host needs the engine's code: the server's process of an
    # EngineProcess imports this module without it while the child loads.
    from sageserve.engine.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class Add:
    """Admit these requests atomically: all, or none (the ticket settles with the error)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    request_ids: list[str]
    ticket: int


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class FlushCache:
    ticket: int


@dataclass
class Stop:
    """Abort every request and leave the loop."""


Command = Add | Abort | FlushCache | Stop


@dataclass
class Report:
    """What one iteration of the engine's loop did, for the server's event loop.

    Applied in this order: settled tickets, outputs (aborts' then the step's), failed ids.
    """

    stats: EngineStats | None = None  # at the iteration's end
    ready: bool = False  # the first report: the warm-up is done, the engine serves
    settled: list[tuple[int, Exception | None]] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    step: StepTiming | None = None
    gc_pauses: list[tuple[int, float]] = field(default_factory=list)  # (generation, seconds)


class EngineCore:
    """Runs an Engine's loop: apply the commands waiting, step while there is work.

    freeze_heap: after the warm-up, freeze the process's heap out of garbage collection
    (gc_heap.py; the host decides: a frozen object is never collected). gc_pauses: the
    process's collections, reported with each iteration (a host in a process of its own; on
    a thread the server's process reports its own).
    """

    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int | None,
        send: Callable[[Report], None],
        freeze_heap: bool = False,
        gc_pauses: GcPauses | None = None,
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._send = send
        self._freeze_heap = freeze_heap
        self._gc_pauses = gc_pauses

    def serve(self, receive: Callable[[bool], list[Command]]) -> None:
        """Warm up, then loop until a Stop command; `receive(block)` drains the inbox
        (waiting for one command first when `block`)."""
        self.engine.warm_up()
        if self._freeze_heap:
            freeze_startup_heap("engine")
        self._send(self._finished(Report(ready=True)))  # with the start-up's collections
        logger.info("engine loop started")
        while True:
            report = Report()
            for command in receive(not self.engine.has_unfinished_requests()):
                if isinstance(command, Stop):
                    self._abort_all()
                    logger.info("engine loop stopped")
                    return
                self._apply(command, report)
            if self.engine.has_unfinished_requests():
                self._step(report)
            self._send(self._finished(report))

    def _finished(self, report: Report) -> Report:
        """The report with the engine's stats and the collections since the last one."""
        report.stats = self.engine.stats()
        if self._gc_pauses is not None:
            report.gc_pauses = self._gc_pauses.drain()
        return report

    def _apply(self, command: Add | Abort | FlushCache, report: Report) -> None:
        if isinstance(command, FlushCache):
            report.settled.append((command.ticket, self._flush_cache()))
        elif isinstance(command, Abort):
            aborted = [self.engine.abort(rid) for rid in command.request_ids]
            report.outputs.extend(out for out in aborted if out is not None)
        else:
            report.settled.append((command.ticket, self._admit(command)))

    def _admit(self, command: Add) -> Exception | None:
        try:
            self._add(command)
        except (InvalidRequestError, QueueFullError) as err:
            return err
        except Exception:
            logger.exception("admitting request(s) %s failed", ", ".join(command.request_ids))
            for rid in command.request_ids:
                self.engine.abort(rid)
            return RequestFailedError(
                f"internal error while admitting request {command.request_ids[0]}"
            )
        return None

    def _add(self, command: Add) -> None:
        self._check_queue(len(command.prompts))
        added: list[str] = []
        try:
            for prompt, params, rid in zip(
                command.prompts, command.params, command.request_ids, strict=True
            ):
                added.append(self.engine.add_request(prompt, params, rid))
        except ValueError as err:
            for rid in added:
                self.engine.abort(rid)
            raise InvalidRequestError(str(err)) from err

    def _check_queue(self, size: int) -> None:
        limit = self.max_queued_requests
        if limit is None:
            return
        running = self.engine.info.max_running_requests
        if self.engine.stats().num_unfinished + size > running + limit:
            raise QueueFullError(
                f"too many requests in flight (at most {running} running and {limit} "
                "queued); retry later"
            )

    def _flush_cache(self) -> InvalidRequestError | None:
        if self.engine.has_unfinished_requests():
            return InvalidRequestError(
                "requests are in flight; the prefix cache is flushed only when the server is idle"
            )
        self.engine.flush_prefix_cache()
        return None

    def _step(self, report: Report) -> None:
        try:
            report.outputs.extend(self.engine.step())
        except Exception:
            # NOTE: one failing step must not take the server down: log it with its
            # traceback, fail the requests it may have touched, and keep serving. Which
            # request broke a batched step is unknown, so all of them fail.
            ids = self.engine.request_ids()
            logger.exception("engine step failed; failing requests %s", ", ".join(ids))
            self._abort_all()
            report.failed = ids
            return
        report.step = self.engine.last_step

    def _abort_all(self) -> None:
        for rid in self.engine.request_ids():
            self.engine.abort(rid)
