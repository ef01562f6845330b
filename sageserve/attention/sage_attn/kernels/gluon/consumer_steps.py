"""A consumer warpgroup's per-block steps (lab's equal-length probe shares them).

The turn protocol of the two ping-ponging consumer warpgroups (`_turn_wait`, `_turn_pass`),
the QKᵀ issue ([BLOCK_M, N] INT32 scores of a block of N keys), the block scales the
producer stored (K scales and P's factors [N], unit [BLOCK_M]), the online softmax, P·V's A
operand and one consumer turn (`_step`: the P·V of block j under the softmax of block j + 1).
N (64 or 128) comes from the shapes: the K stages' rows, the scores' columns.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from sageserve.attention.sage_attn.kernels.gluon.config import BLOCK_M, RESCALE_THRESHOLD


def _rescale_asm(per_thread: int) -> str:
    """PTX for `_rescale_where_grown` over one thread's per_thread accumulator values and
    their rows' factors: multiply, unless the factors of the thread's two rows are both
    exactly 1, then branch over.

    Operands are numbered outputs first, then inputs, tied ones included: $0 .. $(n-1) are
    the outputs, $n .. $(2n-1) the accumulator values tied to them (the same registers),
    $2n .. $(3n-1) the factors. (The first build read the factors at $n + i, i.e. the tied
    accumulator itself, and squared it: its GPU test failed, 2026-12-07.) Factors 0 and 2
    (the register order of an mma accumulator: two of row r, then two of row r + 8) and
    n / 2 and n / 2 + 2 (were the order row-major) cover both rows whichever order the
    layout has (a CPU test reads Triton's register order and checks the rows these
    registers fall on). The branch is taken per lane; a warp skips the products when all
    its 16 rows kept their max. Labels inside braces are local, so the asm can appear more
    than once in a kernel."""
    n = per_thread
    factor = 2 * n
    rows = " ".join(f"setp.neu.f32 q, ${factor + i}, 0f3F800000; or.pred p, p, q;"
                    for i in (2, n // 2, n // 2 + 2))  # fmt: skip
    products = " ".join(f"mul.f32 ${i}, ${i}, ${factor + i};" for i in range(n))
    first = f"setp.neu.f32 p, ${factor}, 0f3F800000;"
    return f"{{ .reg .pred p, q; {first} {rows} @!p bra DONE; {products} DONE: }}"


def _rescale_constraints(per_thread: int) -> str:
    """Outputs, the accumulator values tied to them, the factors."""
    n = per_thread
    return ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n)


# One thread's accumulator values: [64, D] fp32 over a warpgroup's 128 threads, D / 2.
_RESCALE_ASM_64 = gl.constexpr(_rescale_asm(32))
_RESCALE_ASM_128 = gl.constexpr(_rescale_asm(64))
_RESCALE_CONSTRAINTS_64 = gl.constexpr(_rescale_constraints(32))
_RESCALE_CONSTRAINTS_128 = gl.constexpr(_rescale_constraints(64))

# ----------------------------------------------------------------------------- consumers


@gluon.jit
def _turn_wait(turn, k, WG: gl.constexpr):
    """Wait for this consumer's k-th turn to issue wgmma (k counts across the program's work
    items): consumer 0 goes first (its k-th wait passes once consumer 1 ended its turn
    k - 1), then they alternate."""
    mbarrier.wait(turn.index(WG), (k + 1 - WG) & 1)


@gluon.jit
def _turn_pass(turn, WG: gl.constexpr):
    """End this consumer's turn: the other may issue its wgmma."""
    mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _qk(q_smem, k_smem, ready, g, regs, STAGES: gl.constexpr):
    """Issue S = Q_codes · K_codesᵀ of the program's block g (INT32, asynchronous) once its
    stage landed. regs: zeros of the scores' layout (not read: use_acc=False)."""
    stage = g % STAGES
    mbarrier.wait(ready.index(stage), (g // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), regs, use_acc=False,
                         is_async=True)  # fmt: skip


@gluon.jit
def _block_scales(scale_smem, g, STAGES: gl.constexpr, s_layout: gl.constexpr):
    """(K scales [N], unit [BLOCK_M]) of the program's block g, as the producer stored them
    (rows of N); read once its stage landed."""
    row = 3 * (g % STAGES)
    unit = scale_smem.index(row + 2).slice(0, BLOCK_M).load(gl.SliceLayout(1, s_layout))
    return scale_smem.index(row).load(gl.SliceLayout(0, s_layout)), unit


@gluon.jit
def _softmax(s_float, q_scale, m_i, l_i, k_scale, rows, block, s_layout: gl.constexpr,
             MASKED: gl.constexpr, LAZY: gl.constexpr = False):  # fmt: skip
    """Online softmax of one block of scores (INT32 products, as fp32): (P, fp32 and not yet
    scaled for its e4m3 rounding; alpha; m; l times alpha plus the block's row sums).

    MASKED: row `rows[i]` (position in its sequence) sees keys up to itself; block is the
    key block's index in the sequence. LAZY (m_i finite): a row keeps m_i unless the block
    raises it by more than RESCALE_THRESHOLD, so its alpha is exactly 1 and P <= 2^8 there.
    """
    scores = s_float * k_scale[None, :]
    if MASKED:
        N: gl.constexpr = s_float.shape[1]
        keys = block * N + gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
        scores = gl.where(keys[None, :] <= rows[:, None], scores, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(scores, axis=1) * q_scale)
    if LAZY:
        m_new = gl.where(m_new > m_i + RESCALE_THRESHOLD, m_new, m_i)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(scores * q_scale[:, None] - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _p_operand(p, scale_smem, g, STAGES: gl.constexpr, s_layout: gl.constexpr,
               p_layout: gl.constexpr, dtype: gl.constexpr):  # fmt: skip
    """P·V's A operand of the program's block g: P times each key's factor (the producer's
    row 3 * stage + 1 [N], loaded here, one multiply per element) in V's dtype (FP8 codes,
    or fp16 against INT8 V widened to fp16), made right before the product is issued.

    P crosses the loop's back edge in fp32 and unscaled: the codes never share registers
    with P. Were they made in P's registers, or carried across the back edge, the next
    block's P would be due in the registers the in-flight P·V reads, and ptxas would retire
    that P·V before the softmax; 8-bit codes carried across the back edge also come apart
    into a register each and are packed again (~100 PRMT and LOP3 per block). The factors
    are loaded here, not carried: with 128-key blocks, P, the factors, the K scales, the
    accumulator and the next scores do not fit in 240 registers at once.
    """
    factor = scale_smem.index(3 * (g % STAGES) + 1).load(gl.SliceLayout(0, s_layout))
    return gl.convert_layout((p * factor[None, :]).to(dtype), p_layout)


@gluon.jit
def _rescale_where_grown(acc, rescale, rows_o: gl.constexpr):
    """acc [BLOCK_M, D] (wgmma accumulator) times rescale [BLOCK_M] per row, skipping the
    products in a thread whose rows' factors are all 1 (kept maxima, `_softmax`'s LAZY):
    the same values as `acc * rescale[:, None]`, without the ~D / 2 FMUL a thread when no
    row of its warp grew. Compiled kernels only (inline PTX)."""
    D: gl.constexpr = acc.shape[1]
    factors, _ = gl.broadcast(gl.convert_layout(rescale, rows_o)[:, None], acc)
    if D == 128:
        return gl.inline_asm_elementwise(_RESCALE_ASM_128, _RESCALE_CONSTRAINTS_128,
                                         [acc, factors], gl.float32, True, 64)  # fmt: skip
    else:
        return gl.inline_asm_elementwise(_RESCALE_ASM_64, _RESCALE_CONSTRAINTS_64,
                                         [acc, factors], gl.float32, True, 32)  # fmt: skip


@gluon.jit
def _release_kv_early(empty, g, STAGES: gl.constexpr, SLOTS: gl.constexpr):
    """Two rings (SLOTS > 0): block g's P codes are made, so its K and scales are read (its
    V sits in the fp16 ring): release its K/V stage. One ring: nothing (the stage goes once
    the P·V retired)."""
    if SLOTS > 0:
        mbarrier.arrive(empty.index(g % STAGES), count=1)


@gluon.jit
def _pv_operand(v_smem, v_ready, g, STAGES: gl.constexpr, SLOTS: gl.constexpr):
    """Block g's V [N, D] for P·V: its fp16 slot once widened (two rings), or its stage
    (landed with the block: its QKᵀ waited for it)."""
    if SLOTS > 0:
        mbarrier.wait(v_ready.index(g % SLOTS), (g // SLOTS) & 1)
        return v_smem.index(g % SLOTS).permute((1, 0))
    else:
        return v_smem.index(g % STAGES).permute((1, 0))


@gluon.jit
def _release_pv(empty, v_empty, g, STAGES: gl.constexpr, SLOTS: gl.constexpr):
    """Block g's P·V retired: release its fp16 slot (two rings) or its K/V stage."""
    if SLOTS > 0:
        mbarrier.arrive(v_empty.index(g % SLOTS), count=1)
    else:
        mbarrier.arrive(empty.index(g % STAGES), count=1)


@gluon.jit
def _step(j, base, p, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
          v_smem, scale_smem, ready, empty, turn, v_ready, v_empty, s_layout: gl.constexpr,
          o_layout: gl.constexpr, MASKED: gl.constexpr, WG: gl.constexpr,
          STAGES: gl.constexpr, SLOTS: gl.constexpr, LAZY: gl.constexpr = False):  # fmt: skip
    """One turn of a consumer: the P·V of key block j and the softmax of block j + 1 (block
    j is the program's block base + j).

    On entry the consumer holds its turn j; p is block j's P (fp32, unscaled); l_i holds
    blocks 0..j; acc (complete, in registers) holds blocks 0..j-1 and is in block j's unit
    once multiplied by `rescale` (per row). It makes P's codes, rescales acc, issues the
    QKᵀ of block j + 1 and the P·V of block j, and ends the turn. Block j + 1's scales are
    read from shared memory under the products; wait(1) retires the QKᵀ; the softmax of
    block j + 1 runs under the P·V (and under the other consumer's products). Then it waits
    for its turn j + 1, and only then retires the P·V (wait(0)), which frees block j's
    stage.

    Why the turn wait comes before wait(0): ptxas keeps memory accesses on their side of a
    wgmma wait, and issues the wait as soon as the accesses before it are issued. With only
    loads before it, wait(0) lands above most of the softmax; the turn's mbarrier wait (a
    memory access and a branch) pins it below. Nothing is in flight across the loop's back
    edge (in a worker partition, an in-flight accumulator there makes ptxas serialize every
    wgmma, C7512). MASKED: block j + 1 is this consumer's diagonal.

    SLOTS > 0 (two rings, lab/gluon_ws/selfcheck_two_rings.py): v_smem is the fp16 V ring of
    SLOTS slots (v_ready, v_empty its barriers); block j's K/V stage is released once its P
    codes are made, its slot once its P·V retired.

    LAZY (fp16 P·V, whose unit is 1, so rescale is alpha): the softmax keeps a row's max
    unless it grows past RESCALE_THRESHOLD, and the rescale skips the rows that kept theirs
    (`_rescale_where_grown`).
    """
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=o_layout, k_width=32 // v_smem.dtype.primitive_bitwidth
    )
    N: gl.constexpr = k_smem.shape[1]
    s_zero = gl.zeros([BLOCK_M, N], gl.int32, s_layout)
    g = base + j
    p_op = _p_operand(p, scale_smem, g, STAGES, s_layout, p_layout, v_smem.dtype)
    _release_kv_early(empty, g, STAGES, SLOTS)
    if LAZY:
        acc = _rescale_where_grown(acc, rescale, rows_o)
    else:
        acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    s_next = _qk(q_smem, k_smem, ready, g + 1, s_zero, STAGES)
    v = _pv_operand(v_smem, v_ready, g, STAGES, SLOTS)
    acc = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_pass(turn, WG)
    k_scale, new_unit = _block_scales(scale_smem, g + 1, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,)).to(gl.float32)
    p, alpha, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, rows, j + 1, s_layout, MASKED,
                                  LAZY)  # fmt: skip
    _turn_wait(turn, g + 1, WG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _release_pv(empty, v_empty, g, STAGES, SLOTS)  # block j's V (and K, scales) are read
    return p, acc, alpha * (unit / new_unit), m_i, l_i, new_unit
