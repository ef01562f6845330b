"""How far a test model's next-token distributions are from a reference's (pure torch).

The unit of comparison is one teacher-forced position: both models see the same tokens and
each gives a log-probability row over the vocabulary for the next one. `compare_logprobs`
reduces a pair of [n, vocab] matrices to per-token vectors (`TokenComparison`), small enough
to keep for many windows; `agreement_stats` turns those into summary statistics with
confidence intervals (`AgreementStats`).

The perplexity change's interval resamples blocks of neighbouring tokens, which keeps their
dependence (`ppl_delta_ci`). The other statistics treat tokens as independent samples:
neighbouring tokens of a text are not quite independent, so those intervals are somewhat
optimistic; they are a guide to the noise of a figure, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch

# Rows of the vocabulary processed at once in float64 (bounds the temporaries to
# _ROW_BLOCK x vocab x 8 bytes, 50 MB for a 49k vocabulary).
_ROW_BLOCK = 128
BOOTSTRAP_SAMPLES = 2000


# --------------------------------------------------------------------- per-token metrics


def _renormalized(logprobs: torch.Tensor) -> torch.Tensor:
    """float64 copy of `logprobs` [rows, vocab] whose rows sum to exactly 1 in probability."""
    lp = logprobs.double()
    return lp - lp.logsumexp(dim=-1, keepdim=True)


def kl_divergence(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-row KL(ref ‖ test) = sum_v p_ref(v) * (log p_ref(v) - log p_test(v)).

    ref, test: [n, vocab] log-probabilities (e.g. log_softmax output). Returns [n] float64.
    Computed in float64 after renormalizing each row, so float32 rounding of the inputs'
    normalization does not masquerade as divergence (mean KLs of interest go down to 1e-5).
    Entries where p_ref is 0 contribute 0, as the definition says.
    """
    if ref.shape != test.shape or ref.dim() != 2:
        raise ValueError(
            f"need two [n, vocab] matrices of one shape, got {ref.shape}, {test.shape}"
        )
    out = torch.empty(ref.shape[0], dtype=torch.float64)
    for start in range(0, ref.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        r, t = _renormalized(ref[rows]), _renormalized(test[rows])
        terms = r.exp() * (r - t)
        out[rows] = torch.where(r == -math.inf, 0.0, terms).sum(dim=-1)
    return out


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) of row i. logprobs: [n, vocab]; targets: [n] int64. Returns [n]."""
    if targets.shape != logprobs.shape[:1]:
        raise ValueError(f"need one target per row: {targets.shape} vs {logprobs.shape}")
    return logprobs.gather(1, targets.long().unsqueeze(1)).squeeze(1).double()


def top1_matches(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """[n] bool: whether both rows of [n, vocab] log-probabilities have the same argmax."""
    return ref.argmax(dim=-1) == test.argmax(dim=-1)


def perplexity(target_lp: torch.Tensor) -> float:
    """exp(-mean log p(target)) over [n] target log-probabilities."""
    if target_lp.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(-target_lp.double().mean().item())


@dataclass
class TokenComparison:
    """Per-token results of comparing two models on the same teacher-forced tokens.

    Every field is [n] over the compared positions: kl (float64, KL(ref ‖ test)), ref_lp and
    test_lp (float64, log p of the actual next token), top1 (bool, same argmax).
    """

    kl: torch.Tensor
    ref_lp: torch.Tensor
    test_lp: torch.Tensor
    top1: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.kl.shape[0])

    @property
    def abs_logprob_delta(self) -> torch.Tensor:
        """[n] |log p_test(target) - log p_ref(target)|."""
        return (self.test_lp - self.ref_lp).abs()

    @staticmethod
    def cat(parts: list[TokenComparison]) -> TokenComparison:
        """The comparisons of several windows as one."""
        return TokenComparison(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("kl", "ref_lp", "test_lp", "top1")
            )
        )


def compare_logprobs(
    ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor
) -> TokenComparison:
    """Reduce two [n, vocab] log-probability matrices to per-token vectors.

    targets: [n] the token each row predicts (token i + 1 of a teacher-forced sequence).
    """
    return TokenComparison(
        kl=kl_divergence(ref, test),
        ref_lp=target_logprobs(ref, targets),
        test_lp=target_logprobs(test, targets),
        top1=top1_matches(ref, test),
    )


def top_n_kl(ref: dict[int, float], test: dict[int, float]) -> float:
    """Approximate KL(ref ‖ test) from two top-N {token: logprob} lists (remote servers).

    Over the reference's top-N tokens, plus one bucket for the rest of the vocabulary
    (P_rest = 1 - sum of the reference's top-N, Q_rest likewise for the test's values of
    those tokens). A token missing from the test's top-N gets the test's N-th logprob, an
    upper bound of its true value. Lumping the tail makes this a coarse-grained KL, which
    is at most the true one by the data-processing inequality; the bound used for missing
    tokens can push it either way. Good to the leading digit for peaked distributions.
    """
    floor = min(test.values()) if test else -math.inf
    kl, p_top, q_top = 0.0, 0.0, 0.0
    for token, lp in ref.items():
        p, lq = math.exp(lp), test.get(token, floor)
        kl += p * (lp - lq)
        p_top, q_top = p_top + p, q_top + math.exp(lq)
    p_rest, q_rest = max(1.0 - p_top, 0.0), max(1.0 - q_top, 1e-12)
    if p_rest > 0:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def _first(top: dict[int, float]) -> int | None:
    return next(iter(top), None)


def compare_top_n(
    ref_top: list[dict[int, float]],
    test_top: list[dict[int, float]],
    ref_lp: list[float],
    test_lp: list[float],
) -> TokenComparison:
    """Per-token comparison from top-N lists (KL approximate, see `top_n_kl`).

    ref_lp, test_lp: [n] exact log p of the actual next token; top-1 agreement compares the
    first token of each list (the lists come best first).
    """
    if not len(ref_top) == len(test_top) == len(ref_lp) == len(test_lp):
        raise ValueError("top-N comparison needs equally long lists")
    return TokenComparison(
        kl=torch.tensor([top_n_kl(r, t) for r, t in zip(ref_top, test_top, strict=True)]),
        ref_lp=torch.tensor(ref_lp, dtype=torch.float64),
        test_lp=torch.tensor(test_lp, dtype=torch.float64),
        top1=torch.tensor([_first(r) == _first(t) for r, t in zip(ref_top, test_top, strict=True)]),
    )


# --------------------------------------------------------------- confidence intervals


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def mean_ci(values: torch.Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided interval for the mean of [n] values: normal approximation.

    mean ± z * s / sqrt(n), with s the sample standard deviation (n - 1 denominator) and z
    the normal quantile of (1 + confidence) / 2. Sound for large n by the central limit
    theorem, even for skewed values such as per-token KL. Needs n >= 2.
    """
    z = _z(confidence)
    n = values.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    v = values.double()
    mean, half = v.mean().item(), z * v.std().item() / math.sqrt(n)
    return mean - half, mean + half


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n.

    Chosen over the normal (Wald) interval because agreement rates sit near 100%, where
    Wald's interval collapses to a point (and to [1, 1] when every token agrees).
    """
    z = _z(confidence)
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}, {n}")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """McNemar's exact test: two-sided p-value that paired outcomes changed by chance.

    only_first / only_second: the discordant pairs (e.g. questions only the reference /
    only the tested backend answered correctly). Under no change each discordant pair goes
    either way with probability 1/2, so the smaller count is binomial(n, 1/2); p = 2 x its
    lower tail, at most 1. No discordant pair: p = 1.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be >= 0, got {only_first}, {only_second}")
    n, k = only_first + only_second, min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def ppl_delta_ci(
    ref_lp: torch.Tensor,
    test_lp: torch.Tensor,
    confidence: float = 0.95,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    block: int | None = None,
) -> tuple[float, float]:
    """Interval for ppl_test / ppl_ref - 1: paired circular block bootstrap over tokens.

    ref_lp, test_lp: [n] log p(target) of the same tokens, in text order. The ratio of
    perplexities is exp(mean(ref_lp - test_lp)). Each bootstrap sample draws blocks of
    `block` consecutive tokens (wrapping around the end) at random starts until it has n
    tokens, the same ones for both models, and takes that ratio. Pairing removes the
    variance the two share (hard tokens are hard for both), which is most of it. Blocks keep
    the dependence between neighbouring tokens, which resampling single tokens would ignore
    (making the interval too narrow): block None = round(n^(1/3)), the usual order for the
    length. The interval is the (1 ± confidence) / 2 quantiles of the samples.
    """
    _z(confidence)  # validates
    n = ref_lp.numel()
    if n < 2 or test_lp.shape != ref_lp.shape:
        raise ValueError(
            f"need two [n] vectors of one shape, n >= 2: {ref_lp.shape}, {test_lp.shape}"
        )
    block = block or max(1, round(n ** (1 / 3)))
    if not 1 <= block <= n:
        raise ValueError(f"block must be in 1..{n}, got {block}")
    diff = (ref_lp.double() - test_lp.double()).reshape(-1)
    means = _block_bootstrap_means(diff, block, samples, seed)
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return math.expm1(lo.item()), math.expm1(hi.item())


def _block_bootstrap_means(
    values: torch.Tensor, block: int, samples: int, seed: int
) -> torch.Tensor:
    """[samples] means of circular block resamples of values [n] (float64)."""
    n = values.numel()
    blocks = -(-n // block)
    offsets = torch.arange(block)
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(samples, dtype=torch.float64)
    rows_at_once = max(1, 2**22 // (blocks * block))  # bound the index matrix to ~4M entries
    for start in range(0, samples, rows_at_once):
        rows = min(rows_at_once, samples - start)
        starts = torch.randint(0, n, (rows, blocks, 1), generator=gen)
        idx = ((starts + offsets) % n).reshape(rows, -1)[:, :n]
        means[start : start + rows] = values[idx].mean(dim=1)
    return means


# ------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class AgreementStats:
    """A test model against a reference over n_tokens teacher-forced positions.

    KL is KL(ref ‖ test) per token (nats); *_ci are (low, high) at `confidence`:
    mean_kl_ci by the normal approximation (`mean_ci`), top1_ci by Wilson's interval,
    ppl_delta_ci by a paired block bootstrap over tokens (`ppl_delta_ci`).
    ppl_delta_rel = ppl_test / ppl_ref - 1. |Δ logprob| is that of the actual next token.
    """

    n_tokens: int
    confidence: float
    mean_kl: float
    mean_kl_ci: tuple[float, float]
    p99_kl: float
    max_kl: float
    top1_agreement: float
    top1_ci: tuple[float, float]
    mean_abs_logprob_delta: float
    p99_abs_logprob_delta: float
    max_abs_logprob_delta: float
    ppl_ref: float
    ppl_test: float
    ppl_delta_rel: float
    ppl_delta_ci: tuple[float, float]

    def to_dict(self) -> dict[str, float | int | list[float]]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _quantile(values: torch.Tensor, q: float) -> float:
    return torch.quantile(values.double(), q).item()


def agreement_stats(
    cmp: TokenComparison, confidence: float = 0.95, seed: int = 0
) -> AgreementStats:
    """Summary statistics of a comparison (see AgreementStats for each figure's method)."""
    if cmp.n_tokens < 2:
        raise ValueError(f"need at least 2 compared tokens, got {cmp.n_tokens}")
    dlp = cmp.abs_logprob_delta
    ppl_ref, ppl_test = perplexity(cmp.ref_lp), perplexity(cmp.test_lp)
    agree = int(cmp.top1.sum().item())
    return AgreementStats(
        n_tokens=cmp.n_tokens,
        confidence=confidence,
        mean_kl=cmp.kl.mean().item(),
        mean_kl_ci=mean_ci(cmp.kl, confidence),
        p99_kl=_quantile(cmp.kl, 0.99),
        max_kl=cmp.kl.max().item(),
        top1_agreement=agree / cmp.n_tokens,
        top1_ci=proportion_ci(agree, cmp.n_tokens, confidence),
        mean_abs_logprob_delta=dlp.mean().item(),
        p99_abs_logprob_delta=_quantile(dlp, 0.99),
        max_abs_logprob_delta=dlp.max().item(),
        ppl_ref=ppl_ref,
        ppl_test=ppl_test,
        ppl_delta_rel=ppl_test / ppl_ref - 1,
        ppl_delta_ci=ppl_delta_ci(cmp.ref_lp, cmp.test_lp, confidence, seed=seed),
    )
