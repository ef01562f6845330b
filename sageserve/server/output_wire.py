"""RequestOutputs across a process boundary, as what changed since the last one sent.

A RequestOutput is a cumulative snapshot: sent whole at every step, a request's prompt,
tokens, text and logprobs would cross the pipe again and again (quadratic in its length).
The engine's process encodes each output as its request's new tail (`OutputDelta`); the
server's process keeps each request's accumulated state and rebuilds the same snapshot.

Each tail carries the offset it starts at, so a part that was not only appended to (the
text, cut back where a stop string begins) is sent again from where it diverges: decoding
what was encoded is exact, whatever changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sageserve.engine.request import RequestMetrics, RequestOutput

Logprobs = list[dict[int, float]]
PromptLogprobs = list[dict[int, float] | None]


class OutputDelta(NamedTuple):
    """One RequestOutput as its change since the request's previous delta (a NamedTuple:
    it pickles without its field names, a third of a dataclass's bytes)."""

    request_id: str
    prompt: str | None  # first delta only (None after)
    prompt_token_ids: list[int] | None  # first delta only
    text_start: int
    text_tail: str
    token_start: int
    token_tail: list[int]
    logprob_start: int
    logprob_tail: Logprobs | None  # None: the request returns no logprobs
    prompt_logprobs: PromptLogprobs | None
    prompt_logprobs_sent: bool  # False: unchanged since the previous delta
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_cached_tokens: int
    times: tuple[float, float | None, float | None]  # RequestMetrics' fields
    finish_message: str | None


@dataclass(slots=True)
class _Sent:
    """What the decoder already holds of one request."""

    text: str = ""
    tokens: int = 0
    logprobs: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    first: bool = True


class OutputEncoder:
    """The engine's side: RequestOutputs to OutputDeltas (one encoder per pipe)."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, outputs: list[RequestOutput]) -> list[OutputDelta]:
        return [self._encode(out) for out in outputs]

    def forget(self, request_ids: list[str]) -> None:
        """Drop requests that ended without a finished output (a failed step)."""
        for rid in request_ids:
            self._sent.pop(rid, None)

    def _encode(self, out: RequestOutput) -> OutputDelta:
        sent = self._sent.pop(out.request_id, None) or _Sent()
        text_start = len(sent.text) if out.text.startswith(sent.text) else 0
        token_start = min(sent.tokens, len(out.token_ids))
        logprobs = out.logprobs
        logprob_start = min(sent.logprobs, len(logprobs)) if logprobs is not None else 0
        new_prompt_logprobs = out.prompt_logprobs != sent.prompt_logprobs
        m = out.metrics
        delta = OutputDelta(
            request_id=out.request_id,
            prompt=out.prompt if sent.first else None,
            prompt_token_ids=out.prompt_token_ids if sent.first else None,
            text_start=text_start,
            text_tail=out.text[text_start:],
            token_start=token_start,
            token_tail=out.token_ids[token_start:],
            logprob_start=logprob_start,
            logprob_tail=logprobs[logprob_start:] if logprobs is not None else None,
            prompt_logprobs=out.prompt_logprobs if new_prompt_logprobs else None,
            prompt_logprobs_sent=new_prompt_logprobs,
            finished=out.finished,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            num_cached_tokens=out.num_cached_tokens,
            times=(m.arrival_time, m.first_token_time, m.finished_time),
            finish_message=out.finish_message,
        )
        if not out.finished:
            logprobs_held = len(logprobs) if logprobs is not None else 0
            self._sent[out.request_id] = _Sent(
                out.text, len(out.token_ids), logprobs_held, out.prompt_logprobs, first=False
            )
        return delta


@dataclass(slots=True)
class _Held:
    """One request's state on the decoder's side."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] | None = None
    logprobs: Logprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None


class OutputDecoder:
    """The server's side: OutputDeltas back to the RequestOutputs they were encoded from."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def decode(self, deltas: list[OutputDelta]) -> list[RequestOutput]:
        return [self._decode(delta) for delta in deltas]

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._held.pop(rid, None)

    def _decode(self, delta: OutputDelta) -> RequestOutput:
        held = self._held.get(delta.request_id)
        if held is None:
            assert delta.prompt_token_ids is not None, f"{delta.request_id}: no first delta"
            held = _Held(delta.prompt, delta.prompt_token_ids, token_ids=[])
            self._held[delta.request_id] = held
        held.text = held.text[: delta.text_start] + delta.text_tail
        held.token_ids = _spliced(held.token_ids or [], delta.token_start, delta.token_tail)
        if delta.logprob_tail is not None:
            held.logprobs = _spliced(held.logprobs or [], delta.logprob_start, delta.logprob_tail)
        if delta.prompt_logprobs_sent:
            held.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            del self._held[delta.request_id]
        return _output(held, delta)


def _spliced(held: list, start: int, tail: list) -> list:
    """`held[:start] + tail`, in place when the tail only appends (the common case)."""
    if start != len(held):
        del held[start:]
    held.extend(tail)
    return held


def _output(held: _Held, delta: OutputDelta) -> RequestOutput:
    return RequestOutput(
        request_id=delta.request_id,
        prompt=held.prompt,
        prompt_token_ids=held.prompt_token_ids,
        text=held.text,
        token_ids=list(held.token_ids or ()),
        finished=delta.finished,
        finish_reason=delta.finish_reason,
        stop_reason=delta.stop_reason,
        logprobs=list(held.logprobs) if held.logprobs is not None else None,
        prompt_logprobs=list(held.prompt_logprobs) if held.prompt_logprobs else None,
        num_cached_tokens=delta.num_cached_tokens,
        metrics=RequestMetrics(*delta.times),
        finish_message=delta.finish_message,
    )
