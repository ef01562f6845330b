"""A step queued on the device: forward pass and sampling launched, results on their way
to the host.

The overlap schedule keeps one such step in flight: the engine queues step N+1 (its inputs
gather step N's sampled tokens on the device) before it waits for step N's tokens, so the
device never waits for the host between steps. Nothing here waits for the device except
`LaunchedStep.read_back`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sageserve.engine.logprobs import TokenLogprobs
from sageserve.engine.request import Request
from sageserve.engine.sampler import SampledTokens
from sageserve.engine.step_plan import ChunkPlan


class HostCopies:
    """Copies of device tensors in pinned host memory, started without waiting for the
    device; valid once `wait` returns. CPU tensors are kept as they are."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._ready: torch.cuda.Event | None = None
        self._tensors = tensors
        if any(t.device.type == "cuda" for t in tensors):
            self._tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, device in zip(self._tensors, tensors, strict=True):
                host.copy_(device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, after the copies have landed."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._tensors


def _parts(lp: TokenLogprobs) -> list[torch.Tensor]:
    return [lp.chosen, lp.top_ids, lp.top_logprobs]


@dataclass
class StepValues:
    """A launched step's results on the host.

    token_ids: one per sampled request; logprobs: of those tokens (None if no row asked);
    prompt_logprobs: one per plan of `LaunchedStep.prompt_plans`.
    """

    token_ids: list[int]
    logprobs: TokenLogprobs | None
    prompt_logprobs: list[TokenLogprobs]


@dataclass
class LaunchedStep:
    """One step's plans and its results in flight.

    sampled[i] is the request whose token is row i of `sampled_tokens` ([S] int64 on the
    device, None when nothing was sampled); prompt_plans[j] has prompt logprobs
    prompt_logprobs[j] (device).
    """

    plans: list[ChunkPlan]
    sampled: list[Request]
    sampled_tokens: SampledTokens | None
    prompt_plans: list[ChunkPlan]
    prompt_logprobs: list[TokenLogprobs]
    _copies: HostCopies = field(init=False)
    _rows: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = {id(req): i for i, req in enumerate(self.sampled)}
        tensors = [t for lp in self.prompt_logprobs for t in _parts(lp)]
        if self.sampled_tokens is not None:
            tensors.append(self.sampled_tokens.token_ids)
            if self.sampled_tokens.logprobs is not None:
                tensors.extend(_parts(self.sampled_tokens.logprobs))
        self._copies = HostCopies(tensors)

    @property
    def token_ids(self) -> torch.Tensor:
        """[S] int64 on the device: the sampled tokens, for the next step's inputs."""
        assert self.sampled_tokens is not None, "this step sampled nothing"
        return self.sampled_tokens.token_ids

    def row_of(self, req: Request) -> int:
        """The row of `token_ids` that holds req's token (KeyError if req did not sample)."""
        return self._rows[id(req)]

    @property
    def needs_values_before_next(self) -> bool:
        """True when a request that sampled here has penalties: they count the values of
        its tokens, so its next step must wait for this one's read-back."""
        return any(r.params.has_penalties and not r.is_finished for r in self.sampled)

    def read_back(self) -> StepValues:
        """Wait for the step's results and return them on the host."""
        host = self._copies.wait()
        prompt = [TokenLogprobs(*host[3 * j : 3 * j + 3]) for j in range(len(self.prompt_plans))]
        rest = host[3 * len(self.prompt_plans) :]
        token_ids = rest[0].tolist() if rest else []
        logprobs = TokenLogprobs(*rest[1:4]) if len(rest) == 4 else None
        return StepValues(token_ids, logprobs, prompt)
