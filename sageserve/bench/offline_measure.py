"""One point of `sageserve bench offline`: a batch of equal requests through the engine,
timed step by step, and the memory-bandwidth bound of its decode steps.

A point (batch B, input I, output O) runs in two passes on an idle engine whose prefix
cache was emptied. Timestamps are the engine's own (`RequestMetrics`, time.monotonic),
taken after each step's tokens reached the host.

Requests sample greedily, or with `--sampling top-p` (SAMPLING: temperature 0.8, top-p
0.95, seeded), EOS ignored.

1. Prefill: B requests of I random token ids, one output token each, queued at once.
   prefill_s: queueing -> the last request's first token (every prompt prefilled, in
   chunks of --chunked-prefill-size); ttft_s: the median request's queueing -> first token.
2. Decode: the same prompts again, O tokens each (EOS ignored). Their pages are in the
   prefix cache, so every request's first token comes within a step or two and the batch
   then decodes together (with one pass, chunked prefill would stagger the requests and a
   large batch would never decode whole). decode_tok_s: B * (O - 1) tokens over the span from
   the earliest first token to the last finish (`decode_rate`); decode_step_ms: B /
   decode_tok_s. Requests whose first tokens land a step apart make that span a step longer,
   so a point with few output tokens understates decode (never overstates it: the sum of
   per-request rates it replaced read 122% of the bound at 64 x 8k with O = 2 on an H100,
   because each request's one decode step ran beside fewer sequences than B).
3. Whole batch (`--whole-batch`, run first, on fresh prompts): B requests of I
   tokens, O tokens each, queued at once on an emptied cache, as `LLM.generate` runs a
   batch: the requests whose prompts are done decode while the rest prefill (under the
   prefill cap while decoding, when the engine has one). generate_s: queueing -> the last
   request finished; generate_tok_s: B * O / generate_s.
- bound: a decode step must read the weights once (`MemoryUsage.step_weight_bytes`) and the
  K/V of every sequence; at the mean context I + O/2 that is
  bytes = step_weight_bytes + B * (I + O/2) * kv_bytes_per_token, and at the device's
  measured copy bandwidth it cannot take less than bytes / bandwidth:
  bound_tok_s = B * bandwidth / bytes. fraction = decode_tok_s / bound_tok_s.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from sageserve.engine.engine import Engine
from sageserve.engine.info import MemoryUsage
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams

# The requests' sampling, by `--sampling` name (max_new_tokens and ignore_eos set per pass).
SAMPLING = {
    "greedy": SamplingParams(temperature=0),
    "top-p": SamplingParams(temperature=0.8, top_p=0.95, seed=0),
}


@dataclass(frozen=True)
class GridPoint:
    """B requests of I prompt tokens, each generating O tokens."""

    batch: int
    input_len: int
    output_len: int

    @property
    def key(self) -> str:
        return f"b{self.batch}-in{self.input_len}-out{self.output_len}"

    def tokens_needed(self) -> int:
        """KV pool tokens the point holds at its end (every request at full length)."""
        return self.batch * (self.input_len + self.output_len)


def decode_bound(point: GridPoint, memory: MemoryUsage, copy_gb_per_s: float) -> dict[str, float]:
    """The decode bound of a point (see the module docstring): bytes per step, the
    fastest step those bytes allow at the copy bandwidth, and the tokens/s that gives."""
    mean_context = point.input_len + point.output_len / 2
    kv_bytes = point.batch * mean_context * memory.kv_bytes_per_token
    step_bytes = memory.step_weight_bytes + kv_bytes
    min_step_s = step_bytes / (copy_gb_per_s * 1e9)
    return {
        "step_bytes": step_bytes,
        "weight_bytes": float(memory.step_weight_bytes),
        "kv_bytes": kv_bytes,
        "min_step_ms": min_step_s * 1e3,
        "bound_tok_s": point.batch / min_step_s,
    }


def random_prompts(point: GridPoint, vocab: int, generator: torch.Generator) -> list[list[int]]:
    """B prompts of I token ids drawn uniformly from the vocabulary (never all equal)."""
    ids = torch.randint(0, vocab, (point.batch, point.input_len), generator=generator)
    return ids.tolist()


def run_point(
    engine: Engine,
    point: GridPoint,
    generator: torch.Generator,
    whole_batch: bool = False,
    sampling: SamplingParams = SAMPLING["greedy"],
) -> dict[str, float]:
    """The passes of `point` on an idle engine; its figures (module docstring). whole_batch:
    the whole-batch pass first; sampling: the requests' parameters (one of SAMPLING)."""
    figures = _whole_batch(engine, point, generator, sampling) if whole_batch else {}
    engine.flush_prefix_cache()
    prompts = random_prompts(point, engine.info.vocab_size, generator)
    start = time.monotonic()
    prefilled = _generate(engine, prompts, 1, sampling)
    firsts = [out.metrics.first_token_time - start for out in prefilled]
    decoded = _generate(engine, prompts, point.output_len, sampling)
    decode_tok_s = decode_rate(decoded, point.output_len)
    return figures | {
        "prefill_s": max(firsts),
        "ttft_s": statistics.median(firsts),
        "decode_tok_s": decode_tok_s,
        "decode_step_ms": point.batch / decode_tok_s * 1e3,
        "decode_cached_tokens": float(min(out.num_cached_tokens for out in decoded)),
    }


def decode_rate(outputs: list[RequestOutput], output_len: int) -> float:
    """Decoded tokens per second of finished requests that each generated `output_len`
    tokens: every token after the first, over the earliest first token -> the last finish."""
    start = min(out.metrics.first_token_time for out in outputs)
    end = max(out.metrics.finished_time for out in outputs)
    return len(outputs) * (output_len - 1) / (end - start)


def _whole_batch(
    engine: Engine, point: GridPoint, generator: torch.Generator, sampling: SamplingParams
) -> dict[str, float]:
    """Pass 3 (module docstring): fresh prompts, O tokens each, queued at once."""
    engine.flush_prefix_cache()
    prompts = random_prompts(point, engine.info.vocab_size, generator)
    start = time.monotonic()
    outputs = _generate(engine, prompts, point.output_len, sampling)
    seconds = max(out.metrics.finished_time for out in outputs) - start
    return {"generate_s": seconds, "generate_tok_s": point.batch * point.output_len / seconds}


def _generate(
    engine: Engine, prompts: list[list[int]], new_tokens: int, sampling: SamplingParams
) -> list[RequestOutput]:
    """Every prompt's finished output (exactly `new_tokens` tokens), in order."""
    params = dataclasses.replace(sampling, max_new_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request(prompt, params, stream=False) for prompt in prompts]
    finished: dict[str, RequestOutput] = {}
    while len(finished) < len(ids):
        if not engine.has_unfinished_requests():
            raise RuntimeError("the engine went idle before the point's requests finished")
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    outputs = [finished[i] for i in ids]
    if any(len(out.token_ids) != new_tokens for out in outputs):
        raise RuntimeError(f"a request did not make exactly {new_tokens} tokens")
    return outputs


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median, min and max of every figure over the rounds."""
    return {
        name: {
            "median": statistics.median(r[name] for r in runs),
            "min": min(r[name] for r in runs),
            "max": max(r[name] for r in runs),
        }
        for name in runs[0]
    } | {"rounds": len(runs)}
