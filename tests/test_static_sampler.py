"""The static sampler (what the decode graphs capture) picks the eager Sampler's tokens.

Each case draws fresh logits (rounded to bf16, so that rows have ties), builds the same rows
twice with generators of the same seeds, and samples them both ways over several steps: the
tokens, and the generators' states afterwards, must be equal. Rows sit in a larger padded
buffer whose spare rows hold another step's parameters, as in a replayed graph.
"""

from __future__ import annotations

import pytest
import torch

from sageserve.engine.sampler import Sampler, SamplingRow
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.static_sampler import (
    SampleMode,
    StaticRowParams,
    sample_mode,
    sample_static,
)

CPU = torch.device("cpu")
VOCAB = 333  # not a power of two


def _rows(params: list[dict], seed: int) -> list[SamplingRow]:
    return [
        SamplingRow(SamplingParams(**p), torch.Generator().manual_seed(seed + i), [], [])
        for i, p in enumerate(params)
    ]


def _logits(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, VOCAB, generator=gen) * 2.5).bfloat16().float()


# Row mixes of each mode; greedy rows among random ones, odd k, k past the vocabulary.
MIXES = {
    SampleMode.GREEDY: [dict(temperature=0), dict(temperature=0, top_k=3, top_p=0.5)] * 3,
    SampleMode.RANDOM: [
        dict(temperature=0.7),
        dict(temperature=0),
        dict(temperature=1.3, min_p=0.1),
        dict(temperature=1.0),
        dict(temperature=0.4, min_p=0.5),
    ],
    SampleMode.TOP_P: [
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.0),
        dict(temperature=0),
        dict(temperature=1.2, top_k=7, top_p=0.6),
        dict(temperature=1.0, top_k=VOCAB + 5),
        dict(temperature=0.5, top_p=0.3, min_p=0.2),
        dict(temperature=2.0, top_k=1),
    ],
}


@pytest.mark.parametrize("mode", list(SampleMode), ids=lambda m: m.value)
def test_static_sampler_picks_the_eager_tokens(mode: SampleMode) -> None:
    gen = torch.Generator().manual_seed(list(SampleMode).index(mode))
    params = MIXES[mode]
    n, padded = len(params), len(params) + 3
    eager_rows, static_rows = _rows(params, seed=50), _rows(params, seed=50)
    assert sample_mode(static_rows) is mode
    buffers = StaticRowParams.allocate(padded, CPU)
    # Spare rows hold another step's parameters: a random row with filters.
    buffers.fill(_rows([dict(temperature=1.5, top_k=2, top_p=0.4)] * padded, seed=7), VOCAB)
    picked = []
    for _ in range(6):
        logits = _logits(padded, gen)
        before = logits.clone()
        eager = Sampler()(logits[:n], eager_rows).token_ids
        buffers.fill(static_rows, VOCAB)
        static = sample_static(logits, buffers, mode)[:n].tolist()
        assert static == eager
        assert torch.equal(logits, before)
        picked.append(static)
    for a, b in zip(eager_rows, static_rows, strict=True):
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    if mode is not SampleMode.GREEDY:  # the noise mattered: some random row left the argmax
        random = [i for i, p in enumerate(params) if p["temperature"] > 0]
        assert any(step[i] != picked[0][i] for step in picked for i in random)


def test_top_p_mode_filters() -> None:
    """Top-k 1 and a tiny top-p keep only the argmax; min-p near 1 too (fp32 logits: no
    ties, which every filter would keep)."""
    gen = torch.Generator().manual_seed(3)
    params = [dict(temperature=5.0, top_k=1, top_p=0.99), dict(temperature=5.0, top_p=1e-4),
              dict(temperature=5.0, min_p=0.999), dict(temperature=0)]  # fmt: skip
    rows = _rows(params, seed=1)
    buffers = StaticRowParams.allocate(len(rows), CPU)
    for _ in range(20):
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 2.5
        buffers.fill(rows, VOCAB)
        assert torch.equal(sample_static(logits, buffers, SampleMode.TOP_P), logits.argmax(-1))


def test_sample_mode_leaves_what_it_cannot_take_to_the_eager_sampler() -> None:
    def mode(*params: dict) -> SampleMode | None:
        return sample_mode(_rows(list(params), seed=0))

    assert mode(dict(temperature=0), dict(temperature=0, top_p=0.5)) is SampleMode.GREEDY
    assert mode(dict(temperature=0.5, min_p=0.1), dict(temperature=0)) is SampleMode.RANDOM
    assert mode(dict(top_p=0.9), dict(top_k=5)) is SampleMode.TOP_P
    # Every random row with top-k: the eager topk of max(k) columns beats a full sort.
    assert mode(dict(top_k=5), dict(top_k=9, top_p=0.9), dict(temperature=0)) is None
    assert mode(dict(temperature=0), dict(temperature=0, repetition_penalty=1.2)) is None
    assert mode(dict(temperature=0), dict(temperature=0, logit_bias={3: 5.0})) is None
    suppressed = _rows([dict(temperature=0)], seed=0)
    suppressed[0].suppressed_token_ids = [2]
    assert sample_mode(suppressed) is None


def test_greedy_rows_leave_their_generator_untouched() -> None:
    rows = _rows([dict(temperature=0), dict(temperature=0.9)], seed=4)
    states = [r.generator.get_state() for r in rows]
    StaticRowParams.allocate(4, CPU).fill(rows, VOCAB)
    assert torch.equal(rows[0].generator.get_state(), states[0])
    assert not torch.equal(rows[1].generator.get_state(), states[1])
