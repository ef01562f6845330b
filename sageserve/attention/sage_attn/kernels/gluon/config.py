"""Block sizes, the register split and the launch options of the warp-specialized prefill.

BLOCK_M (query rows per consumer warpgroup), BLOCK_N (keys per block: one page), LOG2E and
FP8_MAX are module-level `gl.constexpr`s: every module whose jitted functions read them
imports them by name. TILE = 2 * BLOCK_M query rows per work item.
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl

ROWS, KEYS = 64, 64  # query rows per consumer warpgroup; keys per block (the page size)
TILE = 2 * ROWS  # query rows per work item: two consumer warpgroups
BLOCK_M, BLOCK_N = gl.constexpr(ROWS), gl.constexpr(KEYS)
LOG2E = gl.constexpr(1.4426950408889634)
FP8_MAX = gl.constexpr(448.0)
DEFAULT_STAGES = 4  # K/V stages; >= 4 keeps a turn holder from waiting on the other's release
MAXNREG = 168  # 12 warps (3 warpgroups) x 168 fill the 64 K registers: one program per SM
CONSUMER_REGS, PRODUCER_REGS = 240, 24  # setmaxnreg: 2 x 128 x 240 + 128 x 24 = 64512
# fp16 P·V: the INT8 V codes are widened to fp16 by WIDENER_WARPS warps, which fill the
# producer's warpgroup (1 + 2 of its 3 otherwise idle warps), so the register split holds.
# (3 warps cannot be laid out: a tensor's rows must be a power of two.)
WIDENER_WARPS, WIDENER_REGS = 2, 24
HEAD_DIMS = (64, 128)


def launch_options(stages: int, maxnreg: int, rotate: bool) -> dict:
    """Constexprs and launch options shared by the launcher and the offline compile."""
    return {"STAGES": stages, "CONSUMER_REGS": CONSUMER_REGS, "PRODUCER_REGS": PRODUCER_REGS,
            "ROTATE": rotate, "WIDENER_WARPS": WIDENER_WARPS, "WIDENER_REGS": WIDENER_REGS,
            "num_warps": 4, "maxnreg": maxnreg}  # fmt: skip
