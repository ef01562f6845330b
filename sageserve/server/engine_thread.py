"""The engine's loop on a thread of the server's process (tests, and in-process servers).

The thread shares the process's GIL with the event loop: every streamed token's Python on
the event loop delays the engine's next launch. The server proper runs the engine in a
process of its own (engine_process.py); this host keeps the Engine object within reach,
which tests use to inject faults.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from sageserve.engine.engine import Engine
from sageserve.engine.request import RequestOutput
from sageserve.server.engine_core import Command, EngineCore, Report

logger = logging.getLogger(__name__)


class EngineThread:
    """Hosts an EngineCore on a daemon thread; commands through a queue.Queue.

    freeze_heap: freeze the process's heap after the warm-up (gc_heap.py). Off by default:
    a frozen object is never collected, which a process making many engines (a test
    session) must not do.
    """

    def __init__(
        self, engine: Engine, max_queued_requests: int | None = None, freeze_heap: bool = False
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.freeze_heap = freeze_heap
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.warms_up = engine.warms_up
        self.initial_stats = engine.stats()
        self._commands: queue.Queue[Command] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, deliver: Callable[[Report], None], on_exit: Callable[[str], None]) -> None:
        """Run the loop; `deliver(report)` and `on_exit(reason)` are called on its thread."""
        core = EngineCore(self.engine, self.max_queued_requests, deliver, self.freeze_heap)

        def run() -> None:
            try:
                core.serve(self._receive)
            except BaseException as err:
                logger.critical("the engine thread stopped", exc_info=True)
                on_exit(f"{type(err).__name__}: {err}")

        self._thread = threading.Thread(target=run, name="sageserve-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        """Queue a command for the loop (any thread; never blocks)."""
        self._commands.put(command)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def decode(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Reports' outputs are the engine's own objects here."""
        return outputs

    def forget(self, request_ids: list[str]) -> None:
        """Nothing is held per request on this side."""

    def _receive(self, block: bool) -> list[Command]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands
