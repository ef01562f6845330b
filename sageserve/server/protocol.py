"""What travels on the wire: request and response models, the error body, SSE framing.

Request models are strict about the fields they declare (no "5" for 5, no true for 1) and
ignore unknown ones, except those that ask for something unsupported (see request_model).
Ranges are checked by SamplingParams, once, not repeated here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from starlette.responses import JSONResponse, StreamingResponse

from sageserve.engine.sampling_params import SamplingParams
from sageserve.server.chat_messages import ChatMessage
from sageserve.server.errors import EngineDeadError, RequestFailedError
from sageserve.server.request_model import RequestModel


class _OmitNone(BaseModel):
    """A response model whose fields named in `omit_if_none` are left out when None.

    For fields that only exist in some responses (logprobs asked for, a batch's index),
    while other None fields (an unfinished request's finish_reason) stay as null.
    """

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.omit_if_none}


# ------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error the client gets as an OpenAI-style body with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.body = ErrorResponse(error=detail)
        self.headers = dict(headers or {})


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(err: APIError) -> JSONResponse:
    """The response that carries `err`: its status, headers and OpenAI-style body."""
    return JSONResponse(err.body.model_dump(), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def make_sampling_params(param: str | None = None, **kwargs: Any) -> SamplingParams:
    """SamplingParams(**kwargs), its ValueError turned into a 400 naming the problem."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        raise bad_request(str(err), param) from err


# ------------------------------------------------------------------------ SSE framing


def sse(data: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json()
    elif not isinstance(data, str):
        data = json.dumps(data)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that always closes its body iterator.

    Starlette stops iterating when the client disconnects, but leaves the iterator to the
    garbage collector; closing it here runs its `finally` (which aborts the request) now.
    A server-side failure after the stream has begun (its 200 is sent) ends it with an
    event carrying the OpenAI-style error body, then [DONE].
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(_ending_with_error_event(events))

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _ending_with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except (RequestFailedError, EngineDeadError) as err:
        dead = isinstance(err, EngineDeadError)
        code = "engine_dead" if dead else "engine_error"
        error = APIError(503 if dead else 500, str(err), "server_error", code=code)
        yield sse(error.body)
        yield SSE_DONE
    finally:
        await events.aclose()  # type: ignore[attr-defined]


# --------------------------------------------------------------------- SGLang /generate


class GenerateSamplingParams(RequestModel):
    """SGLang's `sampling_params`; null or absent fields take SamplingParams' defaults.

    n: parallel samples per prompt (SGLang's name); with a seed, sample j uses seed + j.
    spaces_between_special_tokens: accepted; fast tokenizers (every model this server loads)
    never insert such spaces, for either value, as in SGLang and vLLM.
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = Field(None, ge=1, le=64)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, validation_alias=AliasChoices("seed", "sampling_seed"))

    def engine_fields(self) -> dict[str, Any]:
        """The fields SamplingParams takes, nulls left out (n is the caller's to expand)."""
        # Declared fields only: model_dump would include the ignored unknown ones too.
        declared = set(type(self).model_fields) - {"n", "spaces_between_special_tokens"}
        fields = self.model_dump(include=declared, exclude_none=True)
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        return fields


class GenerateRequest(RequestModel):
    """SGLang's /generate body: one prompt or a batch (a list of texts or of id lists)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSamplingParams | list[GenerateSamplingParams] = Field(
        default_factory=GenerateSamplingParams
    )
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        return self

    @property
    def is_batch(self) -> bool:
        prompts = self.text if self.text is not None else self.input_ids
        return isinstance(prompts, list) and (
            self.text is not None or (bool(prompts) and isinstance(prompts[0], list))
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (one entry when not a batch)."""
        prompts: Any = self.text if self.text is not None else self.input_ids
        return list(prompts) if self.is_batch else [prompts]


FinishType = Literal["stop", "length", "abort"]


class FinishReason(_OmitNone):
    """matched: the stop string or token id; message: why, when the type alone does not say
    (e.g. "length" because the KV cache pool is full)."""

    omit_if_none = ("matched", "message")

    type: FinishType
    matched: str | int | None = None
    message: str | None = None


# [logprob, token_id, text]; logprob is null at prompt position 0, text unless asked for.
LogprobEntry = tuple[float | None, int, str | None]


class MetaInfo(_OmitNone):
    omit_if_none = (
        "input_token_logprobs",
        "output_token_logprobs",
        "input_top_logprobs",
        "output_top_logprobs",
    )

    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    e2e_latency: float | None
    input_token_logprobs: list[LogprobEntry] | None = None
    output_token_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    output_top_logprobs: list[list[LogprobEntry] | None] | None = None


class GenerateResponse(_OmitNone):
    omit_if_none = ("index",)

    text: str
    output_ids: list[int]
    meta_info: MetaInfo
    index: int | None = None  # set on a batch's stream chunks: which prompt this is


class AbortRequest(RequestModel):
    rid: str


# ------------------------------------------------------------------- OpenAI requests


class StreamOptions(RequestModel):
    include_usage: bool = False


class _OpenAIRequest(RequestModel):
    """Fields /v1/completions and /v1/chat/completions share, with the sampling extensions
    of SGLang and vLLM (top_k, min_p, repetition_penalty, min_tokens, ...)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # generate through EOS
    skip_special_tokens: bool | None = None
    # Accepted; fast tokenizers never insert such spaces (see GenerateSamplingParams).
    spaces_between_special_tokens: bool | None = None
    user: str | None = None  # accepted for compatibility; it changes nothing

    @model_validator(mode="after")
    def _usage_needs_stream(self) -> _OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_fields(self) -> dict[str, Any]:
        """SamplingParams' fields this body sets (its n, seed and lengths aside)."""
        same = (
            "temperature top_p top_k min_p frequency_penalty presence_penalty "
            "repetition_penalty logit_bias stop_token_ids skip_special_tokens"
        )
        fields = {k: getattr(self, k) for k in same.split() if getattr(self, k) is not None}
        if self.min_tokens is not None:
            fields["min_new_tokens"] = self.min_tokens
        if self.ignore_eos:
            fields["ignore_eos"] = True
        fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return fields


class CompletionRequest(_OpenAIRequest):
    """OpenAI's legacy completions, with vLLM's `prompt_logprobs` (top-N per prompt token).

    echo: the choice's text (and logprobs) start with the prompt's; the first prompt token
    has no logprob (null), as in OpenAI's and vLLM's responses.
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p: Any = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatCompletionRequest(_OpenAIRequest):
    """OpenAI's chat completions; `chat_template_kwargs` go to the template (SGLang, vLLM)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


# ------------------------------------------------------------------ OpenAI responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs; with echo, the first prompt token's entries are null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's Logprob: rank is 1 for the most likely token; null when the token is not among
    the top-N asked for (the engine ranks only those)."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(_OmitNone):
    omit_if_none = ("prompt_logprobs",)

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # vLLM's: per prompt position {token id: PromptLogprob}; null at position 0.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatDelta(_OmitNone):
    omit_if_none = ("role", "content")

    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "sageserve"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
