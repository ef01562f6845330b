"""Accuracy metrics (sageserve.validate.metrics): definitions checked on small examples."""

from __future__ import annotations

import math

import pytest
import torch

from sageserve.validate.metrics import (
    TokenComparison,
    agreement_stats,
    compare_logprobs,
    kl_divergence,
    mean_ci,
    perplexity,
    ppl_delta_ci,
    proportion_ci,
    target_logprobs,
    top1_matches,
)


def _random_logprobs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen).log_softmax(-1)


def test_kl_of_identical_distributions_is_zero() -> None:
    lp = _random_logprobs(300, 1000, seed=0)  # more rows than one float64 block
    assert torch.equal(kl_divergence(lp, lp.clone()), torch.zeros(300, dtype=torch.float64))


def test_kl_matches_hand_computed_example() -> None:
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = 0.25 ln 2
    p_lp, q_lp = (
        torch.tensor([p], dtype=torch.float64).log(),
        torch.tensor([q], dtype=torch.float64).log(),
    )
    assert kl_divergence(p_lp, q_lp).item() == pytest.approx(expected, rel=1e-12)
    reverse = kl_divergence(q_lp, p_lp)
    assert reverse.item() == pytest.approx(0.25 * math.log(2), rel=1e-12)


def test_kl_ignores_tokens_the_reference_rules_out() -> None:
    ref = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)  # all mass on token 0
    test = torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()
    assert kl_divergence(ref, test).item() == pytest.approx(-math.log(0.9), rel=1e-12)


def test_kl_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_perplexity_of_uniform_distribution_is_vocab_size() -> None:
    vocab = 49152
    lp = torch.full((17, vocab), -math.log(vocab))
    targets = torch.randint(0, vocab, (17,), generator=torch.Generator().manual_seed(0))
    assert perplexity(target_logprobs(lp, targets)) == pytest.approx(vocab, rel=1e-6)


def test_top1_agreement() -> None:
    ref = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]).log()
    test = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]).log()
    assert top1_matches(ref, test).tolist() == [True, False, True]


def test_mean_ci_contains_the_mean_and_shrinks_with_n() -> None:
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (100, 10_000):
        values = torch.rand(n, generator=gen)
        lo, hi = mean_ci(values)
        assert lo < values.double().mean().item() < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5  # ~ 1 / sqrt(n): a factor 10 expected
    # For uniform(0, 1): half-width = 1.96 * sqrt(1/12) / sqrt(n).
    assert widths[1] / 2 == pytest.approx(1.96 * math.sqrt(1 / 12) / 100, rel=0.05)


def test_mean_ci_needs_two_values_and_a_valid_confidence() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="confidence"):
        mean_ci(torch.tensor([1.0, 2.0]), confidence=1.0)


def test_proportion_ci_stays_open_at_full_agreement() -> None:
    lo, hi = proportion_ci(1000, 1000)
    assert 0.99 < lo < 1.0 and hi == 1.0
    lo, hi = proportion_ci(500, 1000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(1000), rel=0.01)


def test_ppl_delta_ci_is_paired() -> None:
    # Token difficulty varies hugely, but test is always ref - 0.01: the ratio is exactly
    # exp(0.01) on every resample, so a paired interval is a point.
    gen = torch.Generator().manual_seed(0)
    ref_lp = -10 * torch.rand(2000, generator=gen, dtype=torch.float64)
    lo, hi = ppl_delta_ci(ref_lp, ref_lp - 0.01)
    assert lo == pytest.approx(math.expm1(0.01), rel=1e-9)
    assert hi == pytest.approx(math.expm1(0.01), rel=1e-9)


def _ar1(n: int, phi: float, seed: int) -> torch.Tensor:
    """[n] float64 AR(1) series x_t = phi x_(t-1) + e_t, unit-variance noise."""
    e = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def _width(diff: torch.Tensor, block: int | None) -> float:
    lo, hi = ppl_delta_ci(torch.zeros_like(diff), -0.01 * diff, block=block)
    assert lo < hi
    return hi - lo


def test_ppl_delta_ci_blocks_keep_neighbouring_dependence() -> None:
    # Strongly dependent differences (phi 0.9: the mean's true spread is ~4.4x what
    # independent tokens would give): single-token resampling understates it, blocks of
    # n^(1/3) tokens recover most of it; on independent differences both agree.
    dependent, independent = _ar1(3000, 0.9, seed=6), _ar1(3000, 0.0, seed=7)
    assert _width(dependent, None) > 2.5 * _width(dependent, 1)
    assert _width(independent, None) == pytest.approx(_width(independent, 1), rel=0.2)


def _coverage(block: int | None) -> float:
    """Share of 200 dependent series (phi 0.8, 2000 tokens, true mean difference 0) whose
    95% interval covers 0."""
    covered = 0
    for seed in range(200):
        diff = -0.01 * _ar1(2000, 0.8, seed)
        lo, hi = ppl_delta_ci(torch.zeros_like(diff), diff, samples=400, seed=seed, block=block)
        covered += lo <= 0.0 <= hi
    return covered / 200


def test_ppl_delta_ci_block_coverage() -> None:
    # Measured: 92.5% with blocks (13 tokens), 49% resampling single tokens; the binomial
    # sd of a share of 200 is ~2%.
    assert _coverage(None) >= 0.87
    assert _coverage(1) <= 0.6


def test_ppl_delta_ci_rejects_bad_blocks() -> None:
    with pytest.raises(ValueError, match="block"):
        ppl_delta_ci(torch.zeros(10), torch.ones(10), block=11)


def test_agreement_stats_of_identical_models() -> None:
    lp = _random_logprobs(64, 500, seed=1)
    targets = torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(2))
    halves = [compare_logprobs(lp[:32], lp[:32], targets[:32])]
    halves.append(compare_logprobs(lp[32:], lp[32:], targets[32:]))
    stats = agreement_stats(TokenComparison.cat(halves))
    assert stats.n_tokens == 64
    assert stats.mean_kl == stats.max_kl == stats.p99_kl == 0.0
    assert stats.mean_kl_ci == (0.0, 0.0)
    assert stats.top1_agreement == 1.0 and stats.top1_ci[1] == 1.0
    assert stats.ppl_ref == stats.ppl_test and stats.ppl_delta_rel == 0.0
    assert stats.ppl_delta_ci == (0.0, 0.0)
    assert stats.max_abs_logprob_delta == 0.0
    assert stats.to_dict()["top1_ci"] == list(stats.top1_ci)


def test_agreement_stats_of_a_perturbed_model() -> None:
    ref = _random_logprobs(400, 300, seed=3)
    noise = 0.05 * torch.randn(400, 300, generator=torch.Generator().manual_seed(4))
    test = (ref + noise).log_softmax(-1)
    targets = torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(5))
    stats = agreement_stats(compare_logprobs(ref, test, targets))
    assert 0 < stats.mean_kl_ci[0] < stats.mean_kl < stats.mean_kl_ci[1]
    assert stats.mean_kl <= stats.p99_kl <= stats.max_kl
    assert stats.ppl_delta_ci[0] < stats.ppl_delta_rel < stats.ppl_delta_ci[1]
    assert stats.ppl_delta_rel == pytest.approx(stats.ppl_test / stats.ppl_ref - 1)
