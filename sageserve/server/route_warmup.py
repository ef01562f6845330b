"""Warm the HTTP routes before /health answers 200.

The engine's warm-up (engine/warmup.py) runs the model's kinds of steps; a user's
first request also runs code that the engine never does: the route's request model, the
streamed response, token texts and logprob entries, the chat template. Like SGLang's
launcher, which sends a /generate to its own server before it reports ready, the server
sends a few short streamed requests through its own app (in process, through the same
middleware and routes; no socket), then flushes the prefix cache they filled.

A failing warm-up request is a server that cannot serve: the caller stops it (SGLang does
the same) rather than report ready.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import torch

from sageserve.server.engine_loop import EngineLoop
from sageserve.server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 64
NEW_TOKENS = 4
TOP_LOGPROBS = 2
# Time for every warm-up request together (kernels are already compiled by then).
TIMEOUT_S = 120.0


def warmup_requests(engine_loop: EngineLoop, model_name: str) -> list[tuple[str, dict]]:
    """(path, JSON body) of each warm-up request: a streamed /generate with logprobs; with a
    tokenizer, a streamed /v1/completions with logprobs, and a streamed chat completion when
    the model has a chat template. Prompts are random token ids from a fixed seed (the chat
    prompt is a short text); greedy."""
    ids = _prompt(engine_loop.info.vocab_size, min(PROMPT_TOKENS, _longest_prompt(engine_loop)))
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    requests = [
        ("/generate", {"input_ids": ids, "sampling_params": params, "stream": True,
                       "return_logprob": True, "top_logprobs_num": TOP_LOGPROBS}),
    ]  # fmt: skip
    if engine_loop.tokenizer is None:  # the OpenAI routes refuse it (they answer with text)
        return requests
    completion = {"model": model_name, "prompt": ids, "max_tokens": NEW_TOKENS,
                  "temperature": 0, "stream": True, "logprobs": TOP_LOGPROBS}  # fmt: skip
    requests.append(("/v1/completions", completion))
    if getattr(engine_loop.tokenizer, "chat_template", None):
        chat = {"model": model_name, "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}  # fmt: skip
        requests.append(("/v1/chat/completions", chat))
    return requests


async def warm_up_routes(app: Any, engine_loop: EngineLoop, model_name: str,
                         api_key: str | None) -> int:  # fmt: skip
    """Send the warm-up requests through `app`; returns their number. RuntimeError naming
    the route if one does not answer 200 with a complete stream."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = httpx.ASGITransport(app=app)
    requests = warmup_requests(engine_loop, model_name)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://warm-up", headers=headers, timeout=TIMEOUT_S
    ) as client:
        for path, body in requests:
            response = await client.post(path, json=body)
            _check(path, response)
    try:
        await engine_loop.flush_cache()
    except InvalidRequestError:
        # Users' requests arrived meanwhile; the warm-up's few cached pages are evicted
        # like any other once the pool needs them.
        logger.info("route warm-up: prefix cache not flushed (requests in flight)")
    return len(requests)


def _check(path: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(
            f"the warm-up request to {path} failed: HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )
    if "data: [DONE]" not in response.text:
        raise RuntimeError(f"the warm-up request to {path} streamed no end: {response.text[-300:]}")


def _longest_prompt(engine_loop: EngineLoop) -> int:
    info = engine_loop.info
    return max(1, min(info.context_length, info.pool_capacity_tokens) - NEW_TOKENS)


def _prompt(vocab_size: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()
