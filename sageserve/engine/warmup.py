"""Warm-up before serving: run the kinds of steps the first requests would run, so that
Triton compiles its kernel variants and cuBLAS picks its GEMMs before the first user waits.

Triton compiles a kernel for each new specialization of its integer arguments (1, multiples
of 16, anything else) and constexprs; the steps below cover them for every step kind the
scheduler makes: a prefill of several sequences of mixed lengths (1, 7, 16, 200 tokens),
decode steps of that batch, a prompt longer than two chunks (chunked prefill over a cached
prefix), a prefix-cache hit, and decode steps of 2 and 4 requests (the small-batch GEMV
compiles a variant per power of two of rows up to its MAX_ROWS: eager decode steps, without
CUDA graphs, need them as the graph buckets do); with a prefill cap while decoding, a
prompt of two capped chunks and a rest arriving while 1, 7 and 16 requests decode (chunks
over a cached prefix beside decode rows: the steps that cap makes). Then steps of 64, 128,
... tokens up to the step's token budget (one chunk), each alone: cuBLAS chooses a GEMM
kernel by the number of rows (the step's tokens), the KV store its launch configuration by
the same count, and CUDA loads a kernel's module the first time it runs (lazy loading, the
default), so a step size the warm-up never ran could pay that on a user's request. A step
longer than the context is several prompts at once: concurrent requests fill the budget
whatever the context length (a 1024-token context with a 2048-token budget left the store's
widest launch to the first burst of requests, on an H100).
Prompts are random token ids from a fixed seed, greedy, with their own seed, so the engine's
seed stream is untouched; they stream (an output every step, as for a server's requests);
the prefix cache is flushed afterwards.

It runs on the thread that will drive the engine: libraries keep per-thread state that a
thread's first call creates (PyTorch's cuBLAS handle, for one), so the server's engine
thread runs it (`Engine(..., warm_up_now=False)`, then `Engine.warm_up` on that thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sageserve.engine.sampling_params import SamplingParams
from sageserve.launch_math import cdiv
from sageserve.layers.fused.gemv import MAX_ROWS as GEMV_MAX_ROWS

if TYPE_CHECKING:
    from sageserve.engine.engine import Engine

MIXED_LENGTHS = (1, 7, 16, 200)
NEW_TOKENS = 3
CACHE_HIT_EXTRA = 17
FIRST_ALONE_LENGTH = 64  # the mixed batch covers shorter steps
DECODING_COUNTS = (1, 7, 16)  # decode rows beside a capped chunk: one, odd, a multiple of 16
# The GEMV's tile rows past one (layers/fused/gemv.py): powers of two up to its MAX_ROWS.
DECODE_WIDTHS = tuple(2**i for i in range(1, GEMV_MAX_ROWS.bit_length()))
DECODE_WIDTH_LENGTH = 5


def warmup_batches(engine: Engine) -> list[list[list[int]]]:
    """Batches of prompts, queued one batch at a time; lengths fit the context and pool."""
    info = engine.info
    longest = min(info.context_length, info.pool_capacity_tokens) - NEW_TOKENS
    prompt = _prompt_maker(info.vocab_size, seed=0)

    mixed = [prompt(n) for n in MIXED_LENGTHS if n * len(MIXED_LENGTHS) <= longest]
    batches = [mixed]
    long_len = 2 * info.chunked_prefill_size + 5
    if long_len <= longest:
        batches.append([prompt(long_len)])
    if mixed and len(mixed[-1]) + CACHE_HIT_EXTRA <= longest:
        batches.append([mixed[-1] + prompt(CACHE_HIT_EXTRA)])
    for width in DECODE_WIDTHS:
        if width * (DECODE_WIDTH_LENGTH + NEW_TOKENS) <= info.pool_capacity_tokens:
            batches.append([prompt(DECODE_WIDTH_LENGTH) for _ in range(width)])
    room = info.pool_capacity_tokens - NEW_TOKENS * cdiv(info.chunked_prefill_size, longest)
    for n in _gemm_row_counts(min(info.chunked_prefill_size, room)):
        batches.append([prompt(length) for length in _split(n, longest)])
    return [batch for batch in batches if batch]


def _split(tokens: int, longest: int) -> list[int]:
    """Prompt lengths of at most `longest` that add up to `tokens`."""
    return [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])


def _gemm_row_counts(limit: int) -> list[int]:
    """Powers of two from FIRST_ALONE_LENGTH up to `limit` tokens, and `limit` itself (the
    widest step, whatever its size)."""
    counts, n = [], FIRST_ALONE_LENGTH
    while n <= limit:
        counts.append(n)
        n *= 2
    if counts and counts[-1] != limit:
        counts.append(limit)
    return counts


def warm_up(engine: Engine) -> int:
    """Run the warm-up batches to completion; returns the number of requests run."""
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=0)
    count = 0
    for batch in warmup_batches(engine):
        for prompt in batch:
            engine.add_request(prompt, params, stream=True)
        _run_to_completion(engine)
        count += len(batch)
    for decoders, late in prompts_beside_decodes(engine):
        count += _prefill_beside_decodes(engine, decoders, late)
    engine.flush_prefix_cache()
    return count


def prompts_beside_decodes(engine: Engine) -> list[tuple[list[list[int]], list[int]]]:
    """(prompts that decode, a prompt arriving while they do) for 1, 7 and 16 decoding
    requests; the late prompt spans two capped chunks and a short rest. Empty without a
    prefill cap while decoding, or when the pool or context cannot hold them."""
    info = engine.info
    cap = info.max_prefill_tokens_while_decoding
    late_len = 2 * (cap or 0) + CACHE_HIT_EXTRA
    room = min(info.context_length, info.pool_capacity_tokens) - NEW_TOKENS
    if not cap or late_len > room or late_len + 16 * 2 * NEW_TOKENS > info.pool_capacity_tokens:
        return []
    prompt = _prompt_maker(info.vocab_size, seed=1)

    return [([prompt(NEW_TOKENS) for _ in range(n)], prompt(late_len)) for n in DECODING_COUNTS]


def _prefill_beside_decodes(engine: Engine, decoders: list[list[int]], late: list[int]) -> int:
    """Start the decoders, queue the late prompt once they decode, run to completion. The
    decoders generate until the late prompt's chunks are done."""
    steps = -(-len(late) // engine.info.max_prefill_tokens_while_decoding) + NEW_TOKENS
    params = SamplingParams(temperature=0, max_new_tokens=steps, ignore_eos=True, seed=0)
    for prompt in decoders:
        engine.add_request(prompt, params, stream=True)
    engine.step()
    engine.add_request(late, params, stream=True)
    _run_to_completion(engine)
    return len(decoders) + 1


def _prompt_maker(vocab_size: int, seed: int) -> Callable[[int], list[int]]:
    """n -> n random token ids, from a generator of its own (the engine's seeds untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda n: torch.randint(0, vocab_size, (n,), generator=generator).tolist()


def _run_to_completion(engine: Engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()
