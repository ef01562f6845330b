"""Host-built page tables and their upload (attention/page_tables.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sageserve.attention.page_tables import int32_on_device, padded_tables


@pytest.mark.parametrize("lengths", [(1, 7, 7), (3, 0, 5), (200, 333, 1), (16, 16, 16)])
def test_uploaded_arrays_keep_values_and_shapes_and_start_16_byte_aligned(lengths) -> None:
    """Triton specializes pointer arguments on 16-byte alignment: every view must be aligned
    whatever the lengths before it, or a new batch compiles a new kernel variant."""
    rng = np.random.default_rng(sum(lengths))
    parts = [rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int64).astype(np.int32)
             for n in lengths]  # fmt: skip
    parts.append(rng.integers(0, 100, size=(3, 5)).astype(np.int32))  # a 2-D table
    views = int32_on_device(parts, torch.device("cpu"))
    base = views[0].untyped_storage().data_ptr()
    for view, part in zip(views, parts, strict=True):
        assert view.dtype == torch.int32 and tuple(view.shape) == part.shape
        assert np.array_equal(view.numpy(), part)
        assert (view.data_ptr() - base) % 16 == 0
        assert view.untyped_storage().data_ptr() == base  # one buffer, one copy


def test_padded_tables_pad_with_the_null_page_to_the_key_alignment() -> None:
    table = padded_tables([(5, 6, 7), (9,)], [40, 3], page_size=16)
    assert table.dtype == np.int32 and table.shape == (2, 8)  # 40 keys -> 128 -> 8 pages
    assert list(table[0, :3]) == [5, 6, 7] and list(table[1, :1]) == [9]
    assert not table[0, 3:].any() and not table[1, 1:].any()
