"""Sampling over per-row parameters in fixed device buffers: the form a CUDA graph captures.

The eager `Sampler` chooses its work on the host (a top-k of max(k) columns, a sort only
when some row has top-p). A captured graph cannot branch on values, so here each row's
parameters sit in static buffers (`StaticRowParams`) and every filter of the step's mode
runs on every row. A filter a row does not use leaves it alone (k = 0 masks nothing, top-p 1
and min-p 0 keep every token), so each row gets the token `Sampler` picks from the same
logits: the same operations, in the same order, through the same helpers
(tests/test_static_sampler.py compares them).

Modes, one captured graph each per decode batch size (`sample_mode` picks one per step):

    GREEDY  every row greedy: argmax.
    RANDOM  no row has top-k or top-p: temperature, softmax, min-p, the exponential race.
    TOP_P   some row has top-p and some random row has no top-k: one descending sort per
            row gives both the k-th largest logit and the nucleus (Sampler sorts too).

Rows with penalties, a logit bias or suppressed tokens (histories and id lists have no
static shape), and steps whose every random row has top-k without needing a full sort
(Sampler's topk of max(k) columns is cheaper than the graph's sort) are sampled by
`Sampler`: `sample_mode` returns None for them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sageserve.engine.sampler import (
    SamplingRow,
    draw_step_seed,
    exponential_race,
    keep_min_p,
    keep_nucleus,
    keep_top_k,
    top_k_width,
)


class SampleMode(enum.Enum):
    GREEDY = "greedy"
    RANDOM = "random"
    TOP_P = "top_p"


def sample_mode(rows: list[SamplingRow]) -> SampleMode | None:
    """The mode whose graph samples these rows, or None when `Sampler` must."""
    if not all(_static_row(r) for r in rows):
        return None
    random = [r.params for r in rows if not r.params.greedy]
    if not random:
        return SampleMode.GREEDY
    if not any(p.top_k_enabled or p.top_p < 1.0 for p in random):
        return SampleMode.RANDOM
    if any(p.top_p < 1.0 for p in random) and not all(p.top_k_enabled for p in random):
        return SampleMode.TOP_P
    return None


def _static_row(row: SamplingRow) -> bool:
    params = row.params
    no_edits = not (params.has_penalties or params.logit_bias or row.suppressed_token_ids)
    return no_edits and row.generator.device.type == "cpu"


@dataclass
class StaticRowParams:
    """Per-row sampling parameters of one padded batch size, in device buffers.

    floats: [3, bs] float32 (temperature, top_p, min_p); ints: [3, bs] int64 (top-k width
    with 0 = none, this step's noise seed, greedy flag). Rows past the step's count keep
    what an earlier step wrote (valid values); their tokens are never read.
    """

    floats: torch.Tensor
    ints: torch.Tensor

    @classmethod
    def allocate(cls, batch_size: int, device: torch.device) -> StaticRowParams:
        floats = torch.ones(3, batch_size, dtype=torch.float32, device=device)
        floats[2] = 0.0  # min_p 0: keep every token
        ints = torch.zeros(3, batch_size, dtype=torch.int64, device=device)
        ints[2] = 1  # greedy
        return cls(floats, ints)

    def fill(self, rows: list[SamplingRow], vocab: int) -> None:
        """Write rows' parameters into the first len(rows) rows and draw one seed from each
        random row's generator (as `Sampler` does; greedy rows leave theirs untouched)."""
        temperatures = [_temperature(r) for r in rows]
        top_ps = [r.params.top_p for r in rows]
        min_ps = [r.params.min_p for r in rows]
        host_floats = torch.tensor([temperatures, top_ps, min_ps], dtype=torch.float32)
        top_ks = [top_k_width(r.params, vocab) for r in rows]
        seeds = [0 if r.params.greedy else int(draw_step_seed(r.generator)) for r in rows]
        greedy = [int(r.params.greedy) for r in rows]
        host_ints = torch.tensor([top_ks, seeds, greedy], dtype=torch.int64)
        n = len(rows)
        self.floats[:, :n].copy_(host_floats, non_blocking=True)
        self.ints[:, :n].copy_(host_ints, non_blocking=True)


def _temperature(row: SamplingRow) -> float:
    # A greedy row's temperature may be 0; its random branch is computed and discarded.
    return 1.0 if row.params.greedy else row.params.temperature


def sample_static(logits: torch.Tensor, params: StaticRowParams, mode: SampleMode) -> torch.Tensor:
    """[bs] int64 tokens for logits [bs, vocab] float32 (not modified) under params; no
    host sync, no shape that depends on values, so it can be captured in a CUDA graph."""
    greedy_ids = logits.argmax(dim=-1)
    if mode is SampleMode.GREEDY:
        return greedy_ids
    temperature, top_p, min_p = (column.unsqueeze(1) for column in params.floats)
    top_k, seeds, greedy = params.ints
    scaled = logits / temperature
    if mode is SampleMode.TOP_P:
        probs = _top_k_then_nucleus(scaled, top_k.unsqueeze(1), top_p)
    else:
        probs = scaled.softmax(dim=-1)
    race_ids = exponential_race(keep_min_p(probs, min_p), seeds)
    return torch.where(greedy != 0, greedy_ids, race_ids)


def _top_k_then_nucleus(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Probabilities [bs, vocab] after top-k on the scaled logits, then top-p, from one
    sort. Softmax keeps the logits' order, so the probabilities gathered in that order are
    the descending sequence `Sampler` gets from sorting them."""
    ordered_logits, order = scaled.sort(dim=-1, descending=True)
    probs = keep_top_k(scaled, ordered_logits, top_k).softmax(dim=-1)
    return keep_nucleus(probs, probs.gather(1, order), top_p)
