"""The server reports ready only once its engine thread has warmed up (on CUDA it runs one
short request there: per-thread library state such as PyTorch's cuBLAS handles is created
on a thread's first use, which the first user would otherwise wait for). Here, on CPU, the
thread's warm-up is held back by a test hook."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.warmup import warm_up_thread
from sageserve.models.loader import LoadedModel, load_model
from sageserve.server.app import build_app
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop

BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def _engine(loaded: LoadedModel) -> Engine:
    config = EngineConfig(
        dtype="float32", device="cpu", context_length=256, cache=CacheConfig(max_total_tokens=512)
    )
    return Engine(config, loaded)


def test_health_is_503_until_the_engine_thread_has_warmed_up(smollm2: LoadedModel) -> None:
    """/health says the engine is warming up; a request sent meanwhile waits and succeeds;
    then /health is 200."""
    engine = _engine(smollm2)
    release, entered = threading.Event(), threading.Event()

    def held_warm_up() -> None:
        entered.set()
        assert release.wait(timeout=30)

    engine.warm_up_thread = held_warm_up  # type: ignore[method-assign]
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


def test_the_thread_warm_up_leaves_the_engine_as_it_found_it(smollm2: LoadedModel) -> None:
    """warmup.warm_up_thread (run on CUDA only; here called directly): pool whole, prefix
    cache empty, and a request's tokens those of an engine that never ran it."""
    prompt = [100 + i for i in range(20)]
    params = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    outputs = []
    for warm in (False, True):
        engine = _engine(smollm2)
        if warm:
            warm_up_thread(engine)
            stats = engine.stats()
            assert stats.num_free_pages == stats.num_usable_pages
            assert stats.num_cached_pages == 0 and not engine.request_ids()
        engine.add_request(prompt, SamplingParams(**params), request_id="r")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs.append(out.token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 5
