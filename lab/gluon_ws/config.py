"""Constants and launch options of the equal-length probe kernel (`equal.py`).

The shared constants (block sizes, register split) are the served kernel's
(`sageserve.attention.sage_attn.kernels.gluon.config`); DIM is the probe's fixed head dim
and BLOCK_N its keys per block, one page (module-level `gl.constexpr`s).
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl

from lab.gluon_prefill_probe import HEAD_DIM
from sageserve.attention.sage_attn.kernels.gluon.config import (  # noqa: F401 (re-exported to the probe's modules)
    BLOCK_M,
    CONSUMER_REGS,
    DEFAULT_STAGES,
    FP8_MAX,
    KEYS,
    LOG2E,
    MAXNREG,
    PRODUCER_REGS,
    TILE,
)

DIM = gl.constexpr(HEAD_DIM)
BLOCK_N = gl.constexpr(KEYS)  # the probe's key blocks are single pages


def _launch_options(stages: int, maxnreg: int, tile_major: bool) -> dict:
    """Constexprs and launch options of the equal-length kernel."""
    return {"STAGES": stages, "CONSUMER_REGS": CONSUMER_REGS, "PRODUCER_REGS": PRODUCER_REGS,
            "TILE_MAJOR": tile_major, "num_warps": 4, "maxnreg": maxnreg}  # fmt: skip
