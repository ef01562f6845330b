"""The work plan of the warp-specialized prefill, on the host and as the kernel reads it.

`work_plan`: [items, 3] int32 (sequence, first row of a 128-row tile in its chunk, query
head), longest work first (`tile_work`). `consumer_blocks`: each consumer's key blocks in an
item, plain Python on ints: the kernel runs the same function (`gluon.jit`-wrapped), and
the tests check it against brute force. `_plan_item`, `_item_blocks`: the kernel's
reading of an item.
"""

from __future__ import annotations

import numpy as np
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from sageserve.attention.sage_attn.kernels.gluon.config import BLOCK_M, TILE


def consumer_blocks(q_len, kv_len, first_row, wg, causal, rows_per_wg, block_n):
    """(n, full) of consumer wg in a work item: it runs key blocks 0 .. n - 1 (n = 0 when
    none of its rows first_row + wg * rows_per_wg .. + rows_per_wg - 1 is < q_len; else
    n >= 2), blocks 0 .. full - 1 unmasked (full <= n).

    Causal: its last real row hi sees keys up to prefix + hi, its first row lo sees blocks
    0 .. (prefix + lo + 1) // block_n - 1 whole. Non-causal: kv_len keys, kv_len // block_n
    whole blocks. Ternaries only (in the kernel a runtime condition becomes an scf.if) and
    floor divisions of non-negative values, so Python ints and int32 scalars agree.
    """
    lo = first_row + wg * rows_per_wg
    hi = lo + rows_per_wg - 1 if lo + rows_per_wg <= q_len else q_len - 1
    prefix = kv_len - q_len
    key_end = prefix + hi + 1 if causal else kv_len
    full = (prefix + lo + 1) // block_n if causal else kv_len // block_n
    last = (key_end - 1) // block_n
    n = (last + 1 if last >= 1 else 2) if lo < q_len else 0
    full = full if lo < q_len else 0
    return n, full


def last_key(row: int, q_len: int, kv_len: int, causal: bool) -> int:
    """The last key that row `row` of a chunk sees (the kernel's `_last_keys`): prefix + row
    capped at kv_len - 1 (padding rows), or kv_len - 1."""
    return min(row + kv_len - q_len, kv_len - 1) if causal else kv_len - 1


def tile_work(q_len, kv_len, first_row, causal: bool):
    """Keys the tile's last real row sees (causal), or kv_len: the plan's sort key. Ints or
    numpy arrays."""
    last_row = np.minimum(first_row + TILE, q_len) - 1
    return kv_len - q_len + last_row + 1 if causal else kv_len + 0 * first_row


def work_plan(q_lens: list[int], kv_lens: list[int], heads: int, causal: bool) -> np.ndarray:
    """[items, 3] int32: (sequence, first row of the 128-row tile in its chunk, query head)
    for every tile of every sequence (the last one partial) and head; tiles longest work
    first (`tile_work`; ties in sequence and row order), the heads of a tile adjacent (GQA
    groups share K/V in L2). A persistent grid takes items round-robin: each program gets
    an even share of long and short tiles. Vectorized: ~16k items per step at 64 × 1k
    prompts and 32 heads."""
    q = np.asarray(q_lens, dtype=np.int64)
    kv = np.asarray(kv_lens, dtype=np.int64)
    tiles = -(-q // TILE)
    seq = np.repeat(np.arange(q.size), tiles)
    first = (np.arange(seq.size) - np.repeat(np.cumsum(tiles) - tiles, tiles)) * TILE
    order = np.argsort(-tile_work(q[seq], kv[seq], first, causal), kind="stable")
    plan = np.empty((seq.size * heads, 3), dtype=np.int32)
    plan[:, 0] = np.repeat(seq[order], heads)
    plan[:, 1] = np.repeat(first[order], heads)
    plan[:, 2] = np.tile(np.arange(heads), seq.size)
    return plan


_consumer_blocks_jit = gluon.jit(consumer_blocks)


@gluon.jit
def _item_blocks(q_len, kv_len, first_row, WG: gl.constexpr, CAUSAL: gl.constexpr,
                 BLOCK_KEYS: gl.constexpr):  # fmt: skip
    """(n, full, loaded) of consumer WG in a work item over blocks of BLOCK_KEYS keys (see
    `consumer_blocks`); loaded = max over both consumers: the blocks the producer loads and
    each consumer's turns."""
    n0, full0 = _consumer_blocks_jit(q_len, kv_len, first_row, 0, CAUSAL, BLOCK_M, BLOCK_KEYS)
    n1, full1 = _consumer_blocks_jit(q_len, kv_len, first_row, 1, CAUSAL, BLOCK_M, BLOCK_KEYS)
    loaded = gl.maximum(n0, n1)
    if WG == 0:
        return n0, full0, loaded
    else:
        return n1, full1, loaded


@gluon.jit
def _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w):
    """(sequence, first row of the tile in its chunk, query head, q_len, kv_len) of item w;
    plan: [items, 3] int32."""
    item = plan_ptr + 3 * w
    seq = gl.load(item)
    return (
        seq,
        gl.load(item + 1),
        gl.load(item + 2),
        gl.load(q_len_ptr + seq),
        gl.load(kv_len_ptr + seq),
    )
