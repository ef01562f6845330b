"""The engine's loop in a process of its own (what `launch_server` runs).

As SGLang's scheduler process and vLLM's EngineCore do: the engine and its Python run in a
spawned child with its own GIL, so the event loop's work for every streamed token (HTTP
framing, SSE text) no longer delays the engine's launches. Two one-way pipes join them::

    server process                                   engine process (spawned)
    EngineLoop ── Command ── writer thread ──pipe──> EngineCore.serve (receive)
    EngineLoop <── Report ── event loop reader <─pipe── Report, outputs as OutputDeltas

The child builds the Engine from the EngineConfig, answers `_Loaded` (info, tokenizer,
stats) or `_LoadFailed` (the ValueError a bad model or flag gives), warms up, freezes its
startup heap out of garbage collection (gc_heap.py) and serves, timing its collections. It
ignores SIGINT: a Ctrl-C reaches the whole process group, and the server's process decides
when the engine stops (after its graceful shutdown). It exits when told to stop, when its
pipe closes (the server's process has gone), or on a fault, which it reports (`_Died`) first.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sageserve.config import EngineConfig
from sageserve.engine.info import EngineInfo, EngineStats
from sageserve.engine.request import RequestOutput
from sageserve.server.engine_core import Command, EngineCore, Report
from sageserve.server.gc_heap import GcPauses
from sageserve.server.output_wire import OutputDecoder, OutputDelta, OutputEncoder

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Loaded:
    info: EngineInfo
    tokenizer: Any
    warms_up: bool
    stats: EngineStats


@dataclass
class _LoadFailed:
    message: str


@dataclass
class _Died:
    reason: str


class EngineProcess:
    """Hosts an EngineCore in a spawned process. The constructor spawns it and returns; the
    first use of what the child loads (`info`, `tokenizer`, ...) waits for it
    (`wait_loaded`)."""

    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        log_level: str = "info",
        freeze_heap: bool = True,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        child_commands, self._commands = context.Pipe(duplex=False)
        self._reports, child_reports = context.Pipe(duplex=False)
        child_ends = (child_commands, child_reports)
        self._process = context.Process(
            target=run_engine_process,
            args=(config, max_queued_requests, log_level, freeze_heap, *child_ends),
            name="sageserve-engine",
            daemon=True,
        )
        self._process.start()
        # Only the child holds these ends now: when it exits, our reads see EOF.
        child_commands.close()
        child_reports.close()
        self._loaded: _Loaded | None = None
        self._decoder = OutputDecoder()
        self._outbox: queue.Queue[Command | None] = queue.Queue()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # What the child answers once it has loaded (the first use waits for it, so the caller
    # can do its own start-up meanwhile).

    @property
    def info(self) -> EngineInfo:
        return self.wait_loaded().info

    @property
    def tokenizer(self) -> Any:
        return self.wait_loaded().tokenizer

    @property
    def warms_up(self) -> bool:
        return self.wait_loaded().warms_up

    @property
    def initial_stats(self) -> EngineStats:
        return self.wait_loaded().stats

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def wait_loaded(self) -> _Loaded:
        """Block until the child has loaded the model.

        Raises ValueError (the child's message) for a model or flag the engine refuses, and
        RuntimeError when the child exits while loading.
        """
        if self._loaded is not None:
            return self._loaded
        try:
            message = self._reports.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(
                f"the engine process exited while loading (exit code {self._process.exitcode}); "
                "its log above says why"
            ) from None
        if isinstance(message, _LoadFailed):
            self._process.join(timeout=10)
            raise ValueError(message.message)
        assert isinstance(message, _Loaded), message
        self._loaded = message
        return message

    def start(self, deliver: Callable[[Report], None], on_exit: Callable[[str], None]) -> None:
        """Deliver reports from the running event loop; `on_exit(reason)` if the child dies."""
        self._deliver, self._on_exit = deliver, on_exit
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._reports.fileno(), self._read_reports)
        writer = threading.Thread(target=self._write_commands, name="sageserve-pipe", daemon=True)
        writer.start()

    def send(self, command: Command) -> None:
        """Queue a command for the child (any thread; never blocks: a thread writes it, since
        a long prompt may exceed the pipe's buffer while the child is busy stepping)."""
        self._outbox.put(command)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the child to exit (after a Stop); terminate it past the timeout, or at
        once if it was never started (nothing would write it the Stop)."""
        self._stopping = True
        self._process.join(timeout if self._loop is not None else 0)
        if self._process.is_alive():
            if self._loop is not None:
                logger.error("the engine process did not stop in %.0f s: terminating", timeout)
            self._process.terminate()
            self._process.join(5)
        self._outbox.put(None)
        self._close_reader()

    def decode(self, outputs: list[OutputDelta]) -> list[RequestOutput]:
        """The reports' outputs as RequestOutputs (on the event loop, where they are used)."""
        return self._decoder.decode(outputs)

    def forget(self, request_ids: list[str]) -> None:
        self._decoder.forget(request_ids)

    def _read_reports(self) -> None:
        """Deliver every report waiting (on the event loop, where they are applied)."""
        while True:
            try:
                if self._reports.closed or not self._reports.poll(0):
                    return  # closed: a delivered report stopped the server
                message = self._reports.recv()
            except (EOFError, OSError):
                self._process.join(timeout=5)
                self._exited(f"the engine process exited (exit code {self._process.exitcode})")
                return
            if isinstance(message, _Died):
                self._exited(message.reason)
                return
            self._deliver(message)

    def _exited(self, reason: str) -> None:
        self._close_reader()
        if not self._stopping:
            self._on_exit(reason)

    def _close_reader(self) -> None:
        if self._loop is not None and not self._reports.closed:
            with suppress(ValueError, RuntimeError):
                self._loop.remove_reader(self._reports.fileno())
            self._reports.close()

    def _write_commands(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._commands.send(command)
            except OSError:
                return  # the child has gone; the reader reports it


def run_engine_process(
    config: EngineConfig,
    max_queued_requests: int | None,
    log_level: str,
    freeze_heap: bool,
    commands: Connection,
    reports: Connection,
) -> None:
    """The child's main: load, report, serve until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    # Here, not at the top: the server spawns this process before importing the engine.
    from sageserve.engine.engine import Engine

    try:
        engine = Engine(config, warm_up_now=False)  # the loop warms it up, then reports ready
    except ValueError as err:
        reports.send(_LoadFailed(str(err)))
        return
    reports.send(_Loaded(engine.info, engine.tokenizer, engine.warms_up, engine.stats()))
    encoder = OutputEncoder()

    def send(report: Report) -> None:
        report.outputs = encoder.encode(report.outputs)  # type: ignore[assignment]
        encoder.forget(report.failed)
        reports.send(report)

    try:
        core = EngineCore(engine, max_queued_requests, send, freeze_heap, GcPauses().install())
        core.serve(_receiver(commands))
    except (EOFError, BrokenPipeError):
        logger.info("the server's process has gone: the engine process exits")
    except BaseException as err:
        logger.critical("the engine loop stopped", exc_info=True)
        with suppress(OSError):
            reports.send(_Died(f"{type(err).__name__}: {err}"))
        raise SystemExit(1) from err


def _receiver(commands: Connection) -> Callable[[bool], list[Command]]:
    def receive(block: bool) -> list[Command]:
        if block:
            commands.poll(None)
        received = []
        while commands.poll(0):
            received.append(commands.recv())
        return received

    return receive
