"""The static decode tables of CUDA graphs: one buffer, the page table sent as patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sageserve.attention.static_metadata import StaticBuffers

BS, WIDTH, CAPACITY = 5, 37, 8


def _buffers(device: str = "cpu") -> StaticBuffers:
    specs = {"page_table": ((BS, WIDTH), torch.int32), "kv_len": ((BS,), torch.int32),
             "slot": ((BS,), torch.int64)}  # fmt: skip
    return StaticBuffers(specs, torch.device(device), patched="page_table",
                         patch_capacity=CAPACITY)  # fmt: skip


def _assert_device_equals_host(buffers: StaticBuffers) -> None:
    for name in ("page_table", "kv_len", "slot"):
        assert np.array_equal(buffers.device[name].cpu().numpy(), buffers.host[name]), name


def test_patched_table_follows_the_host_through_random_steps() -> None:
    rng = np.random.default_rng(0)
    buffers = _buffers()
    for step in range(60):
        table = buffers.host["page_table"]
        if step % 7 == 3:  # rows reshuffled: more changes than the patch area holds
            table[:] = rng.integers(0, 1000, table.shape)
        else:  # a decode step: a few rows enter a new page, one row may end
            for row in rng.choice(BS, size=rng.integers(0, 3), replace=False):
                table[row, rng.integers(0, WIDTH)] = rng.integers(1, 1000)
            if rng.random() < 0.3:
                table[rng.integers(0, BS)] = 0
        buffers.host["kv_len"][:] = rng.integers(0, 500, BS)
        buffers.host["slot"][:] = rng.integers(-1, 10**9, BS)
        buffers.upload()
        _assert_device_equals_host(buffers)


def test_a_few_changes_travel_as_patches_only() -> None:
    buffers = _buffers()
    buffers.host["page_table"][2, 5] = 11
    buffers.upload()
    # Bytes on the device that the host did not change are not sent again: a stray value
    # written behind the mirror's back survives a patch upload...
    buffers.device["page_table"][4, 9] = -3
    buffers.host["page_table"][0, 1] = 12
    buffers.host["kv_len"][:] = 7
    buffers.upload()
    got = buffers.device["page_table"].cpu().numpy()
    assert got[2, 5] == 11 and got[0, 1] == 12 and got[4, 9] == -3
    assert np.array_equal(buffers.device["kv_len"].cpu().numpy(), np.full(BS, 7))
    # ... and a reshuffle (more than CAPACITY changes) sends the whole buffer.
    buffers.host["page_table"][:, :3] = 5
    buffers.upload()
    _assert_device_equals_host(buffers)


def test_patched_table_must_be_int32_with_room() -> None:
    with pytest.raises(ValueError, match="int32"):
        StaticBuffers({"t": ((2, 3), torch.int64)}, torch.device("cpu"), patched="t",
                      patch_capacity=4)  # fmt: skip
    with pytest.raises(ValueError, match="capacity"):
        StaticBuffers({"t": ((2, 3), torch.int32)}, torch.device("cpu"), patched="t")


@pytest.mark.gpu
def test_patched_table_on_the_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(1)
    buffers = _buffers("cuda")
    for _ in range(20):
        rows = rng.choice(BS, size=2, replace=False)
        buffers.host["page_table"][rows, rng.integers(0, WIDTH)] = rng.integers(1, 1000)
        buffers.upload()
        torch.cuda.synchronize()
        _assert_device_equals_host(buffers)
