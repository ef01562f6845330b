"""Sizes that CUDA graphs are captured for, and the rules that pad a step to one.

Decode graphs are captured per batch size (one token per sequence); piecewise graphs, for
steps with prefill, per token count (`padded_token_count`).

A decode step of n sequences replays the graph captured for `padded_batch_size(n)` rows.
The split-KV decode kernels choose their split count from the batch size, and a different
split count sums the keys in a different order: so the backends plan every decode, eager
ones included, for the padded size. A decode step then computes the same attention,
bitwise, whether it replays a graph or runs eagerly (`--disable-cuda-graph`, mixed steps).

Sizes: 1, 2, 4, 8, then multiples of 8 up to 64, of 16 up to 256, of 32 beyond. Padding
wastes at most 7 rows where decode batches are small and host-bound, and few graphs are
captured (11 up to 64).
"""

from __future__ import annotations


def padded_batch_size(batch_size: int) -> int:
    """The smallest graph batch size >= batch_size (the sizes go on past any limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size <= 8:
        return 1 << (batch_size - 1).bit_length()
    step = 8 if batch_size <= 64 else 16 if batch_size <= 256 else 32
    return -(-batch_size // step) * step


def graph_batch_sizes(limit: int) -> list[int]:
    """Every graph batch size <= limit, ascending: what is captured for `limit`."""
    sizes: list[int] = []
    size = 1
    while size <= limit:
        sizes.append(size)
        size = padded_batch_size(size + 1)
    return sizes


# Piecewise graphs: powers of two up to this many tokens, multiples of it beyond.
_TOKEN_STEP = 64
_FIRST_TOKEN_COUNT = 16


def padded_token_count(num_tokens: int) -> int:
    """The smallest piecewise-graph token count >= num_tokens: 16, 32, 64, then multiples of
    64. Padding rows cost the GEMMs little while they are bound by reading the weights (a
    few hundred rows on current GPUs) and at most 1/5 of the rows beyond 256 tokens."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_tokens <= _TOKEN_STEP:
        return max(_FIRST_TOKEN_COUNT, 1 << (num_tokens - 1).bit_length())
    return -(-num_tokens // _TOKEN_STEP) * _TOKEN_STEP


def piecewise_token_counts(limit: int) -> list[int]:
    """Every piecewise-graph token count <= limit, ascending: what is captured for `limit`."""
    counts: list[int] = []
    count = _FIRST_TOKEN_COUNT
    while count <= limit:
        counts.append(count)
        count = padded_token_count(count + 1)
    return counts
