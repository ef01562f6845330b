"""The engine on its own thread, behind an asyncio API for the HTTP server.

The engine is not thread-safe, so only the engine thread touches it. The event loop hands it
commands (add, abort) through a `queue.Queue`; the thread hands each step's outputs back with
`loop.call_soon_threadsafe`, where they are routed to the streams waiting for them::

    event loop                         engine thread
    submit() ── _Add ──────────────>   engine.add_request (ValueError -> that request's 400)
    OutputStream <── outputs ───────   engine.step()        (one call per step)
    OutputStream.close() ── _Abort ─>  engine.abort         (frees the request's pages)

Requests submitted together (a batch, or OpenAI's `n`) share one OutputStream, so the HTTP
layer can stream them interleaved.

Text is tokenized (and chat templates applied) on a third thread with its own tokenizer, so
a long prompt stalls neither the event loop nor the engine's steps.

Failures stay with the request that caused them: a bad request is refused at admission, an
internal fault while admitting it fails it alone (500), a failing step fails the requests
in flight (500) and the loop goes on. Should the engine thread itself stop, every waiting
request gets 503 at once, later ones too, and `on_death` is called so the server can exit.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import queue
import sys
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sageserve.engine.admission import encode_prompt
from sageserve.engine.engine import Engine
from sageserve.engine.info import EngineStats
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.stop import StopChecker
from sageserve.engine.token_bytes import TokenBytes
from sageserve.server.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from sageserve.server.limits import RequestLimits
from sageserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
T = TypeVar("T")


@dataclass
class _Add:
    prompts: list[list[int]]
    params: list[SamplingParams]
    request_ids: list[str]
    future: asyncio.Future[None]


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _FlushCache:
    future: asyncio.Future[None]


_STOP = object()
# The server's GIL switch interval (Python's default: 5 ms). The 32-client figures in
# BENCHMARKS.md (issue 16, H100) that meet the ITL target were measured with 0.5 ms; 5 ms was
# not measured against it cleanly (those runs also compiled kernels on first use).
GIL_SWITCH_INTERVAL_S = 0.0005


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
    """Runs an Engine on a dedicated thread; submit, stream and abort from asyncio."""

    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.info = engine.info
        self.limits = limits or RequestLimits.for_context(self.info.context_length)
        # NOTE: a tokenizer object must not be shared between threads: the event loop
        # decodes token texts with one copy, the tokenizer thread encodes with another.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._encoder = copy.deepcopy(engine.tokenizer)
        self._encoder_thread = ThreadPoolExecutor(1, thread_name_prefix="sageserve-tokenizer")
        # The engine's latest snapshot, published by the engine thread after every iteration
        # (for /get_server_info and the metrics' gauges); taken here before the thread starts.
        self.stats: EngineStats = engine.stats()
        self.metrics = ServerMetrics(self.info, lambda: self.stats)
        self.failure: str | None = None  # why the engine thread stopped, once it has
        self.on_death: Callable[[], None] | None = None
        self._engine = engine
        self._commands: queue.Queue[Any] = queue.Queue()
        self._routes: dict[str, tuple[OutputStream, int]] = {}
        self._pending_adds: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # set once the engine thread has warmed up
        self.token_text = functools.lru_cache(maxsize=65536)(self._decode_token)
        self.token_bytes = TokenBytes(self.tokenizer) if self.tokenizer is not None else None

    # ------------------------------------------------------------- event loop side

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will submit requests.

        Also shortens the process's GIL switch interval to GIL_SWITCH_INTERVAL_S."""
        # Every torch op and kernel launch of a step lets go of the GIL and takes it back;
        # while the event loop's thread runs Python, each take waits up to the switch
        # interval (5 ms by default), and a step of hundreds of launches queues behind it.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sageserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (requests in flight are aborted) and wait for it."""
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._encoder_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def is_ready(self) -> bool:
        """True once the engine thread has warmed up and serves (until it stops)."""
        return self.is_alive and self._ready.is_set()

    @property
    def warms_up(self) -> bool:
        """Whether the engine thread runs the warm-up before it serves (CUDA, warm-up on)."""
        return self._engine.warms_up

    async def wait_ready(self, poll_s: float = 0.05) -> bool:
        """Wait until the engine thread serves (True) or has stopped (False)."""
        while not self._ready.is_set():
            if self.failure is not None or (self._thread and not self._thread.is_alive()):
                return False
            await asyncio.sleep(poll_s)
        return self.is_alive

    def stop_serving(self, reason: str) -> None:
        """Fail every request, now and later, and tell the server to exit (event loop side):
        what an engine-thread fault does, for a fault found outside it."""
        self._engine_died(reason)

    @property
    def is_alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

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
        future = asyncio.get_running_loop().create_future()
        self._pending_adds.add(future)
        self._commands.put(_Add(token_ids, list(params), ids, future))
        try:
            await future
        except (InvalidRequestError, QueueFullError, RequestFailedError, EngineDeadError):
            self.release(ids, [])  # the engine thread took none of them
            raise
        except BaseException:
            # The client left while waiting: the engine may hold them by now.
            self.release(ids, ids)
            raise
        finally:
            self._pending_adds.discard(future)
        return stream

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
        self._commands.put(_Abort([request_id]))
        return True

    async def flush_cache(self) -> None:
        """Empty the prefix cache (SGLang's /flush_cache).

        Raises InvalidRequestError while requests are in flight: their pages stay in use and
        a partial flush would be a surprise, so the cache is flushed only when idle.
        """
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_FlushCache(future))
        await future

    def release(self, request_ids: list[str], unfinished: list[str]) -> None:
        """Forget a stream's routes and abort its unfinished requests in the engine."""
        for rid in request_ids:
            self._routes.pop(rid, None)
        if unfinished:
            self._commands.put(_Abort(unfinished))

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
        for future in list(self._pending_adds):
            _settle(future, error)
        self._fail(list(self._routes), error)
        if self.on_death is not None:
            self.on_death()

    def _decode_token(self, token_id: int) -> str:
        """The text of one token on its own (for logprob entries; cached as token_text)."""
        return self.tokenizer.decode([token_id])

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:
            # NOTE: _apply and _step keep request failures to their requests; reaching here
            # means the loop itself is broken: hand the failure to the event loop and stop.
            logger.critical("the engine thread stopped", exc_info=True)
            self._post(self._engine_died, f"{type(err).__name__}: {err}")

    def _serve(self) -> None:
        self._engine.warm_up()
        self._ready.set()
        logger.info("engine loop started")
        self._publish_stats()
        while True:
            idle = not self._engine.has_unfinished_requests()
            commands = self._drain(block=idle)
            for command in commands:
                if command is _STOP:
                    self._abort_all()
                    logger.info("engine loop stopped")
                    return
                self._apply(command)
            if self._engine.has_unfinished_requests():
                self._step()
            self._publish_stats()

    def _drain(self, block: bool) -> list[Any]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort | _FlushCache) -> None:
        if isinstance(command, _FlushCache):
            self._post(_settle, command.future, self._flush_cache())
            return
        if isinstance(command, _Abort):
            aborted = [self._engine.abort(rid) for rid in command.request_ids]
            outputs = [out for out in aborted if out is not None]
            self.metrics.observe(outputs)
            self._post(self._dispatch, outputs)
            return
        try:
            self._add(command)
        except (InvalidRequestError, QueueFullError) as err:
            self._post(_settle, command.future, err)
        except Exception:
            logger.exception("admitting request(s) %s failed", ", ".join(command.request_ids))
            for rid in command.request_ids:
                self._engine.abort(rid)
            message = f"internal error while admitting request {command.request_ids[0]}"
            self._post(_settle, command.future, RequestFailedError(message))
        else:
            self._post(_settle, command.future, None)

    def _add(self, command: _Add) -> None:
        limit = self.max_queued_requests
        if limit is not None:
            in_flight = self._engine.stats().num_unfinished + len(command.prompts)
            if in_flight > self.info.max_running_requests + limit:
                raise QueueFullError(
                    f"too many requests in flight (at most {self.info.max_running_requests} "
                    f"running and {limit} queued); retry later"
                )
        added: list[str] = []
        try:
            for prompt, params, rid in zip(
                command.prompts, command.params, command.request_ids, strict=True
            ):
                added.append(self._engine.add_request(prompt, params, rid))
        except ValueError as err:
            for rid in added:
                self._engine.abort(rid)
            raise InvalidRequestError(str(err)) from err

    def _flush_cache(self) -> InvalidRequestError | None:
        if self._engine.has_unfinished_requests():
            return InvalidRequestError(
                "requests are in flight; the prefix cache is flushed only when the server is idle"
            )
        self._engine.flush_prefix_cache()
        return None

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception:
            # NOTE: one failing step must not take the server down: log it with its
            # traceback, fail the requests it may have touched, and keep serving. Which
            # request broke a batched step is unknown, so all of them fail.
            ids = self._engine.request_ids()
            logger.exception("engine step failed; failing requests %s", ", ".join(ids))
            self._abort_all()
            self.metrics.observe_failed(ids)
            error = RequestFailedError("internal error in the engine step serving this request")
            self._post(self._fail, ids, error)
            return
        self.metrics.observe(outputs)
        if self._engine.last_step is not None:
            self.metrics.observe_step(self._engine.last_step)
        self._post(self._dispatch, outputs)

    def _abort_all(self) -> list[str]:
        ids = self._engine.request_ids()
        for rid in ids:
            self._engine.abort(rid)
        return ids

    def _publish_stats(self) -> None:
        self.stats = self._engine.stats()

    def _post(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None, "EngineLoop.start() was not called"
        self._loop.call_soon_threadsafe(callback, *args)


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
