"""The consumer partitions: one warpgroup's work items (64 query rows each), their Q
quantization (with the Hadamard rotation) and their key blocks in turns.

Varlen batches with a cached prefix (what the backend needs): sequences back to back in q
(q_start, q_len per sequence, gaps allowed), kv_len keys each, prefix = kv_len - q_len.
Work items come from a host plan (`work_plan`): (sequence, first row of a 128-row tile in
its chunk, query head), longest causal work first; the last tile of a sequence is partial.

Block ranges (`plan.consumer_blocks`, which the tests check against brute force): consumer
WG of a tile owns rows lo = first_row + 64 WG .. lo + 63; row r sees keys 0 .. last_key(r)
= prefix + r (causal; capped at kv_len - 1 for padding rows r >= q_len) or kv_len - 1. It runs
blocks 0 .. n - 1: blocks 0 .. full - 1 (seen whole by every row) without mask work, the rest
masked against last_key per row (at most 2 for 64 rows over 64-key blocks). n >= 2 (the
loop peels block 0 and the last P·V); an extra block past every row's keys is fully masked
and its V scales are zeroed by the producer (keys >= kv_len), so it adds nothing.

Turn protocol with uneven consumers: the producer loads `loaded` = max(n0, n1) blocks per
item, and each consumer takes exactly `loaded` turns per item (turn g = the program's
block g): turns base .. base + n - 1 issue its wgmmas, the
others (base + n .. base + loaded - 1) are empty: wait for the turn, pass it, wait for the
block to land, release it (`_idle_turns`). So the turns still alternate 0, 1, 0, 1 per
block, every stage gets its two releases, and the counters stay in step across items. The
second consumer's rows come 64 later, so n1 >= n0 when it has a real row (n1 - n0 <= 1,
causal; equal otherwise); a consumer with no real row (a tile whose second half is past
q_len) takes all its turns empty. An empty turn needs nothing the other consumer holds:
the deadlock-free argument (>= 3 stages) holds, and `lab/gluon_ws_prefill_probe.py
--selfcheck` runs the protocol, widener included, under random interleavings.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from sageserve.attention.sage_attn.kernels.gluon.config import (
    BLOCK_M,
    LOG2E,
    ROTATE_IN_REGISTERS,
)
from sageserve.attention.sage_attn.kernels.gluon.consumer_steps import (
    _block_scales,
    _p_operand,
    _pv_operand,
    _qk,
    _release_kv_early,
    _release_pv,
    _softmax,
    _step,
    _turn_pass,
    _turn_wait,
)
from sageserve.attention.sage_attn.kernels.gluon.plan import _item_blocks, _plan_item


@gluon.jit
def _last_keys(rows, q_len, kv_len, CAUSAL: gl.constexpr):
    """[BLOCK_M] the last key each row (position in its chunk) sees: prefix + row, capped
    at kv_len - 1 (padding rows past q_len), or kv_len - 1. `_softmax` masks keys past it
    (its `rows` argument)."""
    if CAUSAL:
        return gl.minimum(rows + (kv_len - q_len), kv_len - 1)
    else:
        return gl.zeros_like(rows) + (kv_len - 1)


@gluon.jit
def _idle_turns(turn, ready, empty, v_ready, v_empty, start, stop, WG: gl.constexpr,
                STAGES: gl.constexpr, SLOTS: gl.constexpr):  # fmt: skip
    """Empty turns start .. stop - 1 (program block indices): pass each turn on, and release
    each block once it landed (a release before the load would complete the stage's empty
    phase early); with two rings (SLOTS > 0), its fp16 slot too once widened."""
    for g in range(start, stop):
        _turn_wait(turn, g, WG)
        _turn_pass(turn, WG)
        mbarrier.wait(ready.index(g % STAGES), (g // STAGES) & 1)
        mbarrier.arrive(empty.index(g % STAGES), count=1)
        if SLOTS > 0:
            mbarrier.wait(v_ready.index(g % SLOTS), (g // SLOTS) & 1)
            mbarrier.arrive(v_empty.index(g % SLOTS), count=1)


@gluon.jit
def _row_offsets(q_row, n_real, head, stride_t, stride_h, D: gl.constexpr,
                 layout: gl.constexpr, col0: gl.constexpr = 0):  # fmt: skip
    """(offsets [BLOCK_M, D], mask) of rows q_row .. q_row + 63 of `head` in a [T, H, *]
    tensor with these strides, columns col0 .. col0 + D - 1, in `layout`; the mask keeps the
    first n_real rows."""
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_t + head * stride_h + col0 + d[None, :]
    return offsets, (r[:, None] < n_real) & (d[None, :] < D)


@gluon.jit
def _quantize_q_rows(q_ptr, q_smem, h_smem, q_row, n_real, head, stride_qt, stride_qh,
                     sm_scale, rows_s: gl.constexpr, ROTATE: gl.constexpr):  # fmt: skip
    """Load q rows q_row .. q_row + 63 of `head` (q [T, Hq, D]), of which the first n_real
    belong to the sequence, write their INT8 codes [64, D] to q_smem (per-row scales,
    rounded as the Triton kernel's `_quantize_q`) and return the row scales times sm_scale
    and log2 e ([BLOCK_M] in rows_s). The other rows load as zeros (never read), get codes 0
    and the scale floor; scales are per row, so they leave the real rows' alone.

    ROTATE: the rows are multiplied by the ±1 Hadamard matrix h_smem [D, D] (q's dtype)
    first, in one synchronous wgmma with fp32 accumulation: the products are exact, so this
    is the Triton kernel's tensor-core rotation (`hadamard_tile`) up to the order of the
    fp32 additions (sm_scale is then the rotated one, `rotated_sm_scale`)."""
    D: gl.constexpr = q_smem.shape[1]
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    if ROTATE == ROTATE_IN_REGISTERS:
        y = _rotate_in_registers(q_ptr, q_row, n_real, head, stride_qt, stride_qh, D)
    elif ROTATE:
        y_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
        )
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=y_layout,
                                                     k_width=2)  # fmt: skip
        # Loaded straight into the wgmma's A layout: a blocked load converted there would
        # hold a 16 KB layout scratch in shared memory for the whole persistent program.
        offsets, real = _row_offsets(q_row, n_real, head, stride_qt, stride_qh, D, a_layout)
        q = gl.load(q_ptr + offsets, mask=real, other=0.0)
        y = gl.zeros([BLOCK_M, D], gl.float32, y_layout)
        y = warpgroup_mma(q, h_smem, y, use_acc=False)
    else:
        offsets, real = _row_offsets(q_row, n_real, head, stride_qt, stride_qh, D, blocked)
        y = gl.load(q_ptr + offsets, mask=real, other=0.0).to(gl.float32)
    scale = gl.maximum(gl.max(gl.abs(y), axis=1) / 127.0, 2.0**-24)
    y = gl.div_rn(y, gl.zeros_like(y) + scale[:, None])
    y = gl.where(y >= 0, y + 0.5, y - 0.5)
    q_smem.store(gl.minimum(gl.maximum(y, -127.0), 127.0).to(gl.int8))
    fence_async_shared()  # the codes are read by wgmma (the async proxy)
    return gl.convert_layout(scale * (sm_scale * LOG2E), rows_s)


@gluon.jit
def _rotate_in_registers(q_ptr, q_row, n_real, head, stride_qt, stride_qh, D: gl.constexpr):
    """Rows q_row .. q_row + 63 of `head` (the first n_real real, the rest zeros) times the
    ±1 Hadamard matrix H[i, j] = (-1)^popcount(i & j), fp32 sums, by mma.sync with both
    operands in registers, so no shared memory holds H (the wgmma way keeps [D, D] of it
    allocated for the whole persistent program: 32 KB at D 128). In two halves of D, each
    with its [D/2, D] rows of H, so that at most half of H is live. The products are exact,
    as in the wgmma; only the order of the fp32 additions differs."""
    HALF: gl.constexpr = D // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, 8])  # fmt: skip
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    i = gl.arange(0, HALF, layout=gl.SliceLayout(1, b_layout))
    j = gl.arange(0, D, layout=gl.SliceLayout(0, b_layout))
    y = gl.zeros([BLOCK_M, D], gl.float32, mma)
    for half in gl.static_range(2):
        offsets, real = _row_offsets(q_row, n_real, head, stride_qt, stride_qh, HALF, a_layout,
                                     half * HALF)  # fmt: skip
        q = gl.load(q_ptr + offsets, mask=real, other=0.0)
        # Made again for each half, in q's dtype: nothing of H stays live across the mma.
        bits = (i[:, None] + half * HALF) & j[None, :]
        for shift in gl.static_range(4):  # fold 16 bits down to their parity in bit 0
            bits = bits ^ (bits >> (8 >> shift))
        h = gl.where((bits & 1) == 0, 1.0, -1.0).to(q.dtype)
        y = mma_v2(q, h, y)
    return y


@gluon.jit
def _load_q_codes(codes_ptr, scales_ptr, q_smem, q_row, n_real, head, stride_qt, stride_qh,
                  stride_st, rows_s: gl.constexpr):  # fmt: skip
    """Q rows q_row .. q_row + 63 of `head` as `kernels.quantize_q` made them (codes [T, Hq,
    D] int8, scales [T, Hq] fp32 with sm_scale and log2 e folded in): the codes into q_smem
    (rows past n_real as zeros, never read) and the rows' scales ([BLOCK_M] in rows_s)."""
    D: gl.constexpr = q_smem.shape[1]
    blocked: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
    offsets, real = _row_offsets(q_row, n_real, head, stride_qt, stride_qh, D, blocked)
    q_smem.store(gl.load(codes_ptr + offsets, mask=real, other=0))
    fence_async_shared()  # the codes are read by wgmma (the async proxy)
    rows = gl.arange(0, BLOCK_M, layout=rows_s)
    scales = scales_ptr + (q_row + rows).to(gl.int64) * stride_st + head
    return gl.load(scales, mask=rows < n_real, other=1.0)


@gluon.jit
def _attend(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
            CAUSAL: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
            ROTATE: gl.constexpr, SLOTS: gl.constexpr, LAZY: gl.constexpr):  # fmt: skip
    """One work item of consumer WG (n >= 2): rows lo = first_row + 64 WG .. lo + 63 of the
    sequence's chunk (those < q_len stored), over key blocks 0 .. n - 1 (the program's
    blocks base ..): block 0 masked (peeled), blocks 1 .. full - 1 in the unmasked loop,
    full .. n - 1 in the masked one (<= 2 iterations), then the last P·V and the empty
    turns n .. loaded - 1. LAZY: the accumulator rescaled only where a row's max grew
    (`_step`)."""
    (q_ptr, out_ptr, q_smem, h_smem, k_smem, v_smem, scale_smem, ready, empty, turn,
     q_start_ptr, stride_qt, stride_qh, stride_ot, stride_oh, sm_scale, q_scale_ptr,
     stride_st, v_ready, v_empty) = args  # fmt: skip
    D: gl.constexpr = k_smem.shape[2]
    BLOCK_N: gl.constexpr = k_smem.shape[1]  # keys per block: one page or two
    PV_BITS: gl.constexpr = v_smem.dtype.primitive_bitwidth  # 8 (FP8 codes) or 16 (fp16)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    # wgmma's K step is 32 bytes: 32 FP8 or 16 fp16 keys.
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 256 // PV_BITS]
    )
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                 k_width=32 // PV_BITS)  # fmt: skip
    lo = first_row + WG * BLOCK_M
    q_row = gl.load(q_start_ptr + seq) + lo
    q_smem = q_smem.index(WG)
    if q_ptr.dtype.element_ty == gl.int8:  # codes and scales from `quantize_q`
        q_scale = _load_q_codes(q_ptr, q_scale_ptr, q_smem, q_row, q_len - lo, head,
                                stride_qt, stride_qh, stride_st, rows_s)  # fmt: skip
    else:
        q_scale = _quantize_q_rows(q_ptr, q_smem, h_smem, q_row, q_len - lo, head, stride_qt,
                                   stride_qh, sm_scale, rows_s, ROTATE)  # fmt: skip
    last_key = _last_keys(lo + gl.arange(0, BLOCK_M, layout=rows_s), q_len, kv_len, CAUSAL)

    # Block 0's QKᵀ and softmax (outside the turns), always masked: every row sees key 0.
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    s0 = _qk(q_smem, k_smem, ready, base, s_zero, STAGES)
    k_scale, unit = _block_scales(scale_smem, base, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s0,)).to(gl.float32)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    p, _, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, last_key, 0, s_layout, True)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    rescale = gl.full([BLOCK_M], 1.0, gl.float32, rows_s)
    _turn_wait(turn, base, WG)
    split = gl.maximum(full - 1, 0)  # steps 0 .. split - 1: softmax of blocks 1 .. full - 1
    for j in range(0, split):
        p, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, acc, rescale, m_i, l_i, unit, q_scale, last_key, q_smem, k_smem,
            v_smem, scale_smem, ready, empty, turn, v_ready, v_empty, s_layout, o_layout,
            False, WG, STAGES, SLOTS, LAZY,
        )  # fmt: skip
    for j in range(split, n - 1):  # the blocks crossing the diagonal, keys >= kv_len
        p, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, acc, rescale, m_i, l_i, unit, q_scale, last_key, q_smem, k_smem,
            v_smem, scale_smem, ready, empty, turn, v_ready, v_empty, s_layout, o_layout,
            True, WG, STAGES, SLOTS, LAZY,
        )  # fmt: skip
    # The last block's P·V, in a turn of its own (turn base + n - 1, held).
    g = base + n - 1
    p_op = _p_operand(p, scale_smem, g, STAGES, s_layout, p_layout, v_smem.dtype)
    _release_kv_early(empty, g, STAGES, SLOTS)
    acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    v = _pv_operand(v_smem, v_ready, g, STAGES, SLOTS)
    acc = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_pass(turn, WG)
    _idle_turns(turn, ready, empty, v_ready, v_empty, g + 1, base + loaded, WG, STAGES,
                SLOTS)  # the other consumer's extra block  # fmt: skip
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _release_pv(empty, v_empty, g, STAGES, SLOTS)
    out = acc * gl.convert_layout(unit / l_i, rows_o)[:, None]
    r = gl.arange(0, BLOCK_M, layout=rows_o)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    real = (r[:, None] < q_len - lo) & (d[None, :] < D)
    gl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=real)


@gluon.jit
def _idle_item(args, start, stop, WG: gl.constexpr, STAGES: gl.constexpr,
               SLOTS: gl.constexpr):  # fmt: skip
    """A work item with no row of this consumer: all its turns start .. stop - 1 empty."""
    (_, _, _, _, _, _, _, ready, empty, turn, _, _, _, _, _, _, _, _, v_ready,
     v_empty) = args  # fmt: skip
    _idle_turns(turn, ready, empty, v_ready, v_empty, start, stop, WG, STAGES, SLOTS)


@gluon.jit
def _consumer(args, plan_ptr, q_len_ptr, kv_len_ptr, n_items, CAUSAL: gl.constexpr,
              WG: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr,
              SLOTS: gl.constexpr, LAZY: gl.constexpr):  # fmt: skip
    """One warpgroup through the program's plan items. Consumer 0 always has a real row (a
    tile starts below q_len); consumer 1 may have none: then all its turns are empty."""
    BLOCK_N: gl.constexpr = args[4].shape[1]  # the K stages' rows: keys per block
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        seq, first_row, head, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        n, full, loaded = _item_blocks(q_len, kv_len, first_row, WG, CAUSAL, BLOCK_N)
        if WG == 0:
            _attend(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
                    CAUSAL, WG, STAGES, ROTATE, SLOTS, LAZY)  # fmt: skip
        else:
            if n > 0:
                _attend(seq, first_row, head, q_len, kv_len, n, full, loaded, base,
                        args, CAUSAL, WG, STAGES, ROTATE, SLOTS, LAZY)  # fmt: skip
            else:
                _idle_item(args, base, base + loaded, WG, STAGES, SLOTS)
        base += loaded
