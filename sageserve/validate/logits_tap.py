"""Read the logits the engine computes on its normal request path, without changing them.

The offline API returns at most the top-20 logprobs per position; a KL divergence needs the
whole distribution. `LogitsTap` holds an `Engine.logits_hook` for the duration of a `with`
block and keeps a float32 CPU copy of every logits matrix the engine computes.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

import torch

from sageserve.engine.engine import Engine


class LogitsTap:
    """Context manager: `logprobs()` holds every step's logits rows, in step order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._steps: list[torch.Tensor] = []
        self._hook = ExitStack()

    def __enter__(self) -> LogitsTap:
        self._hook.enter_context(self.engine.logits_hook(self._keep))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hook.close()

    def _keep(self, logits: torch.Tensor) -> None:
        """Copy one step's logits [rows, vocab] to the CPU as float32."""
        self._steps.append(logits.detach().float().cpu())

    def logprobs(self) -> torch.Tensor:
        """[rows, vocab] log_softmax of every captured logits row."""
        if not self._steps:
            raise RuntimeError("no engine step ran inside the tap")
        return torch.log_softmax(torch.cat(self._steps), dim=-1)
