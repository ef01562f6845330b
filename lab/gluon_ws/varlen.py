"""The varlen warp-specialized kernel (cached prefixes, bottom-right causal mask, any
lengths, work items from the host plan of `lab.gluon_ws.plan`) and its launcher
`gluon_ws_prefill_varlen` (q, out: [T, Hq, D] bf16/fp16, D 64 or 128; plan: [items, 3]
int32).

P·V runs in FP8 (FP8 V codes, P in e4m3 per block) or in fp16 (INT8 V codes, which a
widener partition turns into fp16 in shared memory per stage). With the rotation on, Q rows
are multiplied by the ±1 Hadamard matrix in one wgmma before their quantization.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from lab.gluon_prefill_probe import KEYS, _descriptor
from lab.gluon_ws.config import (
    BLOCK_M,
    BLOCK_N,
    DEFAULT_STAGES,
    FP8_MAX,
    LOG2E,
    MAXNREG,
    _varlen_options,
)
from lab.gluon_ws.partitions import (
    _block_scales,
    _p_operand,
    _qk,
    _softmax,
    _step,
    _turn_pass,
    _turn_wait,
)
from lab.gluon_ws.plan import _consumer_blocks

# ----------------------------------------------------------------------------- varlen
#
# Varlen batches with a cached prefix (what the backend needs): sequences back to back in q
# (q_start, q_len per sequence, gaps allowed), kv_len keys each, prefix = kv_len - q_len.
# Work items come from a host plan (`work_plan`): (sequence, first row of a 128-row tile in
# its chunk, query head), longest causal work first; the last tile of a sequence is partial.
#
# Block ranges (`_consumer_blocks`, shared with the selfcheck's model): consumer WG of a tile
# owns rows lo = first_row + 64 WG .. lo + 63; row r sees keys 0 .. last_key(r) = prefix + r
# (causal; capped at kv_len - 1 for padding rows r >= q_len) or kv_len - 1. It runs blocks
# 0 .. n - 1: blocks 0 .. full - 1 (seen whole by every row) without mask work, the rest
# masked against last_key per row (at most 2 for 64 rows over 64-key blocks). n >= 2 (the
# loop peels block 0 and the last P·V); an extra block past every row's keys is fully masked
# and its V scales are zeroed by the producer (keys >= kv_len), so it adds nothing.
#
# Turn protocol with uneven consumers: the producer loads `loaded` = max(n0, n1) blocks per
# item, and each consumer takes exactly `loaded` turns per item (turn g = the program's
# block g, as in the equal-length kernel): turns base .. base + n - 1 issue its wgmmas, the
# others (base + n .. base + loaded - 1) are empty: wait for the turn, pass it, wait for the
# block to land, release it (`_idle_turns`). So the turns still alternate 0, 1, 0, 1 per
# block, every stage gets its two releases, and the counters stay in step across items. The
# second consumer's rows come 64 later, so n1 >= n0 when it has a real row (n1 - n0 <= 1,
# causal; equal otherwise); a consumer with no real row (a tile whose second half is past
# q_len) takes all its turns empty. An empty turn needs nothing the other consumer holds:
# the deadlock-free argument of the equal-length kernel (>= 3 stages) is unchanged, and
# `--selfcheck` runs the protocol under random interleavings.


_consumer_blocks_gl = gluon.jit(_consumer_blocks)


@gluon.jit
def _last_keys(rows, q_len, kv_len, CAUSAL: gl.constexpr):
    """[BLOCK_M] the last key each row (position in its chunk) sees: prefix + row, capped
    at kv_len - 1 (padding rows past q_len), or kv_len - 1. `_softmax` masks keys past it
    (its `rows` argument: in the equal-length kernel the row is its own last key)."""
    if CAUSAL:
        return gl.minimum(rows + (kv_len - q_len), kv_len - 1)
    else:
        return gl.zeros_like(rows) + (kv_len - 1)


@gluon.jit
def _varlen_blocks(q_len, kv_len, first_row, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """(n, full, loaded) of consumer WG in a work item (see `_consumer_blocks`); loaded =
    max over both consumers: the blocks the producer loads and each consumer's turns."""
    n0, full0 = _consumer_blocks_gl(q_len, kv_len, first_row, 0, CAUSAL, BLOCK_M, BLOCK_N)
    n1, full1 = _consumer_blocks_gl(q_len, kv_len, first_row, 1, CAUSAL, BLOCK_M, BLOCK_N)
    loaded = gl.maximum(n0, n1)
    if WG == 0:
        return n0, full0, loaded
    else:
        return n1, full1, loaded


@gluon.jit
def _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w):
    """(sequence, first row of the tile in its chunk, query head, q_len, kv_len) of item w;
    plan: [items, 3] int32."""
    item = plan_ptr + 3 * w
    seq = gl.load(item)
    return (
        seq,
        gl.load(item + 1),
        gl.load(item + 2),
        gl.load(q_len_ptr + seq),
        gl.load(kv_len_ptr + seq),
    )


@gluon.jit
def _prepare_scales_varlen(k_scale_ptr, v_scale_ptr, page, first_key, kv_len, scale_smem,
                           stage, PV_FP8: gl.constexpr):  # fmt: skip
    """`_prepare_scales` with the V scales of keys >= kv_len zeroed (stale slots of the last
    page, the null page): they leave the block's max and get e4m3 factor 0, as in the
    Triton kernel. (Its diagonal blocks take the max over keys < min(kv_len, end of the
    64-row block); here over keys < kv_len: the same P up to its e4m3 rounding.)

    FP16 P·V (not PV_FP8): the factors are the V scales themselves and the unit is 1, as
    the Triton kernel's `scaled_pv` multiplies P by each key's scale before the fp16
    rounding; acc then stays in plain units."""
    layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    keys = gl.arange(0, BLOCK_N, layout=layout)
    slot = page * BLOCK_N + keys
    k_scale = gl.load(k_scale_ptr + slot).to(gl.float32)
    v_scale = gl.load(v_scale_ptr + slot).to(gl.float32)
    v_scale = gl.where(first_key + keys < kv_len, v_scale, 0.0)
    scale_smem.index(3 * stage).store(k_scale)
    if PV_FP8:
        block_max = gl.maximum(gl.max(v_scale, axis=0), 2.0**-24)
        scale_smem.index(3 * stage + 1).store(v_scale * (FP8_MAX / block_max))
        scale_smem.index(3 * stage + 2).store(gl.zeros_like(v_scale) + block_max / FP8_MAX)
    else:
        scale_smem.index(3 * stage + 1).store(v_scale)
        scale_smem.index(3 * stage + 2).store(gl.full_like(v_scale, 1.0))


@gluon.jit
def _producer_varlen(args, num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr,
                     CAUSAL: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """`_producer` over the plan's items: `loaded` blocks per item (`_varlen_blocks`). The
    page of a block past the sequence's last page (the fully masked extra block of a short
    tile) is clamped to the last page: page tables are padded only to 128 keys. args: the
    kernel's runtime producer arguments."""
    (k_desc, v_desc, k_smem, v_smem, scale_smem, ready, empty, k_scale_ptr, v_scale_ptr,
     page_table_ptr, stride_table, plan_ptr, q_len_ptr, kv_len_ptr, n_items) = args  # fmt: skip
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        seq, first_row, head, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        _, _, loaded = _varlen_blocks(q_len, kv_len, first_row, 0, CAUSAL)
        kv_head = head // (num_q_heads // num_kv_heads)
        table = page_table_ptr + seq.to(gl.int64) * stride_table
        last_page = (kv_len - 1) // BLOCK_N
        for block in range(loaded):
            g = base + block
            stage = g % STAGES
            mbarrier.wait(empty.index(stage), ((g // STAGES) & 1) ^ 1)
            page = gl.load(table + gl.minimum(block, last_page)) * num_kv_heads + kv_head
            bar = ready.index(stage)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [page * BLOCK_N, 0], bar, k_smem.index(stage))
            tma.async_copy_global_to_shared(v_desc, [page * v_smem.shape[1], 0], bar,
                                            v_smem.index(stage))  # fmt: skip
            _prepare_scales_varlen(k_scale_ptr, v_scale_ptr, page, block * BLOCK_N, kv_len,
                                   scale_smem, stage, v_smem.dtype == gl.float8e4nv)  # fmt: skip
            gl.thread_barrier()  # every lane's scales are stored before the one arrive
            mbarrier.arrive(bar, count=1)
        base += loaded


@gluon.jit
def _int8_to_fp16(codes):
    """INT8 codes -> fp16, exactly, 4 at a time without the slow I2F unit (the Triton
    kernel's `_int8_to_fp16`: the bytes, sign-flipped, under an fp16 exponent byte 0x64 give
    1024 + 128 + code; subtract 1152 two lanes at a time)."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, e, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 e, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, e, 0x5140;
        prmt.b32 $1, t, e, 0x5342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r",
        args=[codes],
        dtype=gl.float16,
        is_pure=True,
        pack=4,
    )


@gluon.jit
def _widen_stage(v_smem, v16_smem, stage, WARPS: gl.constexpr):
    """V [D, BLOCK_N] INT8 codes of a stage -> fp16 in v16_smem's stage, 8 * WARPS rows at a
    time (16 codes per thread: 4 registers in, 8 out, within the widener's small register
    budget)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    rows: gl.constexpr = 8 * WARPS
    D: gl.constexpr = v_smem.shape[1]
    src = v_smem.index(stage)
    dst = v16_smem.index(stage)
    for r in gl.static_range(0, D, rows):
        codes = src.slice(r, rows, dim=0).load(layout)
        dst.slice(r, rows, dim=0).store(_int8_to_fp16(codes))


@gluon.jit
def _widener_varlen(args, CAUSAL: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
    """FP16 P·V: for every block the producer loads (the same sequence of program blocks g),
    once it landed (`ready`), widen its INT8 V to fp16 (`_widen_stage`) and arrive on
    `widened`, which the consumers wait on instead of `ready`. Stage g % STAGES of v16_smem
    is free by then: the producer reloads a stage only after both consumers released its
    previous block, after their P·V read it. args: the kernel's runtime widener arguments."""
    (v_smem, v16_smem, ready, widened, plan_ptr, q_len_ptr, kv_len_ptr, n_items) = args
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        _, first_row, _, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        _, _, loaded = _varlen_blocks(q_len, kv_len, first_row, 0, CAUSAL)
        for block in range(loaded):
            g = base + block
            stage = g % STAGES
            mbarrier.wait(ready.index(stage), (g // STAGES) & 1)
            _widen_stage(v_smem, v16_smem, stage, WARPS)
            fence_async_shared()  # each thread's fp16 rows, for wgmma (the async proxy)
            gl.thread_barrier()  # every thread's rows are stored before the one arrive
            mbarrier.arrive(widened.index(stage), count=1)
        base += loaded


@gluon.jit
def _idle_turns(turn, ready, empty, start, stop, WG: gl.constexpr, STAGES: gl.constexpr):
    """Empty turns start .. stop - 1 (program block indices): pass each turn on, and release
    each block once it landed (a release before the load would complete the stage's empty
    phase early)."""
    for g in range(start, stop):
        _turn_wait(turn, g, WG)
        _turn_pass(turn, WG)
        mbarrier.wait(ready.index(g % STAGES), (g // STAGES) & 1)
        mbarrier.arrive(empty.index(g % STAGES), count=1)


@gluon.jit
def _quantize_q_rows(q_ptr, q_smem, h_smem, q_row, n_real, head, stride_qt, stride_qh,
                     sm_scale, rows_s: gl.constexpr, ROTATE: gl.constexpr):  # fmt: skip
    """`_quantize_q_block` of q rows q_row .. q_row + 63 of which the first n_real belong to
    the sequence: the others load as zeros (never read), get codes 0 and the scale floor;
    scales are per row, so they leave the real rows' alone.

    ROTATE: the rows are multiplied by the ±1 Hadamard matrix h_smem [D, D] (q's dtype)
    first, in one synchronous wgmma with fp32 accumulation: the products are exact, so this
    is the Triton kernel's tensor-core rotation (`hadamard_tile`) up to the order of the
    fp32 additions (sm_scale is then the rotated one, `rotated_sm_scale`)."""
    D: gl.constexpr = q_smem.shape[1]
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, blocked))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
    real = (r[:, None] < n_real) & (d[None, :] < D)
    q = gl.load(q_ptr + offsets, mask=real, other=0.0)
    if ROTATE:
        y_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
        )
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=y_layout,
                                                     k_width=2)  # fmt: skip
        y = gl.zeros([BLOCK_M, D], gl.float32, y_layout)
        y = warpgroup_mma(gl.convert_layout(q, a_layout), h_smem, y, use_acc=False)
    else:
        y = q.to(gl.float32)
    scale = gl.maximum(gl.max(gl.abs(y), axis=1) / 127.0, 2.0**-24)
    y = gl.div_rn(y, gl.zeros_like(y) + scale[:, None])
    y = gl.where(y >= 0, y + 0.5, y - 0.5)
    q_smem.store(gl.minimum(gl.maximum(y, -127.0), 127.0).to(gl.int8))
    fence_async_shared()  # the codes are read by wgmma (the async proxy)
    return gl.convert_layout(scale * (sm_scale * LOG2E), rows_s)


@gluon.jit
def _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
                   CAUSAL: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
                   ROTATE: gl.constexpr):  # fmt: skip
    """One work item of consumer WG (n >= 2): rows lo = first_row + 64 WG .. lo + 63 of the
    sequence's chunk (those < q_len stored), over key blocks 0 .. n - 1 (the program's
    blocks base ..): block 0 masked (peeled), blocks 1 .. full - 1 in the unmasked loop,
    full .. n - 1 in the masked one (<= 2 iterations), then the last P·V and the empty
    turns n .. loaded - 1."""
    (q_ptr, out_ptr, q_smem, h_smem, k_smem, v_smem, scale_smem, ready, empty, turn,
     q_start_ptr, stride_qt, stride_qh, stride_ot, stride_oh, sm_scale) = args  # fmt: skip
    D: gl.constexpr = k_smem.shape[2]
    PV_BITS: gl.constexpr = v_smem.dtype.primitive_bitwidth  # 8 (FP8 codes) or 16 (fp16)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]
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
    q_scale = _quantize_q_rows(q_ptr, q_smem, h_smem, q_row, q_len - lo, head, stride_qt,
                               stride_qh, sm_scale, rows_s, ROTATE)  # fmt: skip
    last_key = _last_keys(lo + gl.arange(0, BLOCK_M, layout=rows_s), q_len, kv_len, CAUSAL)

    # Block 0's QKᵀ and softmax (outside the turns), always masked: every row sees key 0.
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    s0 = _qk(q_smem, k_smem, ready, base, s_zero, STAGES)
    k_scale, factor, unit = _block_scales(scale_smem, base, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s0,)).to(gl.float32)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    p, _, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, last_key, 0, s_layout, True)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    rescale = gl.full([BLOCK_M], 1.0, gl.float32, rows_s)
    _turn_wait(turn, base, WG)
    split = gl.maximum(full - 1, 0)  # steps 0 .. split - 1: softmax of blocks 1 .. full - 1
    for j in range(0, split):
        p, factor, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, factor, acc, rescale, m_i, l_i, unit, q_scale, last_key, q_smem,
            k_smem, v_smem, scale_smem, ready, empty, turn, s_layout, o_layout, False, WG,
            STAGES,
        )  # fmt: skip
    for j in range(split, n - 1):  # the blocks crossing the diagonal, keys >= kv_len
        p, factor, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, factor, acc, rescale, m_i, l_i, unit, q_scale, last_key, q_smem,
            k_smem, v_smem, scale_smem, ready, empty, turn, s_layout, o_layout, True, WG,
            STAGES,
        )  # fmt: skip
    # The last block's P·V, in a turn of its own (turn base + n - 1, held).
    p_op = _p_operand(p, factor, p_layout, v_smem.dtype)
    acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    g = base + n - 1
    acc = warpgroup_mma(p_op, v_smem.index(g % STAGES).permute((1, 0)), acc, is_async=True)
    _turn_pass(turn, WG)
    l_i = l_i + gl.sum(p, axis=1)
    _idle_turns(turn, ready, empty, g + 1, base + loaded, WG, STAGES)  # the other's extra
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(g % STAGES), count=1)
    out = acc * gl.convert_layout(unit / l_i, rows_o)[:, None]
    r = gl.arange(0, BLOCK_M, layout=rows_o)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    real = (r[:, None] < q_len - lo) & (d[None, :] < D)
    gl.store(out_ptr + offsets, out.to(gl.bfloat16), mask=real)


@gluon.jit
def _consumer_varlen(args, plan_ptr, q_len_ptr, kv_len_ptr, n_items, CAUSAL: gl.constexpr,
                     WG: gl.constexpr, STAGES: gl.constexpr, ROTATE: gl.constexpr):  # fmt: skip
    """One warpgroup through the program's plan items. Consumer 0 always has a real row (a
    tile starts below q_len); consumer 1 may have none: then all its turns are empty."""
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        seq, first_row, head, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        n, full, loaded = _varlen_blocks(q_len, kv_len, first_row, WG, CAUSAL)
        if WG == 0:
            _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
                           CAUSAL, WG, STAGES, ROTATE)  # fmt: skip
        else:
            if n > 0:
                _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base,
                               args, CAUSAL, WG, STAGES, ROTATE)  # fmt: skip
            else:
                _idle_turns(args[9], args[7], args[8], base, base + loaded, WG, STAGES)
        base += loaded


@gluon.jit
def _sylvester_smem(dtype: gl.constexpr, D: gl.constexpr):
    """The ±1 Hadamard matrix H[i, j] = (-1)^popcount(i & j) [D, D] in shared memory, as
    wgmma's B operand (the Triton kernels' `sylvester_matrix`)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    i = gl.arange(0, D, layout=gl.SliceLayout(1, layout))
    j = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    bits = i[:, None] & j[None, :]
    for shift in gl.static_range(4):  # fold 16 bits down to their parity in bit 0
        bits = bits ^ (bits >> (8 >> shift))
    h = gl.where((bits & 1) == 0, 1.0, -1.0).to(dtype)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], dtype)
    h_smem = gl.allocate_shared_memory(dtype, [D, D], smem_layout, h)
    fence_async_shared()
    return h_smem


@gluon.jit
def _gluon_ws_varlen_kernel(
    q_ptr, k_desc, v_desc, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr, plan_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, n_items, stride_qt, stride_qh, stride_table,
    stride_ot, stride_oh, sm_scale,
    num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ROTATE: gl.constexpr, WIDENER_WARPS: gl.constexpr, WIDENER_REGS: gl.constexpr,
):  # fmt: skip
    """`_gluon_ws_prefill_kernel` over a varlen batch with cached prefixes: work items
    w = program_id, + num_programs, ... < n_items of the plan ([items, 3] int32: sequence,
    first row of the 128-row tile, query head). q_start, q_len, kv_len: [B] int32; rows of
    q outside every sequence are neither read nor written. Causal: row r of a chunk sees
    keys 0 .. kv_len - q_len + r (bottom-right).

    The V descriptor's dtype chooses P·V: FP8 codes (P in e4m3), or INT8 codes, which a
    widener partition of WIDENER_WARPS warps turns into fp16 per stage (`_widener_varlen`)
    for an fp16 P·V. D (64 or 128) is the K descriptor's block width. ROTATE: Q rows are
    rotated by the Hadamard matrix before quantization (the cache's K codes are rotated by
    the store)."""
    D: gl.constexpr = k_desc.block_type.shape[1]
    PV_FP8: gl.constexpr = v_desc.dtype == gl.float8e4nv
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.int8)
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per row
    q_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_M, D], q_layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
    scale_smem = gl.allocate_shared_memory(gl.float32, [3 * STAGES, BLOCK_N], plain)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # Without the rotation, h_smem is never read.
    h_smem = _sylvester_smem(q_ptr.dtype.element_ty, D) if ROTATE else q_smem
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the producer's expect (TMA bytes) and scales
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)  # the other consumer's end of turn
    # Constexprs go to the partitions directly (in an assigned tuple they become runtime).
    producer_args = (
        k_desc, v_desc, k_smem, v_smem, scale_smem, ready, empty, k_scale_ptr, v_scale_ptr,
        page_table_ptr, stride_table, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
    )  # fmt: skip
    if PV_FP8:
        consumer_args = (
            q_ptr, out_ptr, q_smem, h_smem, k_smem, v_smem, scale_smem, ready, empty, turn,
            q_start_ptr, stride_qt, stride_qh, stride_ot, stride_oh, sm_scale,
        )  # fmt: skip
        gl.warp_specialize(
            [
                (_consumer_varlen, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                                    CAUSAL, 0, STAGES, ROTATE)),
                (_consumer_varlen, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                                    CAUSAL, 1, STAGES, ROTATE)),
                (_producer_varlen, (producer_args, num_q_heads, num_kv_heads, CAUSAL,
                                    STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        v16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, BLOCK_N],
                                                                         gl.float16)  # fmt: skip
        v16_smem = gl.allocate_shared_memory(gl.float16, [STAGES, D, BLOCK_N], v16_layout)
        widened = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(widened.index(i), count=1)  # the widener's, after its stores
        widener_args = (v_smem, v16_smem, ready, widened, plan_ptr, q_len_ptr, kv_len_ptr,
                        n_items)  # fmt: skip
        # The consumers see the fp16 copy, and `widened` as their `ready`.
        consumer_args = (
            q_ptr, out_ptr, q_smem, h_smem, k_smem, v16_smem, scale_smem, widened, empty,
            turn, q_start_ptr, stride_qt, stride_qh, stride_ot, stride_oh, sm_scale,
        )  # fmt: skip
        gl.warp_specialize(
            [
                (_consumer_varlen, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                                    CAUSAL, 0, STAGES, ROTATE)),
                (_consumer_varlen, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                                    CAUSAL, 1, STAGES, ROTATE)),
                (_producer_varlen, (producer_args, num_q_heads, num_kv_heads, CAUSAL,
                                    STAGES)),
                (_widener_varlen, (widener_args, CAUSAL, STAGES, WIDENER_WARPS)),
            ],
            [4, 1, WIDENER_WARPS],
            [CONSUMER_REGS, PRODUCER_REGS, WIDENER_REGS],
        )  # fmt: skip
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(widened.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def gluon_ws_prefill_varlen(q, k_cache, k_scale, v_cache, v_scale, page_table, q_start, q_len,
                            kv_len, plan, out, causal: bool = True,
                            stages: int = DEFAULT_STAGES, maxnreg: int = MAXNREG,
                            persistent: bool = False, rotate: bool = False) -> None:  # fmt: skip
    """8-bit attention of a varlen batch with cached prefixes over a page-64 8-bit cache,
    warp-specialized: what `sage_attention_paged(..., causal)` computes.

    q: [T, Hq, D] bf16 or fp16, D 64 or 128; k_cache: [P, Hkv, 64, D] int8; v_cache:
    [P, Hkv, D, 64] float8_e4m3fn (FP8 P·V) or int8 (fp16 P·V); k_scale, v_scale:
    [P, Hkv, 64] fp16; page_table: [B, width] int32 from `padded_page_table`; q_start,
    q_len, kv_len: [B] int32 on q's device (q_len >= 1 for the planned sequences,
    kv_len >= q_len); plan: `work_plan(...)` on q's device; out: [T, Hq, D] q's dtype, rows
    outside every sequence untouched. persistent: one program per SM over the plan's items
    round-robin; otherwise one program per item. rotate: q is rotated by the Hadamard
    matrix in the kernel (the cache's keys must be rotated too) and sm_scale is D^-1.5.
    """
    _, heads, dim = q.shape
    pages, kv_heads, page, _ = k_cache.shape
    check_varlen_args(q, k_cache, v_cache, plan)
    tiles = pages * kv_heads
    v_dtype = gl.float8e4nv if v_cache.dtype == torch.float8_e4m3fn else gl.int8
    k_desc = _descriptor(k_cache, [tiles * page, dim], [KEYS, dim], gl.int8)
    v_desc = _descriptor(v_cache, [tiles * dim, page], [dim, KEYS], v_dtype)
    items = plan.shape[0]
    grid = items
    if persistent:
        grid = min(items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    if items == 0:
        return
    sm_scale = dim**-0.5 / dim if rotate else dim**-0.5
    _gluon_ws_varlen_kernel[(grid,)](
        q, k_desc, v_desc, k_scale, v_scale, page_table, out, plan, q_start, q_len, kv_len,
        items, q.stride(0), q.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        sm_scale, num_q_heads=heads, num_kv_heads=kv_heads, CAUSAL=causal,
        **_varlen_options(stages, maxnreg, rotate),
    )  # fmt: skip


def check_varlen_args(q, k_cache, v_cache, plan) -> None:
    """ValueError unless the varlen kernel covers these shapes and dtypes."""
    _, heads, dim = q.shape
    _, kv_heads, page, _ = k_cache.shape
    if dim not in (64, 128) or page != KEYS or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the kernel covers head_dim 64 or 128, page {KEYS}, bf16/fp16 q; got "
                         f"head_dim {dim}, page {page}, {q.dtype}")  # fmt: skip
    if v_cache.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"V codes must be FP8 e4m3 or INT8, got {v_cache.dtype}")
    if heads % kv_heads or plan.dtype != torch.int32 or plan.shape[1:] != (3,):
        raise ValueError("heads must be a multiple of kv heads, plan [items, 3] int32")
