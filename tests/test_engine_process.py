"""The engine in a process of its own (what launch_server runs): it serves exactly what the
engine on a thread serves, refuses a bad model at load, survives the terminal's Ctrl-C, and
its death or the server's is seen by the other side."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.engine_process import EngineProcess
from sageserve.server.errors import EngineDeadError, InvalidRequestError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def config(smollm2_gguf: Path) -> EngineConfig:
    return EngineConfig(
        model_path=str(smollm2_gguf),
        dtype="float32",
        device="cpu",
        context_length=256,
        cache=CacheConfig(max_total_tokens=1024),
    )


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_new_tokens=24, logprobs=3),
        SamplingParams(temperature=0, max_new_tokens=24, stop=["\n"], prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=7, max_new_tokens=17),
    ]


async def _serve(loop: EngineLoop) -> list[list[RequestOutput]]:
    """Every output of each request (streamed), after the loop has warmed up. The requests
    go in one submission: admitted together, they share every step (a batch of another
    shape may round the logprobs differently)."""
    loop.start()
    try:
        assert await loop.wait_ready()
        outputs: list[list[RequestOutput]] = [[] for _ in PROMPTS]
        async with await loop.submit(PROMPTS, _params()) as stream:
            async for index, out in stream:
                outputs[index].append(out)
        return outputs
    finally:
        loop.stop()


def _comparable(outs: list[RequestOutput]) -> tuple:
    final = outs[-1]
    return (
        final.text,
        final.token_ids,
        final.finish_reason,
        final.logprobs,
        final.prompt_logprobs,
        [out.text for out in outs if out.finished],
    )


def test_the_engine_process_serves_what_the_engine_thread_serves(config: EngineConfig) -> None:
    on_thread = asyncio.run(_serve(EngineLoop(Engine(config, warm_up_now=False))))
    in_process = asyncio.run(_serve(EngineLoop(EngineProcess(config, log_level="warning"))))
    assert len(in_process[0]) > 1 and len(in_process[2]) > 1  # streamed
    for thread_outs, process_outs in zip(on_thread, in_process, strict=True):
        assert _comparable(process_outs) == _comparable(thread_outs)
        assert process_outs[-1].finished and process_outs[-1].token_ids


def test_a_model_the_engine_refuses_is_a_value_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"missing\.gguf' does not exist"):
        EngineProcess(
            EngineConfig(model_path=missing, device="cpu"), log_level="warning"
        ).wait_loaded()


def test_the_engines_refusals_come_back_as_on_a_thread(config: EngineConfig) -> None:
    """A request the engine refuses is the same InvalidRequestError (a 400) and the engine
    serves on; a command settles through its ticket."""
    loop = EngineLoop(EngineProcess(config, log_level="warning"))
    too_long = list(range(1000, 1300))  # > the context of 256

    async def ask() -> None:
        loop.start()
        try:
            assert await loop.wait_ready()
            with pytest.raises(InvalidRequestError, match="256"):
                await loop.submit([too_long], [SamplingParams(max_new_tokens=4)])
            await loop.flush_cache()
            stream = await loop.submit(["Hi"], [SamplingParams(max_new_tokens=3)])
            assert (await stream.finals())[0].num_completion_tokens == 3
        finally:
            loop.stop()

    asyncio.run(ask())


def test_the_engine_process_ignores_ctrl_c_and_stops_when_told(config: EngineConfig) -> None:
    host = EngineProcess(config, log_level="warning")
    loop = EngineLoop(host)
    deaths: list[str] = []
    loop.on_death = lambda: deaths.append(loop.failure or "")

    async def ask() -> RequestOutput:
        loop.start()
        assert await loop.wait_ready()
        os.kill(host.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        await asyncio.sleep(0.5)
        stream = await loop.submit(["Hello"], [SamplingParams(max_new_tokens=4)])
        (final,) = await stream.finals()
        loop.stop()
        return final

    assert asyncio.run(ask()).finish_reason == "length"
    assert host._process.exitcode == 0 and deaths == []


def test_a_killed_engine_process_fails_the_waiting_requests(config: EngineConfig) -> None:
    host = EngineProcess(config, log_level="warning")
    loop = EngineLoop(host)
    deaths: list[str] = []
    loop.on_death = lambda: deaths.append(loop.failure or "")

    async def ask() -> None:
        loop.start()
        assert await loop.wait_ready()
        stream = await loop.submit(["Count to a thousand:"], [SamplingParams(max_new_tokens=200)])
        await anext(stream)  # it runs
        os.kill(host.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exit code -9"):
            await stream.finals()
        with pytest.raises(EngineDeadError):
            await loop.submit(["Hello"], [SamplingParams(max_new_tokens=4)])
        loop.stop()

    asyncio.run(ask())
    assert deaths and "exit code -9" in deaths[0] and not loop.is_alive


def test_the_engine_process_exits_when_the_server_process_has_gone(config: EngineConfig) -> None:
    """The server's ends of the pipes close when its process dies: the child sees EOF."""
    host = EngineProcess(config, log_level="warning")
    host.wait_loaded()  # (until read, the child's answer fills the pipe and it waits there)
    host._commands.close()
    deadline = time.monotonic() + 60  # it warms up first (a no-op on CPU), then reads
    while host.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host._process.exitcode == 0


def test_an_engine_process_never_started_is_stopped_at_once(config: EngineConfig) -> None:
    host = EngineProcess(config, log_level="warning")
    EngineLoop(host).stop()
    assert not host.is_alive()
