"""Teacher-forced next-token log-probabilities through the engine's own serving path.

The model runner, the attention backend and its paged KV cache are exactly those that serve
requests, so what is measured is what is served: for a backend with an 8-bit cache, keys
and values of earlier chunks are read back from that cache, through the backend's
cached-prefix path, when a sequence is longer than one chunk. `Engine.teacher_forced_logprobs`
borrows the pages from the block manager (`borrowed_pages`) and feeds the chunks
(`forward_chunks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from sageserve.attention.batch import ForwardBatch, SequenceSlice, build_forward_batch
from sageserve.engine.block_manager import BlockManager


def check_scorable(
    token_ids: Sequence[int], context_length: int, vocab_size: int, block_manager: BlockManager
) -> None:
    """ValueError unless `token_ids` can be scored: at least 2 ids, all in the vocabulary,
    and n - 1 inputs that fit the context length and the free pages."""
    n = len(token_ids)
    if n < 2:
        raise ValueError(f"teacher forcing needs at least 2 tokens, got {n}")
    if n - 1 > context_length:
        raise ValueError(f"{n} tokens exceed the context length {context_length} (+1 target token)")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    needed = block_manager.pages_needed(n - 1)
    if needed > block_manager.num_free_pages:
        raise ValueError(
            f"{n - 1} tokens need {needed} KV pages; only "
            f"{block_manager.num_free_pages} are free; raise --max-total-tokens"
        )


@contextmanager
def borrowed_pages(block_manager: BlockManager, num_tokens: int) -> Iterator[list[int]]:
    """Pages for `num_tokens` tokens, given back on exit (also on error); they never enter
    the prefix cache."""
    pages = block_manager.allocate(block_manager.pages_needed(num_tokens))
    try:
        yield pages
    finally:
        block_manager.free(pages)


@torch.no_grad()
def forward_chunks(
    forward: Callable[[ForwardBatch], torch.Tensor],
    inputs: list[int],
    pages: list[int],
    chunk_size: int,
    block_manager: BlockManager,
    device: torch.device,
    vocab_size: int,
) -> torch.Tensor:
    """[len(inputs), vocab] float32 CPU log-probabilities, one forward step per chunk.

    Chunk k holds inputs [k * chunk_size, (k + 1) * chunk_size), computed after the cached
    prefix of the earlier chunks, as the scheduler would feed them. `forward` maps a
    ForwardBatch to its logits, [chunk tokens, vocab].
    """
    page_size = block_manager.page_size
    out = torch.empty(len(inputs), vocab_size, dtype=torch.float32)
    for start in range(0, len(inputs), chunk_size):
        ids = inputs[start : start + chunk_size]
        end = start + len(ids)
        # Only the pages this chunk's keys reach, as the scheduler would give them.
        table = tuple(pages[: block_manager.pages_needed(end)])
        seq = SequenceSlice(page_table=table, prefix_len=start, query_len=len(ids))
        batch = build_forward_batch([seq], [ids], list(range(len(ids))), page_size, device)
        logits = forward(batch)  # [len(ids), vocab]
        out[start:end] = torch.log_softmax(logits.float(), dim=-1).cpu()
    return out
