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


def int32_on_device(
    parts: list[np.ndarray | list[int]], device: torch.device
) -> list[torch.Tensor]:
    """Several int32 arrays in one host-to-device copy: views of one buffer, shapes kept."""
    arrays = [np.asarray(part, dtype=np.int32) for part in parts]
    buf = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
    buf = buf.to(device, non_blocking=True)
    views = torch.split(buf, [a.size for a in arrays])
    return [view.view(a.shape) for view, a in zip(views, arrays, strict=True)]


def padded_page_table(
    tables: list[tuple[int, ...]], kv_lens: list[int], page_size: int, device: torch.device
) -> torch.Tensor:
    """[B, width] int32 on `device`: each sequence's pages, then the null page (0) up to a
    width that covers max(kv_lens) rounded up to KEY_ALIGN tokens (see KEY_ALIGN)."""
    table = padded_tables(tables, kv_lens, page_size)
    return torch.from_numpy(table).to(device, non_blocking=True)
