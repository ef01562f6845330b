"""OpenAI's routes: /v1/completions, /v1/chat/completions, /v1/models[/{id}]."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sageserve.server.args import ServerArgs
from sageserve.server.chat_template import render_chat
from sageserve.server.disconnect import CLIENT_CLOSED_REQUEST, finals_unless_disconnected
from sageserve.server.engine_loop import EngineLoop, OutputStream, Prompt
from sageserve.server.openai_views import ChatView, CompletionView, Job, Sent, View, usage
from sageserve.server.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EventStreamResponse,
    ModelCard,
    ModelList,
    bad_request,
    make_sampling_params,
    sse,
)


def build_router(engine_loop: EngineLoop, server_args: ServerArgs) -> APIRouter:
    """The OpenAI-compatible routes over `engine_loop`."""
    router = APIRouter(prefix="/v1")
    api = _OpenAI(engine_loop, server_args)
    router.add_api_route("/models", api.models, methods=["GET"], response_model=ModelList)
    router.add_api_route(
        "/models/{model_id:path}", api.model, methods=["GET"], response_model=ModelCard
    )
    router.add_api_route(
        "/completions",
        api.completions,
        methods=["POST"],
        response_model=CompletionResponse,
    )
    router.add_api_route(
        "/chat/completions",
        api.chat_completions,
        methods=["POST"],
        response_model=ChatCompletionResponse,
    )
    return router


class _OpenAI:
    """The handlers; they share the engine loop and the served names."""

    def __init__(self, engine_loop: EngineLoop, server_args: ServerArgs) -> None:
        self.loop = engine_loop
        self.names = server_args.served_model_names
        self.created = int(time.time())

    def _card(self, name: str) -> ModelCard:
        context = self.loop.info.context_length
        return ModelCard(id=name, created=self.created, max_model_len=context)

    async def models(self) -> ModelList:
        return ModelList(data=[self._card(name) for name in self.names])

    async def model(self, model_id: str) -> ModelCard:
        """One served model by its name (OpenAI's models.retrieve)."""
        if model_id not in self.names:
            raise _model_not_found(model_id, self.names)
        return self._card(model_id)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """OpenAI's legacy completions: a prompt or a list of them, `n` choices each."""
        model = self._model_name(body.model)
        self._require_tokenizer("/v1/completions")
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("the prompt is empty: give at least one character or token", "prompt")
        job = _job(body, prompts, _completion_fields(body, self._max_tokens(body.max_tokens)))
        stream = await self.loop.submit(job.prompts, job.params)
        view = CompletionView(self.loop, model, job, body.logprobs, body.echo, body.prompt_logprobs)
        return await self._respond(body, request, stream, view)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI's chat completions over the model's chat template."""
        model = self._model_name(body.model)
        self._require_tokenizer("/v1/chat/completions")
        prompt = await self._chat_token_ids(body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        fields = {"max_new_tokens": self._max_tokens(max_tokens), "logprobs": top}
        job = _job(body, [prompt], fields)
        stream = await self.loop.submit(job.prompts, job.params)
        return await self._respond(body, request, stream, ChatView(self.loop, model, job, top))

    async def _respond(self, body: Any, request: Request, stream: OutputStream, view: View) -> Any:
        if body.stream:
            return EventStreamResponse(self._events(stream, view, body.include_usage))
        finals = await finals_unless_disconnected(stream, request)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return view.response(finals)

    async def _events(
        self, stream: OutputStream, view: View, include_usage: bool
    ) -> AsyncIterator[str]:
        sent = [Sent() for _ in view.job.prompts]
        with closing(stream):
            first = view.first_chunk(len(sent))
            if first is not None:
                yield sse(first)
            async for index, out in stream:
                choice = view.delta(index, out, sent[index])
                if choice is not None:
                    yield sse(view.chunk([choice]))
        if include_usage:
            yield sse(view.chunk([], usage=usage(stream.results, view.job.n)))
        yield SSE_DONE

    def _model_name(self, model: str | None) -> str:
        """The name a response reports. As in SGLang, `model` is not checked while one name
        is served (clients send "default" or anything); with several, it must be one."""
        if model in self.names:
            return model
        if len(self.names) > 1 and model is not None:
            raise _model_not_found(model, self.names)
        return self.names[0]

    def _require_tokenizer(self, route: str) -> None:
        """400 on a model without a tokenizer (dummy weights from a bare config): the OpenAI
        routes answer with text, which such a model cannot write."""
        if self.loop.tokenizer is None:
            raise bad_request(
                f"this model has no tokenizer: {route} answers with text; send token ids to "
                "/generate (input_ids) instead"
            )

    def _max_tokens(self, max_tokens: int | None) -> int:
        # No limit given: the context length bounds the output anyway (the engine stops there).
        return self.loop.info.context_length if max_tokens is None else max_tokens

    async def _chat_token_ids(self, body: ChatCompletionRequest) -> list[int]:
        """The chat's token ids: templated, then tokenized without adding special tokens
        (the template wrote them)."""
        text = await render_chat(self.loop, body.messages, True, body.chat_template_kwargs)
        return await self.loop.with_tokenizer(
            lambda tok: list(tok.encode(text, add_special_tokens=False))
        )


def _model_not_found(model: str, names: tuple[str, ...]) -> APIError:
    served = ", ".join(repr(n) for n in names)
    return APIError(
        404,
        f"model {model!r} is not served here; this server serves {served}",
        "not_found_error",
        param="model",
        code="model_not_found",
    )


def _completion_fields(body: CompletionRequest, max_new_tokens: int) -> dict[str, Any]:
    """Lengths and logprobs of a completion; echo with logprobs needs the prompt's too."""
    fields: dict[str, Any] = {"max_new_tokens": max_new_tokens, "logprobs": body.logprobs}
    wanted = [body.prompt_logprobs]
    if body.echo and body.logprobs is not None:
        wanted.append(body.logprobs)
    asked = [n for n in wanted if n is not None]
    if asked:
        fields.update(prompt_logprobs=max(asked), logprob_start_len=0)
    return fields


def _job(body: Any, prompts: list[Prompt], fields: dict[str, Any]) -> Job:
    """Sampling params for `n` choices per prompt; with a seed, choice i gets seed + i."""
    common = body.sampling_fields()
    params = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        params.append(make_sampling_params(None, **common, **fields, seed=seed))
    return Job([p for p in prompts for _ in range(body.n)], params * len(prompts), body.n)
