"""The route warm-up (server/route_warmup.py): on CUDA, once the engine thread is ready, the
server sends short streamed requests through its own routes before /health answers 200; a
failing one stops the server. Here on CPU, where it is off by default, it is switched on."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
import torch
from server_process import free_port
from tiny_models import tiny_llama_config

from sageserve.attention.sage_attn.options import SageOptions
from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.engine import Engine
from sageserve.models.loader import LoadedModel, build_model, init_dummy_weights, load_model
from sageserve.server import app as app_module
from sageserve.server import route_warmup
from sageserve.server.app import build_app
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.serve import serve


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tokenizerless() -> LoadedModel:
    """Dummy weights from a bare config: no tokenizer (as `--load-format dummy` on a config)."""
    config = tiny_llama_config(vocab_size=512)
    model = build_model(config, torch.float32, torch.device("cpu"))
    init_dummy_weights(model, seed=0)
    return LoadedModel(model.eval(), config, None, torch.float32, "tiny dummy model")


def _engine(loaded: LoadedModel) -> Engine:
    config = EngineConfig(
        dtype="float32", device="cpu", context_length=256, cache=CacheConfig(max_total_tokens=512)
    )
    return Engine(config, loaded)


def _loop(loaded: LoadedModel) -> EngineLoop:
    return EngineLoop(_engine(loaded))


def test_the_warm_up_requests_cover_both_apis_and_leave_the_engine_whole(
    smollm2: LoadedModel,
) -> None:
    """/generate, /v1/completions and (SmolLM2 has a chat template) /v1/chat/completions all
    answer a complete stream, through the API key check; afterwards no request is left, the
    pool is whole and the prefix cache empty."""
    engine = _engine(smollm2)
    loop = EngineLoop(engine)
    args = ServerArgs(api_key="sk-test")
    app = build_app(loop, args, warm_up_routes=False)
    paths = [path for path, _ in route_warmup.warmup_requests(loop, args.served_model_name)]
    assert paths == ["/generate", "/v1/completions", "/v1/chat/completions"]

    async def run() -> int:
        loop.start()
        assert await loop.wait_ready()
        count = await route_warmup.warm_up_routes(app, loop, args.served_model_name, "sk-test")
        loop.stop()
        return count

    assert asyncio.run(run()) == 3
    stats = engine.stats()
    assert stats.num_steps >= 3 * route_warmup.NEW_TOKENS
    assert stats.num_free_pages == stats.num_usable_pages and stats.num_cached_pages == 0
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("freeze_gc", [True, False])
def test_health_is_503_until_the_route_warm_up_is_done(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch, freeze_gc: bool
) -> None:
    """With the engine thread ready but the route warm-up held back, /health says the engine
    is warming up; once it is done (and the startup heap frozen, unless
    --disable-gc-freeze), 200."""
    release, entered = threading.Event(), threading.Event()
    real = route_warmup.warm_up_routes

    async def held(*args: Any) -> int:
        entered.set()
        await asyncio.to_thread(release.wait, 30)
        return await real(*args)

    monkeypatch.setattr(app_module, "warm_up_routes", held)
    frozen: list[bool] = []  # the real freeze would keep this test process's cycles forever
    monkeypatch.setattr(app_module, "freeze_startup_heap", lambda process: frozen.append(True))
    loop = _loop(smollm2)
    app = build_app(loop, ServerArgs(freeze_gc=freeze_gc), warm_up_routes=True)

    async def ask() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert await asyncio.to_thread(entered.wait, 30)
                warming = (await client.get("/health")).status_code
                release.set()
                for _ in range(300):
                    ready = (await client.get("/health")).status_code
                    if ready == 200:
                        break
                    await asyncio.sleep(0.1)
        return warming, ready

    assert asyncio.run(ask()) == (503, 200)
    assert frozen == [True] * freeze_gc  # after the warm-up, before ready


def test_a_failing_warm_up_request_stops_the_server(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm-up request answered with an error: the server does not report ready, it exits
    with status 1, and the failure names the route."""
    bad = [("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": -1}})]
    monkeypatch.setattr(route_warmup, "warmup_requests", lambda *args: bad)
    monkeypatch.setattr(EngineLoop, "warms_up", property(lambda self: True))
    loop = _loop(smollm2)
    args = ServerArgs(port=free_port(), log_level="warning")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(code=serve(loop, args)))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and result["code"] == 1
    assert loop.failure is not None and "/generate" in loop.failure and "HTTP 400" in loop.failure


def test_a_model_without_a_tokenizer_warms_up_generate_only(tokenizerless: LoadedModel) -> None:
    """Without a tokenizer the OpenAI routes answer 400 naming /generate (they write text;
    before, a streamed completion with logprobs failed mid-stream), /generate serves token
    ids, and the warm-up sends only /generate."""
    loop = _loop(tokenizerless)
    app = build_app(loop, ServerArgs(), warm_up_routes=False)
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 1, "stream": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ids = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}

    async def run() -> tuple[int, list[httpx.Response]]:
        loop.start()
        assert await loop.wait_ready()
        count = await route_warmup.warm_up_routes(app, loop, "tiny", None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            got = [await client.post("/v1/completions", json=body),
                   await client.post("/v1/chat/completions", json=chat),
                   await client.post("/generate", json=ids)]  # fmt: skip
        loop.stop()
        return count, got

    count, (completion, chat_reply, generated) = asyncio.run(run())
    assert count == 1
    for reply, route in ((completion, "/v1/completions"), (chat_reply, "/v1/chat/completions")):
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert "no tokenizer" in message and route in message and "/generate" in message
    assert generated.status_code == 200 and len(generated.json()["output_ids"]) == 2


# -------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend", ["triton", "sage_attn", "sage_attn-triton", "sage_attn-prepass"]
)
def test_nothing_compiles_while_serving_on_gpu(backend: str, monkeypatch: pytest.MonkeyPatch):
    """Once /health answers 200 (engine warm-up on the engine thread, then the route
    warm-up), a mix of requests the warm-up never made (odd prompt lengths, several at once
    so that prompts prefill beside decodes, a prefix-cache hit) loads no new Triton kernel
    variant: Triton's post-compile hook, called for every variant a process first uses,
    never fires."""
    import triton

    cuda = torch.device("cuda")
    config = tiny_llama_config(vocab_size=512)
    model = build_model(config, torch.float16, cuda)
    init_dummy_weights(model, seed=0)
    loaded = LoadedModel(model.eval(), config, None, torch.float16, "tiny dummy model")
    options = ()
    # sage_attn: the default, whose prefill chunks run through the Gluon kernel on sm_90.
    if backend == "sage_attn-triton":  # the Triton prefill (the default on other GPUs)
        backend, options = "sage_attn", (SageOptions(impl="triton"),)
    if backend == "sage_attn-prepass":  # prefill queries quantized by a pass first
        backend, options = "sage_attn", (SageOptions(rotation_kernel="prepass"),)
    # A model path of its own: the default one would need the SmolLM2 package installed.
    engine_config = EngineConfig(model_path="tiny-dummy-llama", dtype="float16", device="cuda",
                                 attention_backend=backend, attention_options=options,
                                 cache=CacheConfig(max_total_tokens=16384))  # fmt: skip
    loop = EngineLoop(Engine(engine_config, loaded, warm_up_now=False))
    app = build_app(loop, ServerArgs())
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 5, 37, 150, 333, 700, 19, 64, 250]
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    prompts.append(prompts[4] + [7, 8, 9])  # a prefix hit, then 3 new tokens
    compiled: list[str] = []

    def record(*args: Any, **kwargs: Any) -> bool:
        compiled.append(str(kwargs.get("repr") or kwargs.get("fn")))
        return False

    async def serve() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                         timeout=600) as client:  # fmt: skip
                for _ in range(6000):
                    if (await client.get("/health")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", record)
                sent = [client.post("/generate", json={
                    "input_ids": p, "sampling_params": {"max_new_tokens": 3 + i * 2,
                                                        "temperature": 0, "ignore_eos": True}})
                        for i, p in enumerate(prompts[:-1])]  # fmt: skip
                answers = await asyncio.gather(*sent)
                hit = {"input_ids": prompts[-1], "sampling_params": {"max_new_tokens": 4}}
                answers.append(await client.post("/generate", json=hit))
        return [a.status_code for a in answers]

    assert asyncio.run(serve()) == [200] * len(prompts)
    assert compiled == [], compiled
