"""Where one `Engine.step()` call's time went: for the server's step metrics (issue 16).

A decode's inter-token latency is the time between the engine steps that carry it. When a
long one comes, the question is whose it is: the device's (the call waited for the step in
flight to finish) or the host's (planning, launching, eager kernel launches of a mixed step,
the outputs; or the interpreter lock held by the HTTP side). `StepTiming` splits the call's
wall time into the two, and names the kind of step it launched.
"""

from __future__ import annotations

from dataclasses import dataclass

from sageserve.engine.scheduler import ScheduledChunk

STEP_KINDS = ("decode", "mixed", "prefill", "none")


@dataclass(frozen=True)
class StepTiming:
    """One `Engine.step()` call.

    prefill_tokens / decode_rows: prompt tokens and one-token decodes of the step it
    launched (both 0 when it launched none, e.g. the last read-back). wall_s: the call's
    wall time; device_wait_s: the part spent blocked until a launched step's results reached
    the host (on CPU, where a step runs while it is launched, ~0).
    """

    prefill_tokens: int
    decode_rows: int
    wall_s: float
    device_wait_s: float

    @property
    def kind(self) -> str:
        """'decode' (decodes only), 'mixed' (decodes and prompt tokens), 'prefill' (prompt
        tokens only) or 'none' (nothing launched)."""
        if self.prefill_tokens and self.decode_rows:
            return "mixed"
        if self.prefill_tokens:
            return "prefill"
        return "decode" if self.decode_rows else "none"

    @property
    def host_s(self) -> float:
        """Wall time not spent waiting for the device."""
        return self.wall_s - self.device_wait_s


def step_composition(chunks: list[ScheduledChunk]) -> tuple[int, int]:
    """(prompt tokens, one-token decodes) of a step's chunks: a decode is one token of a
    request that has output tokens; every other chunk (a prompt's, or a preempted request's
    recomputation) counts as prompt tokens."""
    decodes = sum(c.num_new_tokens == 1 and c.request.num_output_tokens > 0 for c in chunks)
    return sum(c.num_new_tokens for c in chunks) - decodes, decodes
