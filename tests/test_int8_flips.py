"""The 8-bit drift comparison helper accepts what its measured margins allow, and no more."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from int8_flips import (
    CANDIDATE_TOL,
    MEAN_MIN_COUNT,
    assert_logprob_rows_close,
    assert_outputs_match,
    assert_top_logprobs_close,
)


@dataclass
class Out:
    token_ids: list[int]
    logprobs: list[dict[int, float]]


def test_a_token_crossing_the_cut_off_passes_only_near_it() -> None:
    a = {1: -0.1, 2: -1.0, 3: -3.00}
    near = {1: -0.1, 2: -1.0, 4: -3.01}  # 3 and 4 swap at the top-3 cut-off
    assert_top_logprobs_close(a, near, top_n=3)
    far = {1: -0.1, 2: -1.0, 4: -3.0 + 2 * CANDIDATE_TOL}  # far above a's cut-off: no swap
    with pytest.raises(AssertionError):
        assert_top_logprobs_close(a, far, top_n=3)
    moved = {1: -0.1, 2: -1.0 - 2 * CANDIDATE_TOL, 3: -3.0}
    with pytest.raises(AssertionError):
        assert_top_logprobs_close(a, moved, top_n=3)


def test_tokens_may_part_only_at_a_near_tie() -> None:
    tie = [{5: -0.70, 6: -0.72}, {7: -0.1, 8: -2.0}]
    a, b = Out([5, 7], tie), Out([6, 8], [{6: -0.70, 5: -0.71}, {8: -0.1, 7: -2.0}])
    assert_outputs_match(a, b, exact=False, top_n=2)
    clear = Out([5, 7], [{5: -0.1, 6: -2.5}, {7: -0.1, 8: -2.0}])
    with pytest.raises(AssertionError):
        assert_outputs_match(clear, b, exact=False, top_n=2)
    with pytest.raises(AssertionError):
        assert_outputs_match(a, b, exact=True, top_n=2)


def test_a_drift_every_candidate_shares_fails_on_the_mean() -> None:
    """Each |Δ| = 0.3 is within the per-candidate margin; all of them at once is a bug."""
    steps = MEAN_MIN_COUNT // 2
    a = Out([1] * steps, [{1: -0.1, 2: -3.0}] * steps)
    b = Out([1] * steps, [{1: -0.4, 2: -2.7}] * steps)
    with pytest.raises(AssertionError):
        assert_outputs_match(a, b, exact=False, top_n=2)
    c = Out([1] * steps, [{1: -0.12, 2: -2.95}] * steps)
    assert_outputs_match(a, c, exact=False, top_n=2)


def test_logit_rows() -> None:
    logits = torch.randn(3, 50)
    assert_logprob_rows_close(logits, logits + 1e-6, exact_atol=1e-5)
    assert_logprob_rows_close(logits, logits + 0.2, exact_atol=None)  # a shift: same logprobs
    bumped = logits.clone()
    bumped[1, 7] += 2 * CANDIDATE_TOL
    with pytest.raises(AssertionError):
        assert_logprob_rows_close(logits, bumped, exact_atol=None)
    with pytest.raises(AssertionError):
        assert_logprob_rows_close(logits, logits + 0.3 * torch.randn(3, 50), exact_atol=None)
