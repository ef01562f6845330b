"""The equal-length warp-specialized kernel: a producer warp (TMA of K [BLOCK_N, D] and
V [D, BLOCK_N] pages into a ring of STAGES stages, the block scales next to them) and two
consumer warpgroups of BLOCK_M query rows each, over work items of TILE = 128 query rows of
one (sequence, head); its launcher `gluon_ws_prefill` (q, out: [T, Hq, D] bf16).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from lab.gluon_prefill_probe import HEAD_DIM, KEYS, _descriptor, _quantize_q_block
from lab.gluon_ws.config import (
    BLOCK_M,
    BLOCK_N,
    DEFAULT_STAGES,
    DIM,
    FP8_MAX,
    MAXNREG,
    TILE,
    _launch_options,
)
from sageserve.attention.sage_attn.kernels.gluon.consumer_steps import (
    _block_scales,
    _p_operand,
    _qk,
    _softmax,
    _step,
    _turn_pass,
    _turn_wait,
)

# ----------------------------------------------------------------------------- work items


@gluon.jit
def _work_item(w, n_tiles, batch, num_q_heads: gl.constexpr, TILE_MAJOR: gl.constexpr):
    """(128-row tile index, head, sequence) of work item w, tiles in decreasing order (the
    longest causal ones first). TILE_MAJOR: tile, then head, then sequence, for a persistent
    causal grid, whose programs take items round-robin: each gets an even share of long and
    short tiles (at 1k, the longest program's work is 1.03x the mean, against 1.31x the
    other way). Otherwise the tile varies fastest, so that the programs running at once share
    their sequences' K and V in L2."""
    if TILE_MAJOR:
        per_tile = num_q_heads * batch
        rest = w % per_tile
        return n_tiles - 1 - w // per_tile, rest % num_q_heads, rest // num_q_heads
    else:
        rest = w // n_tiles
        return n_tiles - 1 - w % n_tiles, rest % num_q_heads, rest // num_q_heads


@gluon.jit
def _loaded(tile, seq_len, CAUSAL: gl.constexpr):
    """Key blocks the producer loads for a tile (causal: up to the second consumer's
    diagonal)."""
    if CAUSAL:
        return 2 * tile + 2
    else:
        return seq_len // BLOCK_N


# ----------------------------------------------------------------------------- producer


@gluon.jit
def _prepare_scales(k_scale_ptr, v_scale_ptr, page, scale_smem, stage):
    """Producer: one key block's scales for both consumers, into rows 3 * stage .. + 2 of
    scale_smem (fp32): the K scales, the e4m3 factors v_scale * (448 / block_max), and
    unit = block_max / 448 (repeated 64 times), block_max being the block's largest V scale.

    The consumers used to make these themselves, each warp from 16 keys per thread (64 times
    over per key): 32 loads, 32 fp16 conversions, the max and the factors, about 90 SASS
    instructions per key block per warp. The figures are bit for bit the same."""
    layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    slot = page * BLOCK_N + gl.arange(0, BLOCK_N, layout=layout)
    k_scale = gl.load(k_scale_ptr + slot).to(gl.float32)
    v_scale = gl.load(v_scale_ptr + slot).to(gl.float32)
    block_max = gl.maximum(gl.max(v_scale, axis=0), 2.0**-24)
    scale_smem.index(3 * stage).store(k_scale)
    scale_smem.index(3 * stage + 1).store(v_scale * (FP8_MAX / block_max))
    scale_smem.index(3 * stage + 2).store(gl.zeros_like(v_scale) + block_max / FP8_MAX)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, scale_smem, ready, empty, k_scale_ptr,
              v_scale_ptr, page_table_ptr, stride_table, seq_len, batch,
              num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
              STAGES: gl.constexpr, TILE_MAJOR: gl.constexpr):  # fmt: skip
    """One warp: for every key block of the program's work items, in order, TMA K [BLOCK_N, D]
    and V [D, BLOCK_N] (one page each) into stage g % STAGES (g counts the program's blocks
    across its items), once both consumers released block g - STAGES; then the block's
    scales (`_prepare_scales`). ready[s] completes on the TMA bytes and two arrives: the
    expect's and the one after the scales are stored."""
    n_tiles = seq_len // (2 * BLOCK_M)
    base = 0
    for w in range(gl.program_id(0), n_tiles * num_q_heads * batch, gl.num_programs(0)):
        tile, head, seq = _work_item(w, n_tiles, batch, num_q_heads, TILE_MAJOR)
        kv_head = head // (num_q_heads // num_kv_heads)
        table = page_table_ptr + seq * stride_table
        loaded = _loaded(tile, seq_len, CAUSAL)
        for block in range(loaded):
            g = base + block
            stage = g % STAGES
            # A fresh barrier counts as having completed the phase before phase 0: the first
            # STAGES waits pass at once.
            mbarrier.wait(empty.index(stage), ((g // STAGES) & 1) ^ 1)
            page = gl.load(table + block) * num_kv_heads + kv_head
            bar = ready.index(stage)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [page * BLOCK_N, 0], bar, k_smem.index(stage))
            tma.async_copy_global_to_shared(v_desc, [page * DIM, 0], bar, v_smem.index(stage))
            _prepare_scales(k_scale_ptr, v_scale_ptr, page, scale_smem, stage)
            gl.thread_barrier()  # every lane's scales are stored before the one arrive
            mbarrier.arrive(bar, count=1)
        base += loaded


# ----------------------------------------------------------------------------- consumers


@gluon.jit
def _blocks_of(tile, seq_len, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """Key blocks consumer WG runs through: its diagonal is its last. At least 2, so that
    the first block (peeled) is never the last (peeled too); the extra block of the first
    consumer of tile 0 is fully masked and adds nothing."""
    if CAUSAL:
        return gl.maximum(2 * tile + 1 + WG, 2)
    else:
        return seq_len // BLOCK_N


@gluon.jit
def _attend(tile, head, seq, base, args, num_q_heads: gl.constexpr,
            num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr,
            STAGES: gl.constexpr):  # fmt: skip
    """One work item of consumer WG: query rows WG * 64 .. WG * 64 + 63 of 128-row tile
    `tile` of (seq, head); its key blocks are the program's blocks base, base + 1, ..."""
    (q_ptr, out_ptr, q_smem, k_smem, v_smem, scale_smem, ready, empty, turn, seq_len,
     stride_qt, stride_qh, stride_ot, stride_oh, sm_scale) = args  # fmt: skip
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32]
    )
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    first_in_seq = tile * (2 * BLOCK_M) + WG * BLOCK_M
    first_row = seq * seq_len + first_in_seq
    q_smem = q_smem.index(WG)
    q_scale = _quantize_q_block(q_ptr, q_smem, first_row, head, stride_qt, stride_qh, sm_scale,
                                rows_s)  # fmt: skip
    rows = first_in_seq + gl.arange(0, BLOCK_M, layout=rows_s)
    last = _blocks_of(tile, seq_len, WG, CAUSAL) - 1  # >= 1

    # Block 0's QKᵀ and softmax (outside the turns). Only the first consumer's block 0 can be
    # a diagonal (tile 0); masking it elsewhere changes nothing.
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    s0 = _qk(q_smem, k_smem, ready, base, s_zero, STAGES)
    k_scale, unit = _block_scales(scale_smem, base, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s0,)).to(gl.float32)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    p, _, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, rows, 0, s_layout,
                              CAUSAL and WG == 0)  # fmt: skip
    # acc is kept in units of the current block's (largest V scale / 448).
    acc = gl.zeros([BLOCK_M, DIM], gl.float32, o_layout)
    rescale = gl.full([BLOCK_M], 1.0, gl.float32, rows_s)
    _turn_wait(turn, base, WG)
    for j in range(0, last - 1):  # softmax of blocks 1 .. last - 1: never masked
        p, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
            v_smem, scale_smem, ready, empty, turn, ready, empty, s_layout, o_layout, False, WG,
            STAGES, 0,
        )  # fmt: skip
    # Peeled: the softmax of the last block, this consumer's diagonal when causal.
    p, acc, rescale, m_i, l_i, unit = _step(
        last - 1, base, p, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
        v_smem, scale_smem, ready, empty, turn, ready, empty, s_layout, o_layout, CAUSAL, WG,
        STAGES, 0,
    )  # fmt: skip
    # The last block's P·V, in a turn of its own (turn `last`, held).
    g = base + last
    p_op = _p_operand(p, scale_smem, g, STAGES, s_layout, p_layout, v_smem.dtype)
    acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    acc = warpgroup_mma(p_op, v_smem.index(g % STAGES).permute((1, 0)), acc, is_async=True)
    _turn_pass(turn, WG)
    # Causal: consumer 1 runs one block more than consumer 0 (except in tile 0). Consumer 0
    # takes that turn empty (or consumer 1 would wait for it forever) and releases the block
    # once it landed (or the producer would wait for it, in the next work item).
    for g_spare in range(g + 1, base + _loaded(tile, seq_len, CAUSAL)):
        _turn_wait(turn, g_spare, WG)
        _turn_pass(turn, WG)
        mbarrier.wait(ready.index(g_spare % STAGES), (g_spare // STAGES) & 1)
        mbarrier.arrive(empty.index(g_spare % STAGES), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(g % STAGES), count=1)
    out = acc * gl.convert_layout(unit / l_i, rows_o)[:, None]
    out_rows = first_row + gl.arange(0, BLOCK_M, layout=rows_o)
    d = gl.arange(0, DIM, layout=gl.SliceLayout(0, o_layout))
    offsets = out_rows.to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    gl.store(out_ptr + offsets, out.to(gl.bfloat16))


@gluon.jit
def _consumer(args, batch, num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr,
              CAUSAL: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
              TILE_MAJOR: gl.constexpr):  # fmt: skip
    """One warpgroup, through the program's work items (`_attend` each). args: the kernel's
    runtime consumer arguments. Constexprs must not travel in a tuple: an assigned tuple
    turns them into runtime values (in a worker partition, not folded)."""
    seq_len = args[9]
    n_tiles = seq_len // (2 * BLOCK_M)
    base = 0
    for w in range(gl.program_id(0), n_tiles * num_q_heads * batch, gl.num_programs(0)):
        tile, head, seq = _work_item(w, n_tiles, batch, num_q_heads, TILE_MAJOR)
        _attend(tile, head, seq, base, args, num_q_heads, num_kv_heads, CAUSAL, WG, STAGES)
        base += _loaded(tile, seq_len, CAUSAL)


# ----------------------------------------------------------------------------- kernel


@gluon.jit
def _gluon_ws_prefill_kernel(
    q_ptr, k_desc, v_desc, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr,
    seq_len, batch, stride_qt, stride_qh, stride_table, stride_ot, stride_oh, sm_scale,
    num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    TILE_MAJOR: gl.constexpr,
):  # fmt: skip
    """Work items (128 query rows, query head, sequence) w = program_id, + num_programs, ...;
    see the module doc. One item per program (grid = all items), or persistent (grid = SMs).

    q: [T, Hq, D] bf16, quantized here; k_desc: [P * Hkv * 64, D] INT8; v_desc:
    [P * Hkv * D, 64] e4m3; k_scale_ptr, v_scale_ptr: [P * Hkv * 64] fp16; out: [T, Hq, D]
    bf16; T = batch * seq_len. CAUSAL: row r of a sequence sees keys 0..r (no cached prefix).
    """
    q_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                  rank=2)  # fmt: skip
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per row
    q_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_M, DIM], q_layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, DIM, BLOCK_N], v_desc.layout)
    scale_smem = gl.allocate_shared_memory(gl.float32, [3 * STAGES, BLOCK_N], plain)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the producer's expect (TMA bytes) and scales
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)  # the other consumer's end of turn
    # Runtime values only in assigned tuples; the constexprs go to the partitions directly.
    consumer_args = (
        q_ptr, out_ptr, q_smem, k_smem, v_smem, scale_smem, ready, empty, turn, seq_len,
        stride_qt, stride_qh, stride_ot, stride_oh, sm_scale,
    )  # fmt: skip
    gl.warp_specialize(
        [
            (
                _consumer,
                (consumer_args, batch, num_q_heads, num_kv_heads, CAUSAL, 0, STAGES, TILE_MAJOR),
            ),
            (
                _consumer,
                (consumer_args, batch, num_q_heads, num_kv_heads, CAUSAL, 1, STAGES, TILE_MAJOR),
            ),
            (
                _producer,
                (
                    k_desc,
                    v_desc,
                    k_smem,
                    v_smem,
                    scale_smem,
                    ready,
                    empty,
                    k_scale_ptr,
                    v_scale_ptr,
                    page_table_ptr,
                    stride_table,
                    seq_len,
                    batch,
                    num_q_heads,
                    num_kv_heads,
                    CAUSAL,
                    STAGES,
                    TILE_MAJOR,
                ),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def gluon_ws_prefill(q, k_cache, k_scale, v_cache, v_scale, page_table, seq_len, out,
                     causal: bool = False, stages: int = DEFAULT_STAGES,
                     maxnreg: int = MAXNREG, persistent: bool = False) -> None:  # fmt: skip
    """8-bit attention of equal-length sequences (no cached prefix) over a page-64 FP8-V
    cache, warp-specialized (producer warp + two ping-ponging consumer warpgroups).

    q: [T, Hq, D] bf16 (quantized in the kernel); k_cache: [P, Hkv, 64, D] int8; v_cache:
    [P, Hkv, D, 64] float8_e4m3fn; k_scale, v_scale: [P, Hkv, 64] fp16; page_table:
    [B, >= seq_len // 64] int32; out: [T, Hq, D] bf16 (T = B * seq_len, seq_len % 128 == 0).
    maxnreg 168: 12 warps (the producer's warpgroup included) x 168 registers fill the SM's
    register file, so one program per SM; setmaxnreg moves them to the consumers.
    persistent: one program per SM, each looping over work items (longest causal tiles first),
    so that a program's next item is loaded under its last one's tail; otherwise one program
    per item.
    """
    tokens, heads, dim = q.shape
    pages, kv_heads, page, _ = k_cache.shape
    if (dim, page) != (HEAD_DIM, KEYS) or seq_len % TILE or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("the probe covers head_dim 128, page 64, FP8 V, seq_len % 128 == 0")
    if tokens % seq_len or heads % kv_heads:
        raise ValueError("tokens must be whole sequences, heads a multiple of kv heads")
    tiles = pages * kv_heads
    k_desc = _descriptor(k_cache, [tiles * page, dim], [KEYS, dim], gl.int8)
    v_desc = _descriptor(v_cache, [tiles * dim, page], [dim, KEYS], gl.float8e4nv)
    items = seq_len // TILE * heads * (tokens // seq_len)
    if persistent:
        items = min(items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    _gluon_ws_prefill_kernel[(items,)](
        q, k_desc, v_desc, k_scale, v_scale, page_table, out,
        seq_len, tokens // seq_len, q.stride(0), q.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), dim**-0.5, num_q_heads=heads, num_kv_heads=kv_heads,
        CAUSAL=causal,
        **_launch_options(stages, maxnreg, causal and persistent),
    )  # fmt: skip
