"""Static decode metadata for CUDA graphs: tables at fixed addresses, written in one copy.

A captured graph reads its metadata from the addresses it saw at capture. So a backend
keeps, per captured batch size, one device buffer holding every table its decode kernels
read (`forward` sees views of it) and a host mirror of the same layout: a step writes its
rows into the mirror (`write_decode_rows`), then `upload` copies it with one host-to-device
copy. Rows past the step's sequences are padding: no pages, kv_len 0 (the decode kernels
give zeros for an empty context), and a new token that is not stored.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sageserve.attention.batch import ForwardBatch

# Views start at multiples of this many bytes: every dtype's view is aligned, and Triton
# sees the same 16-byte pointer alignment as for separately allocated tensors (it compiles
# a kernel variant per alignment).
_ALIGN = 16


class StaticBuffers:
    """Named tensors of fixed shapes and dtypes packed into one device buffer.

    device[name]: the device view (what kernels read); host[name]: the numpy view of the
    host mirror (what a step writes). upload() copies the whole mirror in one copy.
    """

    def __init__(
        self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
    ) -> None:
        spans, total = {}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            spans[name] = (total, nbytes)
            total += -(-nbytes // _ALIGN) * _ALIGN
        self._host = torch.zeros(total, dtype=torch.uint8)
        self._device = torch.zeros(total, dtype=torch.uint8, device=device)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            start, nbytes = spans[name]
            self.host[name] = self._host[start : start + nbytes].view(dtype).view(shape).numpy()
            self.device[name] = self._device[start : start + nbytes].view(dtype).view(shape)

    def upload(self) -> None:
        """Copy the host mirror to the device buffer (asynchronous: the source is staged by
        the driver before the call returns, so the mirror may be rewritten at once)."""
        self._device.copy_(self._host, non_blocking=True)


def write_decode_rows(
    batch: ForwardBatch, page_table: np.ndarray, kv_len: np.ndarray
) -> np.ndarray:
    """Write a decode-only batch into host tables of a padded batch size.

    page_table: [bs, W] int32, row i = seqs[i]'s pages then the null page (0); padding rows
    all null. kv_len: [bs] int32, 0 on padding rows. Returns [num_seqs] int64: the slot of
    each sequence's new token (page * page_size + offset), for the backend's store table.
    """
    page_size, n = batch.page_size, batch.num_seqs
    page_table.fill(0)
    slots = np.empty(n, dtype=np.int64)
    for i, seq in enumerate(batch.seqs):
        used = -(-seq.kv_len // page_size)
        page_table[i, :used] = seq.page_table[:used]
        pos = seq.kv_len - 1
        slots[i] = seq.page_table[pos // page_size] * page_size + pos % page_size
        kv_len[i] = seq.kv_len
    kv_len[n:] = 0
    return slots


def table_width(max_context: int, page_size: int, key_align: int) -> int:
    """Pages per page-table row covering max_context keys rounded up to key_align (the
    padding the kernels' unmasked page-table reads rely on)."""
    return -(-(-(-max_context // key_align) * key_align) // page_size)
