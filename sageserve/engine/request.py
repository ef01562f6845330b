"""A request's life inside the engine, and what it hands back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from sageserve.engine.detokenizer import IncrementalDetokenizer
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.stop import StopChecker


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated.

    ```
    tokens:  | prompt | generated | pending |
             0   num_computed_tokens          num_tokens
                 (K/V in the cache)   (still to be fed to the model)
    ```
    token_ids holds the tokens whose values the host knows. With the overlap schedule, the
    token a queued step sampled is still on the device: it counts in num_tokens (the
    scheduler plans the next step with it) as one of num_pending_tokens, and joins
    token_ids when the step is read back. After a preemption, num_computed_tokens drops to 0
    and the pages are released: the request is recomputed from its tokens (prefix-cache hits
    make that cheap).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    prompt: str | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stop_checker: StopChecker | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # The request ends with finish reason "length" at this many tokens: the prompt plus
    # max_new_tokens, or fewer when the context length is shorter (None: no context cap).
    token_limit: int | None = None
    # True: an output at every step that advances the request (a streaming consumer, or
    # metrics that follow each token); False: only the final output.
    stream: bool = True

    token_ids: list[int] = field(init=False)
    num_pending_tokens: int = 0
    num_computed_tokens: int = 0
    page_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finish_message: str | None = None  # why, when the reason alone does not say
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    text: str = ""
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        prompt_and_output = len(self.prompt_token_ids) + self.params.max_new_tokens
        self.token_limit = min(self.token_limit or prompt_and_output, prompt_and_output)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, pending ones included (the scheduler's view)."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens whose values are known (pending ones excluded)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far, pending ones included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def awaits_last_token(self) -> bool:
        """True when the pending token is the last one the request can have: nothing is
        left to compute, its step's read-back ends the request."""
        return self.num_pending_tokens > 0 and self.num_tokens >= self.token_limit

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prompt_logprob_start(self) -> int:
        """First prompt position whose logprob is returned (position 0 never has one)."""
        return max(1, self.params.logprob_start_len)

    @property
    def max_cacheable_prefix(self) -> int:
        """How many leading tokens may come from the prefix cache.

        The last token is always recomputed (its logits are needed), and prompt logprobs
        need the hidden state of every position from prompt_logprob_start - 1 on.
        """
        limit = self.num_tokens - 1
        if self.prompt_logprobs is not None and self.num_output_tokens == 0:
            limit = min(limit, self.prompt_logprob_start - 1)
        return limit


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic) of one request."""

    arrival_time: float
    first_token_time: float | None
    finished_time: float | None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """A snapshot of a request: its whole output so far, and whether it has finished.

    logprobs: one {token_id: logprob} dict per generated token (the top-N plus the chosen
    token), from the model's raw distribution (before temperature and penalties).
    prompt_logprobs: one per prompt position; None at position 0 and before the start.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # the request's own list, shared by its outputs: read only
    text: str
    token_ids: list[int]  # generated so far (a copy)
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[dict[int, float] | None] | None
    num_cached_tokens: int
    metrics: RequestMetrics
    finish_message: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_request(cls, req: Request) -> RequestOutput:
        return cls(
            request_id=req.request_id,
            prompt=req.prompt,
            # Shared, not copied: the request never changes it, and copying a long prompt
            # for every request at every step cost milliseconds per step at batch 64.
            prompt_token_ids=req.prompt_token_ids,
            text=req.text,
            token_ids=list(req.output_token_ids),
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
            prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs else None,
            num_cached_tokens=req.num_cached_tokens,
            metrics=RequestMetrics(req.arrival_time, req.first_token_time, req.finished_time),
            finish_message=req.finish_message,
        )
