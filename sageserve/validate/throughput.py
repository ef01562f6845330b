"""Section 5: throughput across input sizes, output lengths and concurrency levels.

Each case (input length, output length, concurrency) queues `concurrency` greedy requests
at once (EOS ignored, so every request makes exactly `output length` tokens) and times them
to the end. Engines run with the prefix cache off so a repeated prompt is computed again.
Backends are alternated over rounds (A, B, A, B, ...), each round on a freshly built engine
warmed by one short request, and every figure is reported as median with min and max over
rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.validate.workload import TextSource, generate


@dataclass(frozen=True)
class Case:
    input_len: int
    output_len: int
    concurrency: int

    @property
    def key(self) -> str:
        return f"in{self.input_len}-out{self.output_len}-c{self.concurrency}"


def cases(input_lens: tuple[int, ...], output_lens: tuple[int, ...], conc: tuple[int, ...]):
    """Every combination, smallest first."""
    return [Case(i, o, c) for i in input_lens for o in output_lens for c in conc]


def warm_up(engine: Engine) -> None:
    """One tiny request, so first-call costs (allocations, kernel choices) are not timed."""
    generate(engine, [[1, 2, 3, 4]], SamplingParams(temperature=0, max_new_tokens=2))


def run_case(engine: Engine, case: Case, text: TextSource, offset: int) -> dict[str, float]:
    """One timed run of a case; prompts are distinct spans of the text from `offset`."""
    prompts = [
        text.cycled(offset + i * case.input_len, case.input_len) for i in range(case.concurrency)
    ]
    params = SamplingParams(temperature=0, max_new_tokens=case.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = generate(engine, prompts, params)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    decode_rates = [
        (len(o.token_ids) - 1) / (o.metrics.finished_time - o.metrics.first_token_time)
        for o in outs
        if len(o.token_ids) > 1 and o.metrics.finished_time > o.metrics.first_token_time
    ]
    return {
        "ttft_s": statistics.fmean(o.metrics.time_to_first_token for o in outs),
        "decode_tok_s_per_request": statistics.fmean(decode_rates)
        if decode_rates
        else float("nan"),
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + case.input_len * case.concurrency) / wall,
        "wall_s": wall,
    }


def speedups(summary: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, float]]:
    """Per backend and case: median decode tok/s and total tok/s over the reference's."""
    out: dict[str, dict[str, float]] = {}
    for label, per_case in summary.items():
        if label == reference:
            continue
        out[label] = {}
        for key, s in per_case.items():
            ref = summary[reference][key]
            out[label][key] = {
                "decode": s["decode_tok_s_per_request"]["median"]
                / ref["decode_tok_s_per_request"]["median"],
                "total": s["total_tok_s"]["median"] / ref["total_tok_s"]["median"],
            }
    return out
