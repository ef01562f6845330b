"""The engine thread's life: until it has warmed up /health says so (on CUDA it runs the
engine's warm-up first, on the thread that will serve: per-thread library state such as
PyTorch's cuBLAS handles is created on a thread's first use; here, on CPU, a test hook holds
it back); when it dies, waiting
requests get 503 at once, /health says so, and the server exits with status 1 (in-process:
the fault is injected into the engine)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from server_process import free_port

from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel, load_model
from sageserve.server.app import build_app
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.errors import RequestFailedError
from sageserve.server.serve import serve

BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def _engine(loaded: LoadedModel, warm_up_now: bool = True) -> Engine:
    config = EngineConfig(
        dtype="float32", device="cpu", context_length=256, cache=CacheConfig(max_total_tokens=512)
    )
    return Engine(config, loaded, warm_up_now)


def _break(engine: Engine) -> None:
    """Once the next request is admitted, the loop's own check for work raises: a fault
    outside any request's handling. (Raising at once would race the thread's idle check
    and could stop the server before the next request arrives.)"""
    has_work = engine.has_unfinished_requests

    def broken() -> bool:
        if engine.request_ids():
            raise RuntimeError("injected fault")
        return has_work()

    engine.has_unfinished_requests = broken  # type: ignore[method-assign]


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail("the in-process server did not become healthy")


def test_a_dead_engine_thread_fails_its_requests_and_exits_1(smollm2: LoadedModel) -> None:
    engine = _engine(smollm2)
    loop = EngineLoop(engine)
    args = ServerArgs(port=free_port(), log_level="warning")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(code=serve(loop, args)))
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    _wait_healthy(url)
    assert httpx.post(f"{url}/generate", json=BODY, timeout=60).status_code == 200
    _break(engine)
    start = time.monotonic()
    got = httpx.post(f"{url}/generate", json=BODY, timeout=60)
    assert got.status_code == 503, got.text
    assert got.json()["error"]["code"] == "engine_dead"
    assert "injected fault" in got.json()["error"]["message"]
    thread.join(timeout=30)
    assert not thread.is_alive() and result["code"] == 1
    assert time.monotonic() - start < 30
    assert loop.failure is not None and not loop.is_alive


def test_health_and_new_requests_say_the_engine_has_stopped(smollm2: LoadedModel) -> None:
    loop = EngineLoop(_engine(smollm2))
    loop.failure = "RuntimeError: injected fault"  # what _engine_died records
    app = build_app(loop, ServerArgs())

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/health"), await client.post("/generate", json=BODY)

    health, generate = asyncio.run(ask())
    assert health.status_code == 503 and "injected fault" in health.json()["error"]["message"]
    assert generate.status_code == 503 and generate.json()["error"]["code"] == "engine_dead"


def test_a_fault_admitting_one_request_fails_only_that_request(smollm2: LoadedModel) -> None:
    engine = _engine(smollm2)
    add_request = engine.add_request
    poisoned = "poisoned prompt"

    def faulty_add(prompt: Any, *args: Any, **kwargs: Any) -> str:
        if list(prompt) == engine.tokenize(poisoned):
            raise TypeError("injected fault while admitting")
        return add_request(prompt, *args, **kwargs)

    engine.add_request = faulty_add  # type: ignore[method-assign]
    loop = EngineLoop(engine)
    app = build_app(loop, ServerArgs())

    async def ask() -> list[httpx.Response]:
        loop.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            bad = {**BODY, "text": poisoned}
            sent = [client.post("/generate", json=b) for b in (BODY, bad, BODY, BODY)]
            responses = await asyncio.gather(*sent)
            responses.append(await client.get("/health"))
        loop.stop()
        return responses

    innocent, bad, *others, health = asyncio.run(ask())
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
    assert all(r.status_code == 200 for r in (innocent, *others)), [r.text for r in others]
    assert health.status_code == 200
    assert engine.stats().num_steps > 0 and not engine.has_unfinished_requests()


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(smollm2: LoadedModel) -> None:
    """The requests in flight when a step raises fail (500), counted with finish reason
    "error"; their pages are freed and the next request is served."""
    engine = _engine(smollm2)
    step, calls = engine.step, []

    def step_failing_once() -> Any:
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("injected fault in a step")
        return step()

    engine.step = step_failing_once  # type: ignore[method-assign]
    loop = EngineLoop(engine)

    async def ask() -> int:
        loop.start()
        assert await loop.wait_ready()
        failing = await loop.submit(["Hello", "Hi"], [SamplingParams(max_new_tokens=16)] * 2)
        with pytest.raises(RequestFailedError, match="internal error in the engine step"):
            await asyncio.wait_for(failing.finals(), 60)
        after = await loop.submit(["Hello"], [SamplingParams(max_new_tokens=3)])
        (out,) = await asyncio.wait_for(after.finals(), 60)
        await loop.flush_cache()
        loop.stop()
        return out.num_completion_tokens

    assert asyncio.run(ask()) == 3
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and stats.num_cached_pages == 0
    assert b'sageserve_requests_total{finish_reason="error"} 2.0' in loop.metrics.render()


def test_an_unexpected_fault_in_a_route_is_an_openai_style_500(smollm2: LoadedModel) -> None:
    loop = EngineLoop(_engine(smollm2))

    async def broken_submit(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("injected fault in a route")

    loop.submit = broken_submit  # type: ignore[method-assign]
    app = build_app(loop, ServerArgs())

    async def ask() -> httpx.Response:
        # The app re-raises the fault after answering (so uvicorn logs it): don't re-raise here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/generate", json=BODY)

    got = asyncio.run(ask())
    assert got.status_code == 500 and got.headers["content-type"] == "application/json"
    assert got.json()["error"] == {
        "message": "internal server error (KeyError); the server log has the details",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


def test_health_is_503_until_the_engine_thread_has_warmed_up(smollm2: LoadedModel) -> None:
    """/health says the engine is warming up; a request sent meanwhile waits and succeeds;
    then /health is 200."""
    engine = _engine(smollm2)
    release, entered = threading.Event(), threading.Event()

    def held_warm_up() -> None:
        entered.set()
        assert release.wait(timeout=30)

    engine.warm_up = held_warm_up  # type: ignore[method-assign]
    loop = EngineLoop(engine)
    app = build_app(loop, ServerArgs())

    async def ask() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        loop.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert await asyncio.to_thread(entered.wait, 30)
            warming = await client.get("/health")
            sent = asyncio.ensure_future(client.post("/generate", json=BODY))
            await asyncio.sleep(0.2)
            assert not sent.done()
            release.set()
            generated = await sent
            ready = await client.get("/health")
        loop.stop()
        return warming, generated, ready

    warming, generated, ready = asyncio.run(ask())
    assert warming.status_code == 503, warming.text
    assert warming.json()["error"]["message"] == "the engine is warming up"
    assert generated.status_code == 200 and generated.json()["text"]
    assert ready.status_code == 200


def test_the_warm_up_runs_on_the_engine_thread(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine built with warm_up_now=False leaves the warm-up to its owner; the server's
    engine thread runs it, once, before it serves (per-thread library state, such as
    PyTorch's cuBLAS handle, is then the serving thread's). Built by default, the engine
    warms up in its constructor."""
    threads: list[str] = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: threads.append(_thread_name()))
    _engine(smollm2)
    assert threads == [_thread_name()]
    threads.clear()
    loop = EngineLoop(_engine(smollm2, warm_up_now=False))
    assert threads == []

    async def start_and_wait() -> bool:
        loop.start()
        ready = await asyncio.to_thread(loop._ready.wait, 30)
        loop.stop()
        return ready

    assert asyncio.run(start_and_wait())
    assert threads == ["sageserve-engine"]


def _thread_name() -> str:
    return threading.current_thread().name
