"""Teacher-forced next-token log-probabilities through the engine's own serving path.

The model runner, the attention backend and its paged KV cache are exactly those that serve
requests, so what is measured is what is served: for a backend with an 8-bit cache, keys
and values of earlier chunks are read back from that cache, through the backend's
cached-prefix path, when a sequence is longer than one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.engine.engine import Engine


def _check_tokens(engine: Engine, token_ids: Sequence[int]) -> None:
    n = len(token_ids)
    if n < 2:
        raise ValueError(f"teacher forcing needs at least 2 tokens, got {n}")
    if n - 1 > engine.max_model_len:
        raise ValueError(
            f"{n} tokens exceed the context length {engine.max_model_len} (+1 target token)"
        )
    vocab = engine.model_config.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    needed = engine.block_manager.pages_needed(n - 1)
    if needed > engine.block_manager.num_free_pages:
        raise ValueError(
            f"{n - 1} tokens need {needed} KV pages; only "
            f"{engine.block_manager.num_free_pages} are free; raise --max-total-tokens"
        )


def teacher_forced_logprobs(engine: Engine, token_ids: Sequence[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits at positions 0 .. n-2.

    token_ids: n >= 2 token ids. Returns [n - 1, vocab] float32 on the CPU; row i scores
    token i + 1 given tokens 0 .. i. Tokens are fed in chunks of
    `engine.config.scheduler.chunked_prefill_size`, each after the cached prefix of the
    earlier ones, as the scheduler would. The engine must be idle; its pages are borrowed
    from the block manager and given back (also on error), never entered in the prefix cache.
    """
    assert not engine.has_unfinished_requests(), "teacher forcing needs an idle engine"
    _check_tokens(engine, token_ids)
    inputs = [int(t) for t in token_ids[:-1]]  # the last token is only a target
    pages = engine.block_manager.allocate(engine.block_manager.pages_needed(len(inputs)))
    try:
        return _forward_chunks(engine, inputs, pages)
    finally:
        engine.block_manager.free(pages)


@torch.no_grad()
def _forward_chunks(engine: Engine, inputs: list[int], pages: list[int]) -> torch.Tensor:
    """[len(inputs), vocab] float32 CPU log-probabilities, one runner step per chunk."""
    chunk = engine.config.scheduler.chunked_prefill_size
    page_size = engine.runner.page_size
    out = torch.empty(len(inputs), engine.model_config.vocab_size, dtype=torch.float32)
    for start in range(0, len(inputs), chunk):
        ids = inputs[start : start + chunk]
        end = start + len(ids)
        # Only the pages this chunk's keys reach, as the scheduler would give them.
        table = tuple(pages[: engine.block_manager.pages_needed(end)])
        seq = SequenceSlice(page_table=table, prefix_len=start, query_len=len(ids))
        batch = build_forward_batch([seq], [ids], list(range(len(ids))), page_size, engine.device)
        logits = engine.runner.forward(batch)  # [len(ids), vocab]
        out[start:end] = torch.log_softmax(logits.float(), dim=-1).cpu()
    return out
