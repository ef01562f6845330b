"""One place to compare results that took different float paths through 8-bit attention.

Why they differ at all: an INT8 code is round(x / scale). When the same x comes out of
another GEMM shape — a batch of another size, a prefix computed inside another request, a
request recomputed after preemption, a CUDA graph's padded rows — fp32 or 16-bit rounding
moves it by ~1e-6 relative, and where x sits that close to a rounding boundary its code moves
by one. Attention itself is batch-invariant (bitwise, tested at the backend level); the flip
comes from its inputs. It does not stay alone: a flipped code changes the layer's output by
far more than 1e-6, so later layers' codes flip too, and the two paths end up about as far
apart as either is from exact attention.

Measured (benchmarks/int8_flip_margins.py, SmolLM2-135M fp32 on a 2-core CPU, torch threads 1
and 2, benchmarks/results/int8_flip_margins-cpu-2026-12-03.json), |Δ logprob| of a candidate
both top-5 lists hold, batched vs alone and preempted vs not: p50 0.010-0.014, p99 0.11-0.17,
max 0.38; the mean over one output pair at most 0.036; a candidate in one top-5 only at most
0.13 above the other's cut-off; tokens parted only at top-two gaps up to 0.03. The 8-bit path
against exact attention: p99 0.21, max 0.37, pair mean 0.051. The margins below leave 2-3x
room over those maxima; each still fails on what a real bug does (a wrong mask over a cached
prefix moves logprobs by nats and tokens at clear margins):

- `CANDIDATE_TOL` (0.75): |Δ| of a shared candidate; also how far above the other side's
  cut-off a candidate on one side only may sit (it crossed the top-N boundary).
- `MEAN_TOL` (0.1): the mean |Δ| over one output pair, once it holds `MEAN_MIN_COUNT`
  candidates (fewer make a noisy mean).
- `NEAR_TIE_GAP` (0.5): greedy tokens may part only where both sides' top two candidates
  were this close; later positions saw different contexts and are not compared.

Exact backends (torch, and 16-bit paths at the same shapes) are compared exactly instead:
`assert_outputs_match(..., exact=True)`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Protocol

import torch

CANDIDATE_TOL = 0.75
MEAN_TOL = 0.1
MEAN_MIN_COUNT = 20
NEAR_TIE_GAP = 0.5
EXACT_LOGPROB_TOL = 1e-4


class Output(Protocol):
    """What the helpers read of a `RequestOutput`."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where a and b differ; min(len) when one prefixes the other."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def top_two_gap(logprobs: dict[int, float]) -> float:
    """Logprob of the best candidate minus that of the second best."""
    best, second = sorted(logprobs.values(), reverse=True)[:2]
    return best - second


def assert_tokens_match_up_to_near_tie(a: Output, b: Output) -> int:
    """Greedy tokens are equal, or first differ where both sides saw a near-tie; returns the
    number of positions whose contexts were equal (the first difference included)."""
    assert len(a.token_ids) == len(b.token_ids), (a.token_ids, b.token_ids)
    first = first_difference(a.token_ids, b.token_ids)
    if first == len(a.token_ids):
        return first
    assert a.logprobs is not None and b.logprobs is not None, "near-tie check needs logprobs"
    for out in (a, b):
        gap = top_two_gap(out.logprobs[first])
        assert gap < NEAR_TIE_GAP, (first, gap, a.token_ids, b.token_ids)
    return first + 1


def _cut_off(logprobs: dict[int, float], top_n: int) -> float:
    """The N-th best logprob (the dict may also hold a chosen token outside the top N)."""
    return sorted(logprobs.values(), reverse=True)[min(top_n, len(logprobs)) - 1]


def assert_top_logprobs_close(
    a: dict[int, float], b: dict[int, float], top_n: int, tol: float = CANDIDATE_TOL
) -> list[float]:
    """Two top-N logprob dicts of one position agree up to 8-bit drift: shared tokens within
    `tol`; a token on one side only within `tol` above the other side's cut-off. Returns the
    shared tokens' |Δ|."""
    deltas = [abs(a[token] - b[token]) for token in a.keys() & b.keys()]
    assert not deltas or max(deltas) < tol, (max(deltas), a, b)
    for mine, other in ((a, b), (b, a)):
        cut_off = _cut_off(other, top_n)
        for token in mine.keys() - other.keys():
            assert mine[token] < cut_off + tol, (token, mine[token], cut_off)
    return deltas


def assert_outputs_match(
    a: Output, b: Output, *, exact: bool, top_n: int, exact_tol: float = EXACT_LOGPROB_TOL
) -> None:
    """Two greedy outputs of one prompt, computed along different paths, agree.

    exact: tokens equal, top-N key sets equal, logprobs at most `exact_tol` apart (0: equal).
    Otherwise (8-bit): tokens up to a near-tie, then every position whose context was the
    same on both sides within the 8-bit drift margins (module docstring).
    """
    assert a.logprobs is not None and b.logprobs is not None
    if exact:
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs, strict=True):
            assert lp_a.keys() == lp_b.keys()
            worst = max(abs(lp_a[k] - lp_b[k]) for k in lp_a)
            assert worst <= exact_tol, (worst, exact_tol)  # <=: exact_tol 0 asks for bits
        return
    steps = assert_tokens_match_up_to_near_tie(a, b)
    deltas = []
    for lp_a, lp_b in zip(a.logprobs[:steps], b.logprobs[:steps], strict=True):
        deltas += assert_top_logprobs_close(lp_a, lp_b, top_n)
    if len(deltas) >= MEAN_MIN_COUNT:
        assert statistics.fmean(deltas) < MEAN_TOL, (statistics.fmean(deltas), len(deltas))


def assert_logprob_rows_close(
    a: torch.Tensor, b: torch.Tensor, *, exact_atol: float | None
) -> None:
    """Logits [rows, vocab] of two paths: within `exact_atol` when given (exact backends);
    otherwise (8-bit) their log-softmax within `CANDIDATE_TOL` everywhere and `MEAN_TOL` on
    average."""
    if exact_atol is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=exact_atol)
        return
    delta = (a.float().log_softmax(-1) - b.float().log_softmax(-1)).abs()
    assert delta.max().item() < CANDIDATE_TOL and delta.mean().item() < MEAN_TOL, delta.max()
