"""Engine outputs as OpenAI's responses and stream chunks, for completions and chat."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.server.engine_loop import EngineLoop, Prompt, streamable_text
from sageserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprob,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class Job:
    """One OpenAI request as engine requests: `n` per prompt, choice i = prompt i // n."""

    prompts: list[Prompt]
    params: list[SamplingParams]
    n: int


@dataclass
class Sent:
    """How much of one choice a stream has sent."""

    chars: int = 0
    tokens: int = 0
    started: bool = False  # the first chunk (which carries an echo) has gone
    echo_chars: int = 0  # characters of echoed prompt before the generated text


def usage(finals: Sequence[RequestOutput], n: int) -> Usage:
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


def _concat(
    echoed: CompletionLogprobs, rest: CompletionLogprobs | None, shift: int
) -> CompletionLogprobs:
    """The prompt's logprobs, then the output's (its text offsets moved past the prompt)."""
    if rest is None:
        return echoed
    top = None
    if echoed.top_logprobs is not None:
        top = echoed.top_logprobs + (rest.top_logprobs or [])
    return CompletionLogprobs(
        tokens=echoed.tokens + rest.tokens,
        token_logprobs=echoed.token_logprobs + rest.token_logprobs,
        top_logprobs=top,
        text_offset=echoed.text_offset + [o + shift for o in rest.text_offset],
    )


class View(ABC):
    """Formatting shared by both APIs' responses and stream chunks.

    model: the name the response reports; top_n: logprobs asked per token (None: off).
    """

    prefix: ClassVar[str]

    def __init__(self, loop: EngineLoop, model: str, job: Job, top_n: int | None) -> None:
        self.loop = loop
        self.model = model
        self.job = job
        self.top_n = top_n
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def delta(self, index: int, out: RequestOutput, sent: Sent) -> BaseModel | None:
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

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        """The non-streamed response."""
        choices = [self.choice(i, out) for i, out in enumerate(finals)]
        return self.response_type(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(finals, self.job.n),
        )

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        """One stream chunk (usage only on the last one, when asked for)."""
        chunk = self.chunk_type(id=self.id, created=self.created, model=self.model, choices=choices)
        if usage is not None:
            chunk.usage = usage
        return chunk

    response_type: ClassVar[type[BaseModel]]
    chunk_type: ClassVar[type[BaseModel]]

    @abstractmethod
    def choice(self, index: int, out: RequestOutput) -> BaseModel:
        """A finished choice of a non-streamed response."""

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


class CompletionView(View):
    """/v1/completions: legacy logprobs; echo puts the prompt (and its logprobs) first;
    prompt_logprobs adds vLLM's per-prompt-token dicts."""

    prefix = "cmpl"
    response_type = CompletionResponse
    chunk_type = CompletionResponse

    def __init__(
        self,
        loop: EngineLoop,
        model: str,
        job: Job,
        top_n: int | None,
        echo: bool = False,
        prompt_top_n: int | None = None,
    ) -> None:
        super().__init__(loop, model, job, top_n)
        self.echo = echo
        self.prompt_top_n = prompt_top_n

    def choice(self, index: int, out: RequestOutput) -> CompletionChoice:
        logprobs = None
        if self.top_n is not None:
            logprobs = self.logprobs(out.token_ids, out.logprobs or [], 0)
        choice = CompletionChoice(
            index=index, text=out.text, logprobs=logprobs, finish_reason=_finish_reason(out)
        )
        return self._with_prompt(choice, index, out)

    def delta(self, index: int, out: RequestOutput, sent: Sent) -> BaseModel | None:
        """As View.delta; a choice's first chunk also carries the echo and prompt logprobs,
        and later chunks' text offsets count the echoed prompt."""
        choice = super().delta(index, out, sent)
        if sent.started:
            if choice is not None and choice.logprobs is not None:  # type: ignore[attr-defined]
                offsets = choice.logprobs.text_offset  # type: ignore[attr-defined]
                offsets[:] = [o + sent.echo_chars for o in offsets]
            return choice
        sent.started = True
        if self.echo:
            sent.echo_chars = len(self._prompt_text(index, out))
        first = choice if choice is not None else self.chunk_choice(index, "", None, None)
        return self._with_prompt(first, index, out)  # type: ignore[arg-type]

    def chunk_choice(
        self, index: int, text: str, logprobs: Any, finish_reason: str | None
    ) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason
        )

    def logprobs(
        self, token_ids: list[int], entries: Sequence[dict[int, float] | None], offset: int
    ) -> CompletionLogprobs:
        """OpenAI's legacy format: token texts, their logprobs, top-N dicts, text offsets.

        A None entry (the first prompt token: nothing predicts it) gives null logprobs.
        """
        texts = [self.loop.token_text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        pairs = list(zip(token_ids, entries, strict=False))
        top = [None if d is None else self._top_texts(d) for _, d in pairs]
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[None if d is None else d[t] for t, d in pairs],
            top_logprobs=top if self.top_n else None,
            text_offset=offsets,
        )

    def _top_texts(self, logprobs: dict[int, float]) -> dict[str, float]:
        return {self.loop.token_text(t): lp for t, lp in _top(logprobs, self.top_n or 0)}

    def _with_prompt(
        self, choice: CompletionChoice, index: int, out: RequestOutput
    ) -> CompletionChoice:
        """`choice` with vLLM's prompt_logprobs and the echoed prompt (text, then logprobs
        when asked for) before its own, as the request asked."""
        if self.prompt_top_n is not None:
            choice.prompt_logprobs = self._vllm_prompt_logprobs(out)
        if not self.echo:
            return choice
        prompt_text = self._prompt_text(index, out)
        choice.text = prompt_text + choice.text
        if self.top_n is not None:
            ids = out.prompt_token_ids
            echoed = self.logprobs(ids, out.prompt_logprobs or [None] * len(ids), 0)
            choice.logprobs = _concat(echoed, choice.logprobs, len(prompt_text))
        return choice

    def _prompt_text(self, index: int, out: RequestOutput) -> str:
        prompt = self.job.prompts[index]
        if isinstance(prompt, str):
            return prompt
        return self.loop.tokenizer.decode(list(prompt))

    def _vllm_prompt_logprobs(self, out: RequestOutput) -> list[dict[str, PromptLogprob] | None]:
        entries = out.prompt_logprobs or [None] * out.num_prompt_tokens
        return [
            None if d is None else self._ranked(d, token_id)
            for token_id, d in zip(out.prompt_token_ids, entries, strict=True)
        ]

    def _ranked(self, logprobs: dict[int, float], token_id: int) -> dict[str, PromptLogprob]:
        best = _top(logprobs, self.prompt_top_n or 0)
        ranks = {t: r for r, (t, _) in enumerate(best, start=1)}
        kept = dict(best) | {token_id: logprobs[token_id]}
        text = self.loop.token_text
        return {
            str(t): PromptLogprob(logprob=lp, rank=ranks.get(t), decoded_token=text(t))
            for t, lp in kept.items()
        }


class ChatView(View):
    prefix = "chatcmpl"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

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
        self, token_ids: list[int], entries: Sequence[dict[int, float] | None], offset: int
    ) -> ChatLogprobs:
        """OpenAI's chat format: per token its text, logprob, raw bytes and top-N."""
        content = []
        for t, d in zip(token_ids, entries, strict=False):
            assert d is not None  # output tokens always have logprobs
            top = [self._top_logprob(u, lp) for u, lp in _top(d, self.top_n or 0)]
            base = self._top_logprob(t, d[t])
            content.append(TokenLogprob(**base.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.loop.token_bytes(token_id)
        return TopLogprob(token=self.loop.token_text(token_id), logprob=logprob, bytes=list(raw))
