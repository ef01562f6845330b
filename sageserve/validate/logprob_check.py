"""Section 1: are the logprobs the engine returns well-formed and consistent?

Checked per position, for output tokens (`logprobs=N`) and prompt tokens
(`prompt_logprobs=N`): the chosen token is present, the top-N are sorted descending, every
value is finite and <= 0, a greedy token is the top-1, and the values equal the
teacher-forced ones computed from scratch (prompt tokens exactly, output tokens -- computed by
the decode path -- within the |Δ logprob| threshold of the backend's verdict profile).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.validate.workload import generate

TOP_N = 5
_MAX_FAILURES_KEPT = 10


@dataclass
class LogprobFindings:
    """Counts of checked positions, the failures found (first few kept) and the worst gaps."""

    output_positions: int = 0
    prompt_positions: int = 0
    failures: list[str] = field(default_factory=list)
    num_failures: int = 0
    max_prompt_vs_teacher_forced: float = 0.0
    max_output_vs_teacher_forced: float = 0.0

    def fail(self, message: str) -> None:
        self.num_failures += 1
        if len(self.failures) < _MAX_FAILURES_KEPT:
            self.failures.append(message)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_entry(
    entry: dict[int, float] | None, chosen: int, top_n: int, where: str, found: LogprobFindings
) -> None:
    """Shape and value checks of one position's {token_id: logprob} dict."""
    if entry is None:
        found.fail(f"{where}: no logprobs")
        return
    values = list(entry.values())
    if chosen not in entry:
        found.fail(f"{where}: chosen token {chosen} missing")
    if len(entry) not in (top_n, top_n + 1):
        found.fail(f"{where}: {len(entry)} entries, expected {top_n} or {top_n + 1}")
    top = values[:top_n]
    if any(a < b for a, b in itertools.pairwise(top)):
        found.fail(f"{where}: top-{top_n} not sorted descending: {top}")
    if not all(math.isfinite(v) and v <= 0 for v in values):
        found.fail(f"{where}: a logprob is not finite or > 0: {values}")


def _compare_rows(
    entry: dict[int, float] | None,
    row: torch.Tensor,
    where: str,
    tol: float,
    found: LogprobFindings,
) -> float:
    """Largest |entry value - teacher-forced value| over the entry's tokens (0 if no entry)."""
    if entry is None:
        return 0.0
    gap = max(abs(v - row[t].item()) for t, v in entry.items())
    if gap > tol:
        found.fail(f"{where}: differs from the teacher-forced value by {gap:.2e} (> {tol:.0e})")
    return gap


def check_prompt(
    engine: Engine, prompt: list[int], new_tokens: int, tols: tuple[float, float]
) -> LogprobFindings:
    """Generate greedily with top-N output and prompt logprobs; check every position.

    tols: (prompt positions, output positions) tolerances against teacher forcing.
    """
    params = SamplingParams(
        temperature=0,
        max_new_tokens=new_tokens,
        ignore_eos=True,
        logprobs=TOP_N,
        prompt_logprobs=TOP_N,
    )
    out = generate(engine, [prompt], params)[0]
    found = LogprobFindings()
    _check_prompt_positions(out.prompt_logprobs, prompt, found)
    _check_output_positions(out.logprobs, out.token_ids, found)
    full = prompt + out.token_ids
    tf = engine.teacher_forced_logprobs(full)  # row i scores token i + 1
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j] if out.prompt_logprobs else None
        gap = _compare_rows(entry, tf[j - 1], f"prompt position {j}", tols[0], found)
        found.max_prompt_vs_teacher_forced = max(found.max_prompt_vs_teacher_forced, gap)
    for i, entry in enumerate(out.logprobs or []):
        row = tf[len(prompt) - 1 + i]
        gap = _compare_rows(entry, row, f"output position {i}", tols[1], found)
        found.max_output_vs_teacher_forced = max(found.max_output_vs_teacher_forced, gap)
    return found


def _check_prompt_positions(
    entries: list[dict[int, float] | None] | None, prompt: list[int], found: LogprobFindings
) -> None:
    if entries is None or len(entries) != len(prompt):
        found.fail(
            f"prompt logprobs: expected {len(prompt)} positions, got {entries and len(entries)}"
        )
        return
    if entries[0] is not None:
        found.fail("prompt position 0 has logprobs (nothing precedes it)")
    for j in range(1, len(prompt)):
        check_entry(entries[j], prompt[j], TOP_N, f"prompt position {j}", found)
        found.prompt_positions += 1


def _check_output_positions(
    entries: list[dict[int, float]] | None, tokens: list[int], found: LogprobFindings
) -> None:
    if entries is None or len(entries) != len(tokens):
        found.fail(
            f"output logprobs: expected {len(tokens)} positions, got {entries and len(entries)}"
        )
        return
    for i, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        check_entry(entry, token, TOP_N, f"output position {i}", found)
        if entry and entry.get(token, -math.inf) < max(entry.values()):
            found.fail(f"output position {i}: greedy token {token} is not the top-1")
        found.output_positions += 1


def merge(parts: list[LogprobFindings]) -> LogprobFindings:
    """One summary of several prompts' findings."""
    total = LogprobFindings()
    for p in parts:
        total.output_positions += p.output_positions
        total.prompt_positions += p.prompt_positions
        total.num_failures += p.num_failures
        total.failures.extend(p.failures[: _MAX_FAILURES_KEPT - len(total.failures)])
        total.max_prompt_vs_teacher_forced = max(
            total.max_prompt_vs_teacher_forced, p.max_prompt_vs_teacher_forced
        )
        total.max_output_vs_teacher_forced = max(
            total.max_output_vs_teacher_forced, p.max_output_vs_teacher_forced
        )
    return total
