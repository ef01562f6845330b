"""The varlen kernel's host-side work plan and per-consumer block ranges.

`work_plan`: [items, 3] int32 (sequence, first row of a 128-row tile in its chunk, query
head), longest work first (`tile_work`). `_consumer_blocks`: plain Python, the selfcheck's
model and (wrapped by `gluon.jit` in `lab.gluon_ws.varlen`) the kernel's formula.
`_last_key_model`: the kernel's `_last_keys` in Python.
"""

from __future__ import annotations

import torch

from lab.gluon_ws.config import TILE


def _consumer_blocks(q_len, kv_len, first_row, wg, causal, rows_per_wg, block_n):
    """(n, full) of consumer wg in a work item: it runs key blocks 0 .. n - 1 (n = 0 when
    none of its rows first_row + wg * rows_per_wg .. + rows_per_wg - 1 is < q_len; else
    n >= 2), blocks 0 .. full - 1 unmasked (full <= n).

    Causal: its last real row hi sees keys up to prefix + hi, its first row lo sees blocks
    0 .. (prefix + lo + 1) // block_n - 1 whole. Non-causal: kv_len keys, kv_len // block_n
    whole blocks. Plain Python on ints (the `--selfcheck` model) and, wrapped by
    `gluon.jit` as `_consumer_blocks_gl`, the kernel's formula on int32 scalars: ternaries
    only (a runtime condition becomes an scf.if) and floor divisions of non-negative values.
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


def _last_key_model(row: int, q_len: int, kv_len: int, causal: bool) -> int:
    """The last key row `row` of a chunk sees: `_last_keys` in Python (selfcheck)."""
    return min(row + kv_len - q_len, kv_len - 1) if causal else kv_len - 1


def tile_work(q_len: int, kv_len: int, first_row: int, causal: bool) -> int:
    """Keys the tile's last real row sees (causal), or kv_len: the plan's sort key."""
    last_row = min(first_row + TILE, q_len) - 1
    return kv_len - q_len + last_row + 1 if causal else kv_len


def work_plan(q_lens: list[int], kv_lens: list[int], heads: int, causal: bool) -> torch.Tensor:
    """[items, 3] int32 on the host: (sequence, first row of the 128-row tile in its chunk,
    query head) for every tile of every sequence (the last one partial) and head, tiles
    longest work first (`tile_work`; ties in sequence order), the heads of a tile adjacent
    (GQA groups share K/V in L2). A persistent grid takes items round-robin: each program
    gets an even share of long and short tiles."""
    tiles = [(tile_work(q, kv, r, causal), seq, r)
             for seq, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True))
             for r in range(0, q, TILE)]  # fmt: skip
    tiles.sort(key=lambda t: -t[0])
    items = [(seq, r, h) for _, seq, r in tiles for h in range(heads)]
    return torch.tensor(items, dtype=torch.int32).view(-1, 3)
