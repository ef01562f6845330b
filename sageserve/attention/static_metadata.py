"""Static decode metadata for CUDA graphs: tables at fixed addresses, written in one copy.

A captured graph reads its metadata from the addresses it saw at capture. So a backend
keeps, per captured batch size, one device buffer holding every table its decode kernels
read (`forward` sees views of it) and a host mirror of the same layout: a step writes its
rows into the mirror (`write_decode_rows`), then `upload` sends it. Rows past the step's
sequences are padding: no pages, kv_len 0 (the decode kernels give zeros for an empty
context), and a new token that is not stored.

The page table ([bs, W], W covering the longest context: 512 KB at 64 rows of 128k tokens)
stays on the device and is patched: `upload` sends only the entries that differ from what
the device holds (from one step to the next, the rows that entered a new page), as (index,
value) pairs inside the one copy of the small tables, and one scatter applies them. When
more entries changed than the patch area holds (the batch's rows were reshuffled), the
whole buffer goes in one copy instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sageserve.attention.batch import ForwardBatch

# Patch entries per row of a patched page table: a decode step changes at most one entry
# per row (the row's sequence entered a new page) unless the rows were reshuffled.
PATCHES_PER_ROW = 2
# Views start at multiples of this many bytes: every dtype's view is aligned, and Triton
# sees the same 16-byte pointer alignment as for separately allocated tensors (it compiles
# a kernel variant per alignment).
_ALIGN = 16


class StaticBuffers:
    """Named tensors of fixed shapes and dtypes packed into one device buffer.

    device[name]: the device view (what kernels read); host[name]: the numpy view of the
    host mirror (what a step writes). patched: the name of one int32 table sent as patches
    (module doc), with room for patch_capacity changed entries per upload; the others are
    copied whole at every upload.
    """

    def __init__(
        self,
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device,
        patched: str | None = None,
        patch_capacity: int = 0,
    ) -> None:
        specs = dict(specs)
        table = specs.pop(patched) if patched else None
        if table is not None:
            if table[1] != torch.int32 or patch_capacity < 1:
                raise ValueError("a patched table is int32, with a patch capacity >= 1")
            specs |= {"_patch_index": ((patch_capacity,), torch.int64),
                      "_patch_value": ((patch_capacity,), torch.int32)}  # fmt: skip
        spans, total = self._layout(specs)
        self._bulk_bytes = total
        if table is not None:
            # The table comes last, with one spare entry that unused patches write into.
            table_bytes = (math.prod(table[0]) + 1) * 4
            spans["_table"] = (total, table_bytes)
            total += -(-table_bytes // _ALIGN) * _ALIGN
        self._host = torch.zeros(total, dtype=torch.uint8)
        self._device = torch.zeros(total, dtype=torch.uint8, device=device)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            start, nbytes = spans[name]
            self.host[name] = self._host[start : start + nbytes].view(dtype).view(shape).numpy()
            self.device[name] = self._device[start : start + nbytes].view(dtype).view(shape)
        self._patched = patched
        if table is not None:
            self._init_table(patched, table[0], spans["_table"])

    @staticmethod
    def _layout(specs: dict) -> tuple[dict[str, tuple[int, int]], int]:
        spans, total = {}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            spans[name] = (total, nbytes)
            total += -(-nbytes // _ALIGN) * _ALIGN
        return spans, total

    def _init_table(self, name: str, shape: tuple[int, ...], span: tuple[int, int]) -> None:
        start, nbytes = span
        host_flat = self._host[start : start + nbytes].view(torch.int32)
        self._device_table_flat = self._device[start : start + nbytes].view(torch.int32)
        self._spare = host_flat.numel() - 1
        self.host[name] = host_flat[:-1].view(shape).numpy()
        self.device[name] = self._device_table_flat[:-1].view(shape)
        self._on_device = np.zeros(self._spare, dtype=np.int32)  # what the device holds

    def upload(self) -> None:
        """Send the host mirror to the device buffer (asynchronous: the source is staged by
        the driver before the call returns, so the mirror may be rewritten at once)."""
        if self._patched is None:
            self._device.copy_(self._host, non_blocking=True)
            return
        table = self.host[self._patched].reshape(-1)
        changed = np.flatnonzero(table != self._on_device)
        index, value = self.host["_patch_index"], self.host["_patch_value"]
        if len(changed) > len(index):
            self._device.copy_(self._host, non_blocking=True)
        else:
            index[: len(changed)], index[len(changed) :] = changed, self._spare
            value[: len(changed)], value[len(changed) :] = table[changed], 0
            self._device[: self._bulk_bytes].copy_(self._host[: self._bulk_bytes],
                                                   non_blocking=True)  # fmt: skip
            self._device_table_flat.index_copy_(
                0, self.device["_patch_index"], self.device["_patch_value"]
            )
        self._on_device[changed] = table[changed]


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
