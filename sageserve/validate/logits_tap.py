"""Read the logits the engine computes on its normal request path, without changing them.

The offline API returns at most the top-20 logprobs per position; a KL divergence needs the
whole distribution. `LogitsTap` wraps the model runner's `forward` for the duration of a
`with` block and keeps a float32 CPU copy of every logits matrix it returns.
"""

from __future__ import annotations

from types import TracebackType

import torch

from sageserve.engine.engine import Engine


class LogitsTap:
    """Context manager: `rows()` is the concatenation of every step's logits, in step order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._steps: list[torch.Tensor] = []

    def __enter__(self) -> LogitsTap:
        runner = self.engine.runner
        original = runner.forward

        def tapped(batch):  # the runner's signature: ForwardBatch -> logits
            logits = original(batch)
            self._steps.append(logits.detach().float().cpu())
            return logits

        # NOTE: an instance attribute shadows the class method; __exit__ deletes it again.
        runner.forward = tapped
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del self.engine.runner.forward

    def logprobs(self) -> torch.Tensor:
        """[rows, vocab] log_softmax of every captured logits row."""
        if not self._steps:
            raise RuntimeError("no engine step ran inside the tap")
        return torch.log_softmax(torch.cat(self._steps), dim=-1)
