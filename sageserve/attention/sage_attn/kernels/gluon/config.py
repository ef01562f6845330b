"""Block sizes, the register split and the launch options of the warp-specialized prefill.

BLOCK_M (query rows per consumer warpgroup), PAGE (keys per cache page, one TMA box), LOG2E
and FP8_MAX are module-level `gl.constexpr`s: every module whose jitted functions read them
imports them by name. TILE = 2 * BLOCK_M query rows per work item. A key block (one stage of
the ring, one softmax step) is BLOCK_KEYS = 64 or 128 keys: one or two pages, a launch
option (the kernel's constexpr); the jitted functions read it from the shapes they get.
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl

ROWS, KEYS = 64, 64  # query rows per consumer warpgroup; keys per page
TILE = 2 * ROWS  # query rows per work item: two consumer warpgroups
BLOCK_M, PAGE = gl.constexpr(ROWS), gl.constexpr(KEYS)
BLOCK_KEYS = (64, 128)  # keys per block: one page or two
LOG2E = gl.constexpr(1.4426950408889634)
FP8_MAX = gl.constexpr(448.0)
# The kernel's ROTATE: 0 off; 1 Q times the ±1 matrix by one wgmma reading it from shared
# memory (served); 2 the same product by mma.sync with the matrix made in registers.
ROTATE_SHARED, ROTATE_REGISTERS = 1, 2
ROTATE_ON_SHARED = gl.constexpr(ROTATE_SHARED)
ROTATE_IN_REGISTERS = gl.constexpr(ROTATE_REGISTERS)
DEFAULT_STAGES = 4  # K/V stages; >= 4 keeps a turn holder from waiting on the other's release
MAXNREG = 168  # 12 warps (3 warpgroups) x 168 fill the 64 K registers: one program per SM
CONSUMER_REGS, PRODUCER_REGS = 240, 24  # setmaxnreg: 2 x 128 x 240 + 128 x 24 = 64512
# fp16 P·V: the INT8 V codes are widened to fp16 by WIDENER_WARPS warps, which fill the
# producer's warpgroup (1 + 2 of its 3 otherwise idle warps), so the register split holds.
# (3 warps cannot be laid out: a tensor's rows must be a power of two.)
WIDENER_WARPS, WIDENER_REGS = 2, 24
V16_SLOTS = 2  # fp16 V slots of a widened-V ring of its own (`v16_slots`)
# Lazy rescale (fp16 P·V): a row keeps its running max until a block's max exceeds it by
# more than this (log2 units), so P stays <= 2^8 and the accumulator is rescaled only then.
RESCALE_THRESHOLD = gl.constexpr(8.0)
HEAD_DIMS = (64, 128)


def block_keys_refusal(pv_fp8: bool, head_dim: int, block_keys: int,
                       prequantize: bool) -> str | None:  # fmt: skip
    """Why the kernel cannot take blocks of `block_keys` keys with this P·V and head dim
    (None: it can). fp16 P·V at head_dim 128 over 128-key blocks keeps its widened V in a
    ring of its own (`v16_slots`): 4 K/V stages and 2 fp16 slots take ~214 KB, which leaves
    no room for the in-kernel rotation's ±1 matrix and its layout scratch (48.6 KB), so Q
    must come quantized (`prequantize`)."""
    if block_keys not in BLOCK_KEYS:
        return f"keys per block must be one of {BLOCK_KEYS}, got {block_keys}"
    if v16_slots(pv_fp8, head_dim, block_keys) and not prequantize:
        return ("128-key blocks with fp16 P·V at head_dim 128 fit shared memory (227 KB) only "
                "with Q quantized beforehand (prequantize): use 64-key blocks or "
                "prequantize")  # fmt: skip
    return None


def v16_slots(pv_fp8: bool, head_dim: int, block_keys: int) -> int:
    """Slots of the widened-V ring of its own: 2 for fp16 P·V at head_dim 128 over 128-key
    blocks (a stage with its fp16 V would be 65.5 KB: 4 of them do not fit), else 0 (each
    K/V stage holds its own fp16 V). Its protocol: lab/gluon_ws/selfcheck_two_rings.py."""
    return V16_SLOTS if (not pv_fp8 and head_dim == 128 and block_keys == 128) else 0


def default_block_keys(head_dim: int) -> int:
    """Keys per block when the caller names none: 128 at head_dim 64, 64 at head_dim 128.

    Measured on an H100 (lab varlen probe, Q and K rotated; BENCHMARKS.md, 2026-12-06,
    "128-key blocks"): at head_dim 64, 128-key blocks were 9-18% faster for both P·V
    precisions on every batch. At head_dim 128 (FP8 P·V; fp16 P·V then had no room) they
    were 7-20% faster on one 16k prompt but 12% slower on the causal serving batch (16
    chunks of 1k tokens over cached prefixes), the prefill the server runs."""
    return 128 if head_dim == 64 else 64


def default_lazy_rescale(pv_fp8: bool, head_dim: int) -> bool:
    """Whether the accumulator is rescaled lazily when the caller does not say: with fp16
    P·V at head_dim 128. Measured on an H100 (lab varlen probe, rotated, BENCHMARKS.md
    2026-12-07 morning): 4.3-6.6% faster there, causal and not, on the serving batch and one
    16k prompt; at head_dim 64 (128-key blocks, where the rescale is 32 of 666
    instructions and the lazy build spills 24 bytes) 0.3-1.3%, so it stays off. FP8 P·V
    rescales every block by its own unit and cannot skip it."""
    return not pv_fp8 and head_dim == 128


def resolve_lazy_rescale(requested: bool | None, pv_fp8: bool, head_dim: int) -> bool:
    """The lazy rescale a launch gets: `requested`, or `default_lazy_rescale` when None.
    ValueError when it is asked for with FP8 P·V."""
    if requested is None:
        return default_lazy_rescale(pv_fp8, head_dim)
    if requested and pv_fp8:
        raise ValueError("lazy_rescale needs fp16 P·V: FP8 P·V rescales every block by its "
                         "own unit (the block's largest V scale)")  # fmt: skip
    return requested


def launch_options(stages: int, maxnreg: int, rotate: int, block_keys: int,
                   slots: int = 0, lazy_rescale: bool = False) -> dict:  # fmt: skip
    """Constexprs and launch options shared by the launcher and the offline compile.
    rotate: the kernel's ROTATE (0, ROTATE_SHARED or ROTATE_REGISTERS)."""
    return {"STAGES": stages, "CONSUMER_REGS": CONSUMER_REGS, "PRODUCER_REGS": PRODUCER_REGS,
            "ROTATE": int(rotate), "WIDENER_WARPS": WIDENER_WARPS, "WIDENER_REGS": WIDENER_REGS,
            "BLOCK_KEYS": block_keys, "V16_SLOTS": slots, "LAZY_RESCALE": lazy_rescale,
            "num_warps": 4, "maxnreg": maxnreg}  # fmt: skip
