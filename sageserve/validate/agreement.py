"""Section 2: logit agreement with the reference, teacher-forced on identical tokens.

Per context group (short / medium / long windows of the text) each backend scores the same
windows through `Engine.teacher_forced_logprobs`; its full next-token distributions are compared
with the reference backend's (KL, |Δ logprob| of the actual token, top-1 agreement).

The prefix-cache case goes through the engine's normal request path instead: a long prefix
is served once, then a prompt sharing it asks for prompt logprobs of its suffix, so the
prefix's K/V come from the prefix cache. Its full distributions are read with `LogitsTap`
and compared with the reference backend's teacher-forced ones, computed from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.validate.logits_tap import LogitsTap
from sageserve.validate.metrics import TokenComparison, compare_logprobs, target_logprobs
from sageserve.validate.workload import generate

PREFIX_GROUP = "prefix_cache_hit"


@dataclass(frozen=True)
class Window:
    """Tokens scored teacher-forced. offset: where they start in the text (for the report)."""

    group: str
    index: int
    offset: int
    token_ids: list[int]

    @property
    def key(self) -> str:
        return f"{self.group}-{self.index}"

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor(self.token_ids[1:])


class ReferenceStore:
    """The reference backend's [n, vocab] log-probs, kept on disk until the others are scored.

    Engines are built one at a time, so the reference's distributions must outlive its
    engine; at 8k tokens one window is 1.6 GB of float32, too much to keep in memory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, key: str, logprobs: torch.Tensor) -> None:
        torch.save(logprobs, self.root / f"{key}.pt")

    def load(self, key: str) -> torch.Tensor:
        return torch.load(self.root / f"{key}.pt")


@dataclass
class BackendScores:
    """What one backend's scoring leaves behind: comparisons per group, target log-probs."""

    comparisons: dict[str, list[TokenComparison]] = field(default_factory=dict)
    target_lp: dict[str, torch.Tensor] = field(default_factory=dict)  # window key -> [n - 1]
    cached_tokens: int | None = None


def score_window(
    engine: Engine, window: Window, store: ReferenceStore, is_reference: bool, out: BackendScores
) -> None:
    """Score one window; save it (reference) or compare it with the saved reference."""
    lp = engine.teacher_forced_logprobs(window.token_ids)
    out.target_lp[window.key] = target_logprobs(lp, window.targets).float()
    if is_reference:
        store.save(window.key, lp)
    ref = lp if is_reference else store.load(window.key)
    cmp = compare_logprobs(ref, lp, window.targets)
    out.comparisons.setdefault(window.group, []).append(cmp)


def prefix_hit_logprobs(
    engine: Engine, prefix: list[int], suffix: list[int]
) -> tuple[torch.Tensor, int]:
    """([len(suffix), vocab] log-probs of the suffix tokens, cached prefix tokens).

    The prefix is served first (one generated token) so its full pages enter the prefix
    cache; the second request asks for prompt logprobs from the suffix only, which lets the
    scheduler take everything before it from the cache.
    """
    engine.flush_prefix_cache()
    generate(engine, [prefix], SamplingParams(temperature=0, max_new_tokens=1))
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0, logprob_start_len=len(prefix))
    with LogitsTap(engine) as tap:
        out = generate(engine, [prefix + suffix], params)[0]
    rows = tap.logprobs()
    # Rows are the positions len(prefix) - 1 .. n - 2, scoring the suffix tokens.
    assert rows.shape[0] == len(suffix), (rows.shape, len(suffix))
    first = out.prompt_logprobs[len(prefix)] if out.prompt_logprobs else None
    assert first is not None and abs(first[suffix[0]] - rows[0, suffix[0]].item()) < 1e-5
    return rows, out.num_cached_tokens


def score_prefix_hit(
    engine: Engine,
    prefix: list[int],
    suffix: list[int],
    store: ReferenceStore,
    is_reference: bool,
    out: BackendScores,
) -> None:
    """Compare the cache-hit path's suffix distributions with the reference's from scratch."""
    rows, cached = prefix_hit_logprobs(engine, prefix, suffix)
    if is_reference:
        tf = engine.teacher_forced_logprobs(prefix + suffix)[len(prefix) - 1 :]
        store.save(PREFIX_GROUP, tf)
    ref = store.load(PREFIX_GROUP)
    out.comparisons[PREFIX_GROUP] = [compare_logprobs(ref, rows, torch.tensor(suffix))]
    out.cached_tokens = cached
