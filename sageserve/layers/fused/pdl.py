"""Programmatic dependent launch (sm_90+): a kernel may start while its predecessor runs.

A kernel launched with `launch_pdl` starts once every program of the kernel before it has
executed `gdc_launch_dependents` (or exited); its own `gdc_wait` then blocks until that
kernel has finished and its writes are visible. So a kernel launched this way must wait
before it reads anything an earlier kernel wrote and before it writes anything an earlier
kernel reads; only reads of constant data (weights) may come before the wait. Without the
launch option both calls are no-ops, so the same compiled kernel serves either launch.
"""

from __future__ import annotations

import functools

import torch


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel with a `PDL` constexpr: PDL=True plus the Triton launch
    option where `device` has programmatic dependent launch, else PDL=False alone (CPU and
    Triton's interpreter, GPUs before sm_90)."""
    return {"PDL": True, "launch_pdl": True} if pdl_supported(device) else {"PDL": False}


def pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device.index) >= (9, 0)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
