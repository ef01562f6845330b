"""The engine behind an asyncio API for the HTTP server.

The engine runs on a host of its own (a process, engine_process.py, as served; or a thread,
engine_thread.py) and speaks only in messages (engine_core.py). The event loop hands it
commands; the host hands back one Report per engine iteration, applied on the event loop,
where outputs are routed to the streams waiting for them::

    event loop                              engine host
    submit() ── Add(ticket) ──────────────>  engine.add_request (ValueError -> that request's 400)
    ticket's future <── Report.settled ────
    OutputStream <── Report.outputs ───────  engine.step()        (one report per iteration)
    OutputStream.close() ── Abort ────────>  engine.abort         (frees the request's pages)

Requests submitted together (a batch, or OpenAI's `n`) share one OutputStream, so the HTTP
layer can stream them interleaved.

Text is tokenized (and chat templates applied) on a thread with its own tokenizer, so a
long prompt stalls neither the event loop nor the engine's steps.

Failures stay with the request that caused them (engine_core.py). Should the engine's host
itself stop, every waiting request gets 503 at once, later ones too, and `on_death` is
called so the server can exit.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import sys
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sageserve.engine.admission import encode_prompt
from sageserve.engine.engine import Engine
from sageserve.engine.info import EngineInfo, EngineStats
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.stop import StopChecker
from sageserve.engine.token_bytes import TokenBytes
from sageserve.server.engine_core import Abort, Add, Command, FlushCache, Report, Stop
from sageserve.server.engine_thread import EngineThread
from sageserve.server.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from sageserve.server.gc_heap import GcPauses
from sageserve.server.limits import RequestLimits
from sageserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
T = TypeVar("T")

# The server's GIL switch interval (Python's default: 5 ms). A thread that wakes (the engine
# thread, or the engine process's command writer) waits up to this long for the lock while
# the event loop runs Python. The 32-client figures in BENCHMARKS.md (issue 16, H100) were
# measured with 0.5 ms.
GIL_SWITCH_INTERVAL_S = 0.0005


class EngineHost(Protocol):
    """Where the engine's loop runs: EngineThread or EngineProcess."""

    info: EngineInfo
    tokenizer: Any
    warms_up: bool
    initial_stats: EngineStats
    max_queued_requests: int | None

    def start(self, deliver: Callable[[Report], None], on_exit: Callable[[str], None]) -> None:
        """Start the loop; `deliver` gets each Report, `on_exit` the reason of a death (from
        any thread)."""

    def send(self, command: Command) -> None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float) -> None: ...

    def decode(self, outputs: list[Any]) -> list[RequestOutput]:
        """A Report's outputs as RequestOutputs (on the event loop)."""

    def forget(self, request_ids: list[str]) -> None:
        """Requests that ended without a final output (a failed step)."""


class OutputStream:
    """The outputs of requests submitted together, as `(index, RequestOutput)` pairs.

    Each output is a cumulative snapshot, so when the reader falls behind, only the latest
    output of each request is yielded. Leaving early (`close`, or `async with`) aborts the
    requests that have not finished.
    """

    def __init__(self, owner: EngineLoop, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._owner = owner
        self._queue: asyncio.Queue[list[tuple[int, RequestOutput]] | Exception] = asyncio.Queue()
        self._pending: deque[tuple[int, RequestOutput]] = deque()
        self._finals: dict[int, RequestOutput] = {}
        self._closed = False

    @property
    def done(self) -> bool:
        return len(self._finals) == len(self.request_ids)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while not self._pending:
            if self.done:
                raise StopAsyncIteration
            self._take([await self._queue.get()])
        return self._pending.popleft()

    def _take(self, items: list[list[tuple[int, RequestOutput]] | Exception]) -> None:
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[int, RequestOutput] = {}
        for item in items:
            if isinstance(item, Exception):
                raise item
            latest.update(item)
        for index, out in sorted(latest.items()):
            if out.finished:
                self._finals[index] = out
            self._pending.append((index, out))

    def put(self, item: list[tuple[int, RequestOutput]] | Exception) -> None:
        self._queue.put_nowait(item)

    async def finals(self) -> list[RequestOutput]:
        """Wait for every request to finish; their final outputs in submission order."""
        async for _ in self:
            pass
        return self.results

    @property
    def results(self) -> list[RequestOutput]:
        """The final outputs in submission order, once the stream has run to its end."""
        assert self.done, "the stream has not finished"
        return [self._finals[i] for i in range(len(self.request_ids))]

    def close(self) -> None:
        """Abort the requests still running (idempotent; safe in a cancelled task)."""
        if self._closed:
            return
        self._closed = True
        unfinished = [rid for i, rid in enumerate(self.request_ids) if i not in self._finals]
        self._owner.release(self.request_ids, unfinished)

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EngineLoop:
    """Runs an Engine on a host of its own; submit, stream and abort from asyncio.

    engine: an EngineHost, or an Engine (run on an EngineThread with max_queued_requests;
    with a host, the host's limit applies and max_queued_requests must be None).
    """

    def __init__(
        self,
        engine: Engine | EngineHost,
        max_queued_requests: int | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        host = EngineThread(engine, max_queued_requests) if isinstance(engine, Engine) else engine
        if host is not engine and max_queued_requests is not None:
            raise ValueError("max_queued_requests belongs to the host that was passed")
        self._host: EngineHost = host
        self.max_queued_requests = host.max_queued_requests
        self.info = host.info
        self.limits = limits or RequestLimits.for_context(self.info.context_length)
        # NOTE: a tokenizer object must not be shared between threads: the event loop
        # decodes token texts with one copy, the tokenizer thread encodes with another.
        self.tokenizer = copy.deepcopy(host.tokenizer)
        self._encoder = copy.deepcopy(host.tokenizer)
        self._encoder_thread = ThreadPoolExecutor(1, thread_name_prefix="sageserve-tokenizer")
        # The engine's latest snapshot, from its latest report (for /get_server_info and the
        # metrics' gauges).
        self.stats: EngineStats = host.initial_stats
        self._gc_pauses = GcPauses()  # this process's collections, while started
        self.metrics = ServerMetrics(self.info, lambda: self.stats, self._gc_pauses)
        self.failure: str | None = None  # why the engine stopped, once it has
        self.on_death: Callable[[], None] | None = None
        self._routes: dict[str, tuple[OutputStream, int]] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}  # commands' tickets
        self._tickets = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._started = False
        self._ready = threading.Event()  # set once the engine has warmed up
        self.token_text = functools.lru_cache(maxsize=65536)(self._decode_token)
        self.token_bytes = TokenBytes(self.tokenizer) if self.tokenizer is not None else None

    # ------------------------------------------------------------- event loop side

    def start(self) -> None:
        """Start the engine's loop; call from the event loop that will submit requests.

        Also shortens the process's GIL switch interval to GIL_SWITCH_INTERVAL_S."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._started = True
        self._gc_pauses.install()
        self._host.start(self._deliver, self._exit)

    def stop(self) -> None:
        """Stop the engine (requests in flight are aborted) and wait for it."""
        self._host.send(Stop())
        self._host.join(30)
        self._encoder_thread.shutdown(wait=False, cancel_futures=True)
        self._gc_pauses.uninstall()

    @property
    def is_ready(self) -> bool:
        """True once the engine has warmed up and serves (until it stops)."""
        return self.is_alive and self._ready.is_set()

    @property
    def warms_up(self) -> bool:
        """Whether the engine runs the warm-up before it serves (CUDA, warm-up on)."""
        return self._host.warms_up

    async def wait_ready(self, poll_s: float = 0.05) -> bool:
        """Wait until the engine serves (True) or has stopped (False)."""
        while not self._ready.is_set():
            if self.failure is not None or (self._started and not self._host.is_alive()):
                return False
            await asyncio.sleep(poll_s)
        return self.is_alive

    def stop_serving(self, reason: str) -> None:
        """Fail every request, now and later, and tell the server to exit (event loop side):
        what an engine fault does, for a fault found outside it."""
        self._engine_died(reason)

    @property
    def is_alive(self) -> bool:
        return self.failure is None and self._started and self._host.is_alive()

    async def with_tokenizer(self, fn: Callable[[Any], T]) -> T:
        """`fn(tokenizer)` on the tokenizer thread (encoding, chat templates)."""
        if self._encoder is None:
            raise InvalidRequestError("this model has no tokenizer: pass token ids, not text")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encoder_thread, fn, self._encoder)

    async def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt: text tokenized (BOS added) off the event loop.

        Raises InvalidRequestError for a text longer than the limits allow.
        """
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            self.limits.check_chars([text])
        if not texts:
            return [list(p) for p in prompts]  # type: ignore[arg-type]
        encoded = iter(await self.with_tokenizer(lambda tok: _encode_all(tok, texts)))
        return [next(encoded) if isinstance(p, str) else list(p) for p in prompts]

    async def submit(
        self,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        request_ids: Sequence[str | None] | None = None,
    ) -> OutputStream:
        """Add requests atomically: all are accepted, or none (and the error is raised).

        Raises InvalidRequestError (HTTP 400), QueueFullError (503, retry later) or
        EngineDeadError (503, the server is exiting).
        """
        self._check_alive()
        self._check_size(len(prompts))
        token_ids = await self.encode(prompts)
        self._check_alive()  # it may have died while the prompts were tokenized
        ids = [rid or uuid.uuid4().hex for rid in (request_ids or [None] * len(prompts))]
        self._check_ids(ids)
        stream = OutputStream(self, ids)
        # Routes exist before the engine sees the requests: their first outputs may reach
        # the event loop before this coroutine resumes from the future below.
        self._routes.update({rid: (stream, i) for i, rid in enumerate(ids)})
        try:
            await self._command(lambda ticket: Add(token_ids, list(params), ids, ticket))
        except (InvalidRequestError, QueueFullError, RequestFailedError, EngineDeadError):
            self.release(ids, [])  # the engine took none of them
            raise
        except BaseException:
            # The client left while waiting: the engine may hold them by now.
            self.release(ids, ids)
            raise
        return stream

    async def _command(self, command: Callable[[int], Add | FlushCache]) -> None:
        """Send the command made with a new ticket; wait until the engine settles it."""
        ticket = next(self._tickets)
        future = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = future
        try:
            self._host.send(command(ticket))
            await future
        finally:
            self._waiting.pop(ticket, None)

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(
                f"the engine has stopped ({self.failure or 'not running'}); "
                "the server is shutting down"
            )

    def _check_size(self, size: int) -> None:
        """A request that can never be admitted is a 400 naming the limit, not a 503."""
        self.limits.check_batch(size)
        if self.max_queued_requests is None:
            return
        capacity = self.info.max_running_requests + self.max_queued_requests
        if size > capacity:
            raise InvalidRequestError(
                f"the request asks for {size} sequences (prompts x n); at most {capacity} can "
                f"be in flight ({self.info.max_running_requests} running, "
                f"{self.max_queued_requests} queued: --max-running-requests, "
                "--max-queued-requests)"
            )

    def _check_ids(self, ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            raise InvalidRequestError(f"request ids must be unique, got {ids}")
        taken = [rid for rid in ids if rid in self._routes]
        if taken:
            raise InvalidRequestError(f"request id {taken[0]!r} is already in use")

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request, each a cumulative snapshot; the last one is finished."""
        async with await self.submit([prompt], [params], [request_id]) as stream:
            async for _, out in stream:
                yield out

    def abort(self, request_id: str) -> bool:
        """Abort a running request by id (its stream ends with finish_reason "abort").

        Returns False when no such request is in flight.
        """
        if request_id not in self._routes:
            return False
        self._host.send(Abort([request_id]))
        return True

    async def flush_cache(self) -> None:
        """Empty the prefix cache (SGLang's /flush_cache).

        Raises InvalidRequestError while requests are in flight: their pages stay in use and
        a partial flush would be a surprise, so the cache is flushed only when idle.
        """
        await self._command(FlushCache)

    def release(self, request_ids: list[str], unfinished: list[str]) -> None:
        """Forget a stream's routes and abort its unfinished requests in the engine."""
        for rid in request_ids:
            self._routes.pop(rid, None)
        if unfinished:
            self._host.send(Abort(unfinished))

    # ------------------------------------------------- the engine's reports, applied

    def _deliver(self, report: Report) -> None:
        """The host's callback (any thread): apply the report on the event loop."""
        if report.ready:
            self._ready.set()
        self._post(self._apply, report)

    def _exit(self, reason: str) -> None:
        """The host's callback when the engine has died (any thread)."""
        self._post(self._engine_died, reason)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the event loop: now when called there (an engine process's
        reports are read on it), else through the loop's thread-safe queue."""
        assert self._loop is not None, "EngineLoop.start() was not called"
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _apply(self, report: Report) -> None:
        if report.stats is not None:
            self.stats = report.stats
        for ticket, error in report.settled:
            future = self._waiting.get(ticket)
            if future is not None:
                _settle(future, error)
        outputs = self._host.decode(report.outputs)
        self.metrics.observe(outputs)
        if report.step is not None:
            self.metrics.observe_step(report.step)
        self.metrics.observe_gc("engine", report.gc_pauses)  # the server's: at each scrape
        self._dispatch(outputs)
        if report.failed:
            self._host.forget(report.failed)
            self.metrics.observe_failed(report.failed)
            error = RequestFailedError("internal error in the engine step serving this request")
            self._fail(report.failed, error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_stream: dict[OutputStream, list[tuple[int, RequestOutput]]] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # its client has left
            by_stream.setdefault(route[0], []).append((route[1], out))
        for stream, items in by_stream.items():
            stream.put(items)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        streams = {self._routes[rid][0] for rid in request_ids if rid in self._routes}
        for stream in streams:
            stream.put(error)

    def _engine_died(self, reason: str) -> None:
        """Fail every waiting request and every later one; tell the server to exit."""
        self.failure = reason
        error = EngineDeadError(f"the engine has stopped ({reason}); the server is shutting down")
        for future in list(self._waiting.values()):
            _settle(future, error)
        self._fail(list(self._routes), error)
        if self.on_death is not None:
            self.on_death()

    def _decode_token(self, token_id: int) -> str:
        """The text of one token on its own (for logprob entries; cached as token_text)."""
        return self.tokenizer.decode([token_id])


def streamable_text(out: RequestOutput, stop: Sequence[str]) -> str:
    """The part of `out.text` that is safe to send before the request finishes.

    A tail that could still grow into a stop string is withheld: if the string completes,
    the engine cuts the text where it starts, and streamed text must never be taken back.
    """
    if out.finished or not stop:
        return out.text
    return out.text[: len(out.text) - StopChecker(stop).holdback(out.text)]


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    try:
        return [encode_prompt(tokenizer, text) for text in texts]
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return  # the submitter was cancelled; it has already released its requests
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
