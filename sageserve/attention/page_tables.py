"""Page tables for the Triton kernels, built on the host: one row per sequence, padded with
the null page (0) so that the kernels read them without masks (see
`triton_common.KEY_ALIGN`), and uploaded in one host-to-device copy."""

from __future__ import annotations

import numpy as np
import torch

from sageserve.attention.triton_common import KEY_ALIGN


def padded_tables(tables: list[tuple[int, ...]], kv_lens: list[int], page_size: int) -> np.ndarray:
    """[B, width] int32: each sequence's used pages, then the null page (0) up to a width
    covering max(kv_lens) rounded up to KEY_ALIGN tokens. Filled row by row in numpy: a
    Python list of B x width ints costs ~4x more host time at B = 256, 8k contexts."""
    aligned = -(-max(kv_lens) // KEY_ALIGN) * KEY_ALIGN
    out = np.zeros((len(tables), -(-aligned // page_size)), dtype=np.int32)
    for row, table, kv_len in zip(out, tables, kv_lens, strict=True):
        used = -(-kv_len // page_size)
        row[:used] = table[:used]
    return out


# Each array starts at a multiple of this many int32s (16 bytes) in the shared buffer.
ALIGN_ELEMENTS = 4


def int32_on_device(
    parts: list[np.ndarray | list[int]], device: torch.device
) -> list[torch.Tensor]:
    """Several int32 arrays in one host-to-device copy: views of one buffer, shapes kept.

    Every view starts 16-byte aligned. Triton specializes a pointer argument on whether it
    is: packed back to back, a view's alignment would follow the lengths before it (the
    step's batch), and a batch the warm-up never made would compile a kernel variant while
    serving."""
    arrays = [np.asarray(part, dtype=np.int32).ravel() for part in parts]
    slots = [-(-max(a.size, 1) // ALIGN_ELEMENTS) * ALIGN_ELEMENTS for a in arrays]
    host = np.zeros(sum(slots), dtype=np.int32)
    starts = np.cumsum([0, *slots[:-1]])
    for start, a in zip(starts, arrays, strict=True):
        host[start : start + a.size] = a
    buf = torch.from_numpy(host).to(device, non_blocking=True)
    views = [buf[start : start + a.size] for start, a in zip(starts, arrays, strict=True)]
    shapes = [np.shape(part) for part in parts]
    return [view.view(shape) for view, shape in zip(views, shapes, strict=True)]


def padded_page_table(
    tables: list[tuple[int, ...]], kv_lens: list[int], page_size: int, device: torch.device
) -> torch.Tensor:
    """[B, width] int32 on `device`: each sequence's pages, then the null page (0) up to a
    width that covers max(kv_lens) rounded up to KEY_ALIGN tokens (see KEY_ALIGN)."""
    table = padded_tables(tables, kv_lens, page_size)
    return torch.from_numpy(table).to(device, non_blocking=True)
