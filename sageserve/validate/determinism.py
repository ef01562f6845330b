"""Section 7: determinism at temperature 0.

Three comparisons per backend, each of greedy outputs (token ids and the chosen tokens'
logprobs), the prefix cache emptied before every cold run:
- repeats: N identical runs of one prompt;
- batch: the prompt alone vs the same prompt inside a batch of other prompts;
- prefix cache: a cold run (cache miss) vs a second run whose prompt comes from the cache.

Any difference is reported with the first output position where it appears. The 8-bit
backend quantizes each token on its own, so its attention is the same alone, batched, or
over a cached prefix; but the fp32 linear layers may round differently for other batch
shapes, so greedy outputs can still part. This section reports what it measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sageserve.engine.engine import Engine
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.validate.workload import generate


@dataclass(frozen=True)
class Difference:
    """How two greedy outputs of the same prompt compare.

    first_token_diff: first output position whose token differs (None: all equal).
    first_logprob_diff: first position whose chosen-token logprob differs at all.
    max_logprob_delta: largest |Δ logprob| over the positions before any token differs.
    """

    identical_tokens: bool
    first_token_diff: int | None
    first_logprob_diff: int | None
    max_logprob_delta: float
    cached_tokens: tuple[int, int]


class GreedyOutput(Protocol):
    """What a comparison reads: a RequestOutput, or a remote server's `remote_client.Greedy`."""

    token_ids: Sequence[Any]
    logprobs: Sequence[dict[Any, float]] | None
    num_cached_tokens: int


def compare_outputs(a: GreedyOutput, b: GreedyOutput) -> Difference:
    """Compare two outputs position by position (see Difference)."""
    n = min(len(a.token_ids), len(b.token_ids))
    token_diff = next((i for i in range(n) if a.token_ids[i] != b.token_ids[i]), None)
    if token_diff is None and len(a.token_ids) != len(b.token_ids):
        token_diff = n
    same_upto = n if token_diff is None else token_diff
    lp_a = [a.logprobs[i][a.token_ids[i]] for i in range(same_upto)] if a.logprobs else []
    lp_b = [b.logprobs[i][b.token_ids[i]] for i in range(same_upto)] if b.logprobs else []
    deltas = [abs(x - y) for x, y in zip(lp_a, lp_b, strict=True)]
    lp_diff = next((i for i, d in enumerate(deltas) if d != 0.0), None)
    return Difference(
        identical_tokens=token_diff is None,
        first_token_diff=token_diff,
        first_logprob_diff=lp_diff if lp_diff is not None else token_diff,
        max_logprob_delta=max(deltas, default=0.0),
        cached_tokens=(a.num_cached_tokens, b.num_cached_tokens),
    )


def _cold(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    engine.flush_prefix_cache()
    return generate(engine, prompts, params)


def determinism_checks(
    engine: Engine, prompt: list[int], others: list[list[int]], runs: int, new_tokens: int
) -> dict[str, Any]:
    """The three comparisons (module docstring) for one backend, JSON-ready."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, logprobs=0)
    first = _cold(engine, [prompt], params)[0]
    repeats = [compare_outputs(first, _cold(engine, [prompt], params)[0]) for _ in range(runs - 1)]
    batched = _cold(engine, [prompt, *others], params)[0]
    miss = _cold(engine, [prompt], params)[0]
    hit = generate(engine, [prompt], params)[0]
    return result_dict(repeats, first, batched, miss, hit, new_tokens, batch=1 + len(others))


def result_dict(
    repeats: list[Difference],
    first: GreedyOutput,
    batched: GreedyOutput,
    miss: GreedyOutput,
    hit: GreedyOutput,
    new_tokens: int,
    batch: int,
) -> dict[str, Any]:
    """The section's JSON for one backend from its runs (see `determinism_checks`)."""
    return {
        "repeats": [asdict(d) for d in repeats],
        "alone_vs_batch": asdict(compare_outputs(first, batched)) | {"batch": batch},
        "cache_miss_vs_hit": asdict(compare_outputs(miss, hit)),
        "output_tokens": new_tokens,
    }


def all_identical(result: dict[str, Any]) -> bool:
    """Whether every comparison of a backend's determinism result has identical tokens."""
    diffs = [*result["repeats"], result["alone_vs_batch"], result["cache_miss_vs_hit"]]
    return all(d["identical_tokens"] for d in diffs)
