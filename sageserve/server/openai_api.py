"""OpenAI's routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, ClassVar

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.server.args import ServerArgs
from sageserve.server.disconnect import CLIENT_CLOSED_REQUEST, finals_unless_disconnected
from sageserve.server.engine_loop import EngineLoop, OutputStream, Prompt, streamable_text
from sageserve.server.protocol import (
    SSE_DONE,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EventStreamResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
    bad_request,
    make_sampling_params,
    sse,
)


@dataclass
class _Job:
    """One OpenAI request as engine requests: `n` per prompt, choice i = prompt i // n."""

    prompts: list[Prompt]
    params: list[SamplingParams]
    n: int


def build_router(engine_loop: EngineLoop, server_args: ServerArgs) -> APIRouter:
    """The OpenAI-compatible routes over `engine_loop`."""
    router = APIRouter(prefix="/v1")
    api = _OpenAI(engine_loop, server_args)
    router.add_api_route("/models", api.models, methods=["GET"], response_model=ModelList)
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
    """The handlers; they share the engine loop, the served name and the formatting."""

    def __init__(self, engine_loop: EngineLoop, server_args: ServerArgs) -> None:
        self.loop = engine_loop
        self.model = server_args.served_model_name
        self.created = int(time.time())

    async def models(self) -> ModelList:
        card = ModelCard(
            id=self.model, created=self.created, max_model_len=self.loop.info.context_length
        )
        return ModelList(data=[card])

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """OpenAI's legacy completions: a prompt or a list of them, `n` choices each."""
        self._check_model(body.model)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("the prompt is empty: give at least one character or token", "prompt")
        fields = {"max_new_tokens": self._max_tokens(body.max_tokens), "logprobs": body.logprobs}
        job = _job(body, prompts, fields)
        stream = await self.loop.submit(job.prompts, job.params)
        view = _CompletionView(self, job, body.logprobs)
        return await self._respond(body, request, stream, job, view)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI's chat completions over the model's chat template."""
        self._check_model(body.model)
        prompt = await self._apply_chat_template(body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        fields = {"max_new_tokens": self._max_tokens(max_tokens), "logprobs": top}
        job = _job(body, [prompt], fields)
        stream = await self.loop.submit(job.prompts, job.params)
        view = _ChatView(self, job, top)
        return await self._respond(body, request, stream, job, view)

    async def _respond(
        self, body: Any, request: Request, stream: OutputStream, job: _Job, view: _View
    ) -> Any:
        if body.stream:
            return EventStreamResponse(self._events(stream, job, view, body.include_usage))
        finals = await finals_unless_disconnected(stream, request)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return view.response([view.choice(i, out) for i, out in enumerate(finals)], finals)

    async def _events(
        self, stream: OutputStream, job: _Job, view: _View, include_usage: bool
    ) -> AsyncIterator[str]:
        sent = [_Sent() for _ in job.prompts]
        with closing(stream):
            first = view.first_chunk(len(sent))
            if first is not None:
                yield sse(first)
            async for index, out in stream:
                choice = view.delta(index, out, sent[index])
                if choice is not None:
                    yield sse(view.chunk([choice]))
        if include_usage:
            yield sse(view.chunk([], usage=_usage(stream.results, job.n)))
        yield SSE_DONE

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise APIError(
                400,
                f"model {model!r} is not served here; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    def _max_tokens(self, max_tokens: int | None) -> int:
        # No limit given: the context length bounds the output anyway (the engine stops there).
        return self.loop.info.context_length if max_tokens is None else max_tokens

    async def _apply_chat_template(self, body: ChatCompletionRequest) -> list[int]:
        """The chat's token ids, templated and tokenized off the event loop."""
        tokenizer = self.loop.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        self.loop.limits.check_chars(_message_texts(messages), "the chat")
        try:
            return await self.loop.with_tokenizer(lambda tok: _chat_token_ids(tok, messages))
        except jinja2.TemplateError as err:
            message = f"the chat template rejected the messages: {err}"
            raise bad_request(message, "messages") from err


def _chat_token_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _message_texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every string in the messages (contents, names, parts), for the character limit."""
    texts: list[str] = []
    stack: list[Any] = list(messages)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return texts


def _job(body: Any, prompts: list[Prompt], fields: dict[str, Any]) -> _Job:
    """Sampling params for `n` choices per prompt; with a seed, choice i gets seed + i."""
    common = {
        name: getattr(body, name)
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty")
        if getattr(body, name) is not None
    }
    if body.ignore_eos:
        common["ignore_eos"] = True
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    params = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i
        params.append(make_sampling_params(None, **common, **fields, stop=stop, seed=seed))
    return _Job([p for p in prompts for _ in range(body.n)], params * len(prompts), body.n)


@dataclass
class _Sent:
    """How much of one choice a stream has sent."""

    chars: int = 0
    tokens: int = 0
    finished: bool = False


def _usage(finals: Sequence[RequestOutput], n: int) -> Usage:
    # The n choices of one prompt share it: count its tokens once.
    firsts = finals[::n]
    prompt = sum(out.num_prompt_tokens for out in firsts)
    completion = sum(out.num_completion_tokens for out in finals)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(out.num_cached_tokens for out in firsts)
        ),
    )


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: kv[1], reverse=True)[:n]


class _View(ABC):
    """Formatting shared by both APIs' responses and stream chunks."""

    def __init__(self, api: _OpenAI, job: _Job, top_n: int | None) -> None:
        self.api = api
        self.job = job
        self.top_n = top_n
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    prefix: ClassVar[str]

    def text_of(self, token_id: int) -> str:
        return self.api.loop.token_text(token_id)

    def delta(self, index: int, out: RequestOutput, sent: _Sent) -> BaseModel | None:
        """The chunk choice carrying what `out` adds to what was sent; None if nothing."""
        text = streamable_text(out, self.job.params[index].stop)
        new_text, new_tokens = text[sent.chars :], out.token_ids[sent.tokens :]
        if not new_text and not out.finished:
            return None
        logprobs = None
        if self.top_n is not None:
            entries = (out.logprobs or [])[sent.tokens :]
            logprobs = self.logprobs(new_tokens, entries, sent.chars)
        sent.chars, sent.tokens = len(text), out.num_completion_tokens
        return self.chunk_choice(index, new_text, logprobs, _finish_reason(out))

    def first_chunk(self, num_choices: int) -> BaseModel | None:
        """What a stream sends before any text (None: nothing)."""
        return None

    @abstractmethod
    def choice(self, index: int, out: RequestOutput) -> BaseModel:
        """A finished choice of a non-streamed response."""

    @abstractmethod
    def response(self, choices: list[Any], finals: list[RequestOutput]) -> BaseModel:
        """The non-streamed response."""

    @abstractmethod
    def chunk(self, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        """One stream chunk."""

    @abstractmethod
    def chunk_choice(
        self, index: int, text: str, logprobs: Any, finish_reason: str | None
    ) -> BaseModel:
        """A stream chunk's choice carrying new text."""

    @abstractmethod
    def logprobs(
        self, token_ids: list[int], entries: list[dict[int, float]], offset: int
    ) -> BaseModel:
        """Logprobs of `token_ids`, whose text starts at character `offset` of the choice."""


class _CompletionView(_View):
    prefix = "cmpl"

    def choice(self, index: int, out: RequestOutput) -> CompletionChoice:
        logprobs = None
        if self.top_n is not None:
            logprobs = self.logprobs(out.token_ids, out.logprobs or [], 0)
        return CompletionChoice(
            index=index, text=out.text, logprobs=logprobs, finish_reason=_finish_reason(out)
        )

    def response(
        self, choices: list[CompletionChoice], finals: list[RequestOutput]
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.api.model,
            choices=choices,
            usage=_usage(finals, self.job.n),
        )

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        chunk = CompletionResponse(
            id=self.id, created=self.created, model=self.api.model, choices=choices
        )
        if usage is not None:
            chunk.usage = usage
        return chunk

    def chunk_choice(
        self, index: int, text: str, logprobs: Any, finish_reason: str | None
    ) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason
        )

    def logprobs(
        self, token_ids: list[int], entries: list[dict[int, float]], offset: int
    ) -> CompletionLogprobs:
        """OpenAI's legacy format: token texts, their logprobs, top-N dicts, text offsets."""
        texts = [self.text_of(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top = [{self.text_of(t): lp for t, lp in _top(d, self.top_n or 0)} for d in entries]
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[d[t] for t, d in zip(token_ids, entries, strict=False)],
            top_logprobs=top if self.top_n else None,
            text_offset=offsets,
        )


class _ChatView(_View):
    prefix = "chatcmpl"

    def choice(self, index: int, out: RequestOutput) -> ChatChoice:
        logprobs = None
        if self.top_n is not None:
            logprobs = self.logprobs(out.token_ids, out.logprobs or [], 0)
        return ChatChoice(
            index=index,
            message=ChatResponseMessage(content=out.text),
            logprobs=logprobs,
            finish_reason=_finish_reason(out),
        )

    def response(
        self, choices: list[ChatChoice], finals: list[RequestOutput]
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.api.model,
            choices=choices,
            usage=_usage(finals, self.job.n),
        )

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> BaseModel:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.api.model, choices=choices
        )
        if usage is not None:
            chunk.usage = usage
        return chunk

    def first_chunk(self, num_choices: int) -> BaseModel:
        """OpenAI's chat streams open with the role, content empty."""
        delta = ChatDelta(role="assistant", content="")
        choices = [
            ChatChunkChoice(index=i, delta=delta, logprobs=None, finish_reason=None)
            for i in range(num_choices)
        ]
        return self.chunk(choices)

    def chunk_choice(
        self, index: int, text: str, logprobs: Any, finish_reason: str | None
    ) -> ChatChunkChoice:
        delta = ChatDelta(content=text) if text else ChatDelta()
        return ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
        )

    def logprobs(
        self, token_ids: list[int], entries: list[dict[int, float]], offset: int
    ) -> ChatLogprobs:
        """OpenAI's chat format: per token its text, logprob, UTF-8 bytes and top-N."""
        content = []
        for t, d in zip(token_ids, entries, strict=False):
            top = [self._top_logprob(u, lp) for u, lp in _top(d, self.top_n or 0)]
            base = self._top_logprob(t, d[t])
            content.append(TokenLogprob(**base.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text_of(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))
