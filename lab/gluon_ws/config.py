"""Constants and launch options of the warp-specialized prefill kernels.

BLOCK_M (query rows per consumer warpgroup), BLOCK_N (keys per block, one page), DIM (head
dim), LOG2E and FP8_MAX are module-level `gl.constexpr`s: every module whose jitted
functions read them imports them by name. TILE = 2 * BLOCK_M query rows per work item.
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl

from lab.gluon_prefill_probe import HEAD_DIM, KEYS, ROWS

TILE = 2 * ROWS  # query rows per program: two consumer warpgroups of ROWS rows each
BLOCK_M, BLOCK_N, DIM = gl.constexpr(ROWS), gl.constexpr(KEYS), gl.constexpr(HEAD_DIM)
LOG2E = gl.constexpr(1.4426950408889634)
FP8_MAX = gl.constexpr(448.0)
DEFAULT_STAGES = 4  # K/V stages; >= 4 keeps a turn holder from waiting on the other's release
MAXNREG = 168  # 12 warps (3 warpgroups) x 168 fit the 64 K registers: one program per SM
CONSUMER_REGS, PRODUCER_REGS = 240, 24  # setmaxnreg: 2 x 128 x 240 + 128 x 24 = 64512
# FP16 P·V: the INT8 V codes are widened to fp16 by WIDENER_WARPS warps, which fill the
# producer's warpgroup (1 + 3 warps), so the register split stays as it is.
WIDENER_WARPS, WIDENER_REGS = 2, 24


def _launch_options(stages: int, maxnreg: int, tile_major: bool) -> dict:
    """Constexprs and launch options shared by the launcher and the offline compile."""
    return {"STAGES": stages, "CONSUMER_REGS": CONSUMER_REGS, "PRODUCER_REGS": PRODUCER_REGS,
            "TILE_MAJOR": tile_major, "num_warps": 4, "maxnreg": maxnreg}  # fmt: skip


def _varlen_options(stages: int, maxnreg: int, rotate: bool = False) -> dict:
    """Constexprs and launch options of the varlen kernel (the plan fixes the order)."""
    options = _launch_options(stages, maxnreg, False)
    del options["TILE_MAJOR"]
    options |= {"ROTATE": rotate, "WIDENER_WARPS": WIDENER_WARPS, "WIDENER_REGS": WIDENER_REGS}
    return options
