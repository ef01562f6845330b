"""Probe: the 8-bit prefill warp-specialized in the FlashAttention-3 manner, in Gluon (Triton 3.6).

The next step of `lab/gluon_prefill_probe.py` (KERNEL_NOTES.md, "Gluon probe: the wgmma
overlap, measured", next steps): work items of 128 query rows of one (sequence, head), each
program split into three partitions that meet only through shared memory and mbarriers:

- a producer warp (few registers) issues the TMA loads of each key block's K and V page into
  a ring of STAGES stages, and writes the block's scales next to them (fp32 K scales, the
  per-key e4m3 factors of P and the block's unit), made once per block instead of by every
  consumer warp. It waits on the stage's "empty" barrier (count 2: one arrive per consumer);
  its "ready" barrier completes on the TMA bytes and two arrives (the expect, the scales);
- two consumer warpgroups (the default partition and a 4-warp worker, many registers), each
  owning 64 of the 128 query rows, read the same stages. In its turn a consumer issues the
  next block's QKᵀ and this block's P·V; wait(1) retires the QKᵀ, the next softmax runs under
  the P·V, and wait(0) comes after it (pinned there by an mbarrier wait, see `_step`). They
  ping-pong: a pair of "turn" mbarriers makes their wgmma issues alternate, so one consumer's
  softmax runs while the other's products occupy the tensor cores.

Grid: one program per work item, or persistent (one program per SM looping over the items
round-robin; the producer then loads a program's next item under its last one's tail).
Causal: each consumer masks only its diagonal key block (its last), peeled out of the loop.
Numerics are the v2 probe's (and `sage_attention_paged(..., pv="fp8")`'s): INT8 Q per row
quantized in the kernel, INT8 K per token, FP8 V per token, P scaled per key by
`v_scale * 448 / block_max` (one multiply per element) before its e4m3 rounding.

Scope: FP8 P·V, head_dim 128, page 64, equal sequence lengths that are multiples of 128, no
cached prefix; causal or not. The varlen variant (`gluon_ws_prefill_varlen`, section
"varlen") takes what the backend needs: varlen batches with cached prefixes, the
bottom-right causal mask, any lengths, work items from a host plan (`work_plan`), both
grids. Run from the repository root with the project's virtualenv:

    python lab/gluon_ws_prefill_probe.py --sass [--causal [--persistent]]  # no GPU: sm_90
    python lab/gluon_ws_prefill_probe.py --sass --varlen [--causal]  # no GPU: sm_90
    python lab/gluon_ws_prefill_probe.py --selfcheck  # no GPU: varlen block ranges, protocol
    python lab/gluon_ws_prefill_probe.py --out ws.json  # GPU: check, then time
    python lab/gluon_ws_prefill_probe.py --varlen --out ws-varlen.json  # GPU: varlen
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from lab.gluon_prefill_probe import (
    HEAD_DIM,
    KEYS,
    ROWS,
    _accuracy,
    _build,
    _descriptor,
    _runners,
    gluon_prefill,
)

TILE = 2 * ROWS  # query rows per program: two consumer warpgroups of ROWS rows each
BLOCK_M, BLOCK_N, DIM = gl.constexpr(ROWS), gl.constexpr(KEYS), gl.constexpr(HEAD_DIM)
LOG2E = gl.constexpr(1.4426950408889634)
FP8_MAX = gl.constexpr(448.0)
DEFAULT_STAGES = 4  # K/V stages; >= 4 keeps a turn holder from waiting on the other's release
MAXNREG = 168  # 12 warps (3 warpgroups) x 168 fit the 64 K registers: one program per SM
CONSUMER_REGS, PRODUCER_REGS = 240, 24  # setmaxnreg: 2 x 128 x 240 + 128 x 24 = 64512


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
    """(K scales [BLOCK_N], e4m3 factors [BLOCK_N], unit [BLOCK_M]) of the program's block g,
    as the producer stored them; read once its stage landed."""
    keys: gl.constexpr = gl.SliceLayout(0, s_layout)
    row = 3 * (g % STAGES)
    return (scale_smem.index(row).load(keys), scale_smem.index(row + 1).load(keys),
            scale_smem.index(row + 2).load(gl.SliceLayout(1, s_layout)))  # fmt: skip


@gluon.jit
def _softmax(s_float, q_scale, m_i, l_i, k_scale, rows, block, s_layout: gl.constexpr,
             MASKED: gl.constexpr):  # fmt: skip
    """Online softmax of one block of scores (INT32 products, as fp32): (P, fp32 and not yet
    scaled for its e4m3 rounding; alpha; m; l times alpha).

    The block's row sums are left out of l: the caller adds them once the block's P·V is
    issued. MASKED: row `rows[i]` (position in its sequence) sees keys up to itself; block is
    the key block's index in the sequence.
    """
    scores = s_float * k_scale[None, :]
    if MASKED:
        keys = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        scores = gl.where(keys[None, :] <= rows[:, None], scores, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(scores, axis=1) * q_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(scores * q_scale[:, None] - m_new[:, None])
    return p, alpha, m_new, l_i * alpha


@gluon.jit
def _p_operand(p, factor, p_layout: gl.constexpr):
    """P·V's A operand: the FP8 codes of P times its per-key factor (one multiply per element),
    made right before the product is issued.

    P crosses the loop's back edge in fp32 and unscaled, and is read again after the P·V is
    issued (its row sums). So the codes never share registers with P: were they made in P's
    registers, or carried across the back edge, the next block's P would be due in the
    registers the in-flight P·V reads, and ptxas would retire that P·V before the softmax.
    """
    return gl.convert_layout((p * factor[None, :]).to(gl.float8e4nv), p_layout)


@gluon.jit
def _quantize_q_block(q_ptr, q_smem, first_row, head, stride_qt, stride_qh, sm_scale,
                      rows_s: gl.constexpr):  # fmt: skip
    """Load 64 bf16 query rows of `head`, write their INT8 codes (per-row scales, rounded as
    the Triton kernel's `_quantize_q`) to q_smem; return the row scales times sm_scale and
    log2 e, [BLOCK_M] in the scores' row layout."""
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, DIM, layout=gl.SliceLayout(0, blocked))
    offsets = rows.to(gl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = gl.load(q_ptr + offsets).to(gl.float32)
    scale = gl.maximum(gl.max(gl.abs(q), axis=1) / 127.0, 2.0**-24)
    y = gl.div_rn(q, gl.zeros_like(q) + scale[:, None])
    y = gl.where(y >= 0, y + 0.5, y - 0.5)
    q_smem.store(gl.minimum(gl.maximum(y, -127.0), 127.0).to(gl.int8))
    fence_async_shared()  # the codes are read by wgmma (the async proxy)
    return gl.convert_layout(scale * (sm_scale * LOG2E), rows_s)


@gluon.jit
def _step(j, base, p, factor, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
          v_smem, scale_smem, ready, empty, turn, s_layout: gl.constexpr,
          o_layout: gl.constexpr, MASKED: gl.constexpr, WG: gl.constexpr,
          STAGES: gl.constexpr):  # fmt: skip
    """One turn of a consumer: the P·V of key block j and the softmax of block j + 1 (block
    j is the program's block base + j).

    On entry the consumer holds its turn j; p is block j's P (fp32, unscaled) and factor its
    per-key e4m3 factors; l_i lacks block j's row sums; acc (complete, in registers) holds
    blocks 0..j-1 and is in block j's unit once multiplied by `rescale` (per row). It makes
    P's codes, rescales acc, issues the QKᵀ of block j + 1 and the P·V of block j, and ends
    the turn. Block j's row sums go into l_i and block j + 1's scales are read from shared
    memory under the products; wait(1) retires the QKᵀ; the softmax of block j + 1 runs
    under the P·V (and under the other consumer's products). Then it waits for its turn
    j + 1, and only then retires the P·V (wait(0)), which frees block j's stage.

    Why the turn wait comes before wait(0): ptxas keeps memory accesses on their side of a
    wgmma wait, and issues the wait as soon as the accesses before it are issued. With only
    loads before it, wait(0) lands above most of the softmax; the turn's mbarrier wait (a
    memory access and a branch) pins it below. Nothing is in flight across the loop's back
    edge (in a worker partition, an in-flight accumulator there makes ptxas serialize every
    wgmma, C7512). MASKED: block j + 1 is this consumer's diagonal.
    """
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    g = base + j
    p_op = _p_operand(p, factor, p_layout)
    acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    s_next = _qk(q_smem, k_smem, ready, g + 1, s_zero, STAGES)
    acc = warpgroup_mma(p_op, v_smem.index(g % STAGES).permute((1, 0)), acc, is_async=True)
    _turn_pass(turn, WG)
    l_i = l_i + gl.sum(p, axis=1)  # block j's row sums: P's last read
    k_scale, factor, new_unit = _block_scales(scale_smem, g + 1, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,)).to(gl.float32)
    p, alpha, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, rows, j + 1, s_layout, MASKED)
    _turn_wait(turn, g + 1, WG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(g % STAGES), count=1)  # block j's K, V, scales are read
    return p, factor, acc, alpha * (unit / new_unit), m_i, l_i, new_unit


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
    k_scale, factor, unit = _block_scales(scale_smem, base, STAGES, s_layout)
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
        p, factor, acc, rescale, m_i, l_i, unit = _step(
            j, base, p, factor, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
            v_smem, scale_smem, ready, empty, turn, s_layout, o_layout, False, WG, STAGES,
        )  # fmt: skip
    # Peeled: the softmax of the last block, this consumer's diagonal when causal.
    p, factor, acc, rescale, m_i, l_i, unit = _step(
        last - 1, base, p, factor, acc, rescale, m_i, l_i, unit, q_scale, rows, q_smem, k_smem,
        v_smem, scale_smem, ready, empty, turn, s_layout, o_layout, CAUSAL, WG, STAGES,
    )  # fmt: skip
    # The last block's P·V, in a turn of its own (turn `last`, held).
    p_op = _p_operand(p, factor, p_layout)
    acc = acc * gl.convert_layout(rescale, rows_o)[:, None]
    g = base + last
    acc = warpgroup_mma(p_op, v_smem.index(g % STAGES).permute((1, 0)), acc, is_async=True)
    _turn_pass(turn, WG)
    l_i = l_i + gl.sum(p, axis=1)
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


def _launch_options(stages: int, maxnreg: int, tile_major: bool) -> dict:
    """Constexprs and launch options shared by the launcher and the offline compile."""
    return {"STAGES": stages, "CONSUMER_REGS": CONSUMER_REGS, "PRODUCER_REGS": PRODUCER_REGS,
            "TILE_MAJOR": tile_major, "num_warps": 4, "maxnreg": maxnreg}  # fmt: skip


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


def _consumer_blocks(q_len, kv_len, first_row, wg, causal, rows_per_wg, block_n):
    """(n, full) of consumer wg in a work item: it runs key blocks 0 .. n - 1 (n = 0 when
    none of its rows first_row + wg * rows_per_wg .. + rows_per_wg - 1 is < q_len; else
    n >= 2), blocks 0 .. full - 1 unmasked (full <= n).

    Causal: its last real row hi sees keys up to prefix + hi, its first row lo sees blocks
    0 .. (prefix + lo + 1) // block_n - 1 whole. Non-causal: kv_len keys, kv_len // block_n
    whole blocks. Plain Python on ints (the `--selfcheck` model) and, wrapped by
    `gluon.jit` as `_consumer_blocks_gl`, the kernel's formula on int32 scalars: ternaries
    only (a runtime condition becomes an scf.if) and floor divisions of non-negative values.
    """
    lo = first_row + wg * rows_per_wg
    hi = lo + rows_per_wg - 1 if lo + rows_per_wg <= q_len else q_len - 1
    prefix = kv_len - q_len
    key_end = prefix + hi + 1 if causal else kv_len
    full = (prefix + lo + 1) // block_n if causal else kv_len // block_n
    last = (key_end - 1) // block_n
    n = (last + 1 if last >= 1 else 2) if lo < q_len else 0
    full = full if lo < q_len else 0
    return n, full


_consumer_blocks_gl = gluon.jit(_consumer_blocks)


def _last_key_model(row: int, q_len: int, kv_len: int, causal: bool) -> int:
    """The last key row `row` of a chunk sees: `_last_keys` in Python (selfcheck)."""
    return min(row + kv_len - q_len, kv_len - 1) if causal else kv_len - 1


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
                           stage):  # fmt: skip
    """`_prepare_scales` with the V scales of keys >= kv_len zeroed (stale slots of the last
    page, the null page): they leave the block's max and get e4m3 factor 0, as in the
    Triton kernel. (Its diagonal blocks take the max over keys < min(kv_len, end of the
    64-row block); here over keys < kv_len: the same P up to its e4m3 rounding.)"""
    layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    keys = gl.arange(0, BLOCK_N, layout=layout)
    slot = page * BLOCK_N + keys
    k_scale = gl.load(k_scale_ptr + slot).to(gl.float32)
    v_scale = gl.load(v_scale_ptr + slot).to(gl.float32)
    v_scale = gl.where(first_key + keys < kv_len, v_scale, 0.0)
    block_max = gl.maximum(gl.max(v_scale, axis=0), 2.0**-24)
    scale_smem.index(3 * stage).store(k_scale)
    scale_smem.index(3 * stage + 1).store(v_scale * (FP8_MAX / block_max))
    scale_smem.index(3 * stage + 2).store(gl.zeros_like(v_scale) + block_max / FP8_MAX)


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
            tma.async_copy_global_to_shared(v_desc, [page * DIM, 0], bar, v_smem.index(stage))
            _prepare_scales_varlen(k_scale_ptr, v_scale_ptr, page, block * BLOCK_N, kv_len,
                                   scale_smem, stage)  # fmt: skip
            gl.thread_barrier()  # every lane's scales are stored before the one arrive
            mbarrier.arrive(bar, count=1)
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
def _quantize_q_rows(q_ptr, q_smem, q_row, n_real, head, stride_qt, stride_qh, sm_scale,
                     rows_s: gl.constexpr):  # fmt: skip
    """`_quantize_q_block` of q rows q_row .. q_row + 63 of which the first n_real belong to
    the sequence: the others load as zeros (never read), get codes 0 and the scale floor;
    scales are per row, so they leave the real rows' alone."""
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, DIM, layout=gl.SliceLayout(0, blocked))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
    real = (r[:, None] < n_real) & (d[None, :] < DIM)
    q = gl.load(q_ptr + offsets, mask=real, other=0.0).to(gl.float32)
    scale = gl.maximum(gl.max(gl.abs(q), axis=1) / 127.0, 2.0**-24)
    y = gl.div_rn(q, gl.zeros_like(q) + scale[:, None])
    y = gl.where(y >= 0, y + 0.5, y - 0.5)
    q_smem.store(gl.minimum(gl.maximum(y, -127.0), 127.0).to(gl.int8))
    fence_async_shared()  # the codes are read by wgmma (the async proxy)
    return gl.convert_layout(scale * (sm_scale * LOG2E), rows_s)


@gluon.jit
def _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
                   CAUSAL: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """One work item of consumer WG (n >= 2): rows lo = first_row + 64 WG .. lo + 63 of the
    sequence's chunk (those < q_len stored), over key blocks 0 .. n - 1 (the program's
    blocks base ..): block 0 masked (peeled), blocks 1 .. full - 1 in the unmasked loop,
    full .. n - 1 in the masked one (<= 2 iterations), then the last P·V and the empty
    turns n .. loaded - 1."""
    (q_ptr, out_ptr, q_smem, k_smem, v_smem, scale_smem, ready, empty, turn, q_start_ptr,
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
    lo = first_row + WG * BLOCK_M
    q_row = gl.load(q_start_ptr + seq) + lo
    q_smem = q_smem.index(WG)
    q_scale = _quantize_q_rows(q_ptr, q_smem, q_row, q_len - lo, head, stride_qt, stride_qh,
                               sm_scale, rows_s)  # fmt: skip
    last_key = _last_keys(lo + gl.arange(0, BLOCK_M, layout=rows_s), q_len, kv_len, CAUSAL)

    # Block 0's QKᵀ and softmax (outside the turns), always masked: every row sees key 0.
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    s0 = _qk(q_smem, k_smem, ready, base, s_zero, STAGES)
    k_scale, factor, unit = _block_scales(scale_smem, base, STAGES, s_layout)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s0,)).to(gl.float32)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    p, _, m_i, l_i = _softmax(s, q_scale, m_i, l_i, k_scale, last_key, 0, s_layout, True)
    acc = gl.zeros([BLOCK_M, DIM], gl.float32, o_layout)
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
    p_op = _p_operand(p, factor, p_layout)
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
    d = gl.arange(0, DIM, layout=gl.SliceLayout(0, o_layout))
    offsets = (q_row + r).to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    real = (r[:, None] < q_len - lo) & (d[None, :] < DIM)
    gl.store(out_ptr + offsets, out.to(gl.bfloat16), mask=real)


@gluon.jit
def _consumer_varlen(args, plan_ptr, q_len_ptr, kv_len_ptr, n_items, CAUSAL: gl.constexpr,
                     WG: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """One warpgroup through the program's plan items. Consumer 0 always has a real row (a
    tile starts below q_len); consumer 1 may have none: then all its turns are empty."""
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        seq, first_row, head, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        n, full, loaded = _varlen_blocks(q_len, kv_len, first_row, WG, CAUSAL)
        if WG == 0:
            _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base, args,
                           CAUSAL, WG, STAGES)  # fmt: skip
        else:
            if n > 0:
                _attend_varlen(seq, first_row, head, q_len, kv_len, n, full, loaded, base,
                               args, CAUSAL, WG, STAGES)  # fmt: skip
            else:
                _idle_turns(args[8], args[6], args[7], base, base + loaded, WG, STAGES)
        base += loaded


@gluon.jit
def _gluon_ws_varlen_kernel(
    q_ptr, k_desc, v_desc, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr, plan_ptr,
    q_start_ptr, q_len_ptr, kv_len_ptr, n_items, stride_qt, stride_qh, stride_table,
    stride_ot, stride_oh, sm_scale,
    num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    """`_gluon_ws_prefill_kernel` over a varlen batch with cached prefixes: work items
    w = program_id, + num_programs, ... < n_items of the plan ([items, 3] int32: sequence,
    first row of the 128-row tile, query head). q_start, q_len, kv_len: [B] int32; rows of
    q outside every sequence are neither read nor written. Causal: row r of a chunk sees
    keys 0 .. kv_len - q_len + r (bottom-right)."""
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
    consumer_args = (
        q_ptr, out_ptr, q_smem, k_smem, v_smem, scale_smem, ready, empty, turn, q_start_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, sm_scale,
    )  # fmt: skip
    # Constexprs go to the partitions directly (in an assigned tuple they become runtime).
    producer_args = (
        k_desc, v_desc, k_smem, v_smem, scale_smem, ready, empty, k_scale_ptr, v_scale_ptr,
        page_table_ptr, stride_table, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
    )  # fmt: skip
    gl.warp_specialize(
        [
            (
                _consumer_varlen,
                (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items, CAUSAL, 0, STAGES),
            ),
            (
                _consumer_varlen,
                (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items, CAUSAL, 1, STAGES),
            ),
            (_producer_varlen, (producer_args, num_q_heads, num_kv_heads, CAUSAL, STAGES)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def _varlen_options(stages: int, maxnreg: int) -> dict:
    """Constexprs and launch options of the varlen kernel (the plan fixes the order)."""
    options = _launch_options(stages, maxnreg, False)
    del options["TILE_MAJOR"]
    return options


def tile_work(q_len: int, kv_len: int, first_row: int, causal: bool) -> int:
    """Keys the tile's last real row sees (causal), or kv_len: the plan's sort key."""
    last_row = min(first_row + TILE, q_len) - 1
    return kv_len - q_len + last_row + 1 if causal else kv_len


def work_plan(q_lens: list[int], kv_lens: list[int], heads: int, causal: bool) -> torch.Tensor:
    """[items, 3] int32 on the host: (sequence, first row of the 128-row tile in its chunk,
    query head) for every tile of every sequence (the last one partial) and head, tiles
    longest work first (`tile_work`; ties in sequence order), the heads of a tile adjacent
    (GQA groups share K/V in L2). A persistent grid takes items round-robin: each program
    gets an even share of long and short tiles."""
    tiles = [(tile_work(q, kv, r, causal), seq, r)
             for seq, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True))
             for r in range(0, q, TILE)]  # fmt: skip
    tiles.sort(key=lambda t: -t[0])
    items = [(seq, r, h) for _, seq, r in tiles for h in range(heads)]
    return torch.tensor(items, dtype=torch.int32).view(-1, 3)


def gluon_ws_prefill_varlen(q, k_cache, k_scale, v_cache, v_scale, page_table, q_start, q_len,
                            kv_len, plan, out, causal: bool = True,
                            stages: int = DEFAULT_STAGES, maxnreg: int = MAXNREG,
                            persistent: bool = False) -> None:  # fmt: skip
    """8-bit attention of a varlen batch with cached prefixes over a page-64 FP8-V cache,
    warp-specialized: what `sage_attention_paged(..., causal)` computes, with FP8 P·V.

    q: [T, Hq, D] bf16; caches as `gluon_ws_prefill`; page_table: [B, width] int32 from
    `padded_page_table`; q_start, q_len, kv_len: [B] int32 on q's device (q_len >= 1 for
    the planned sequences, kv_len >= q_len); plan: `work_plan(...)` on q's device; out:
    [T, Hq, D] bf16, rows outside every sequence untouched. persistent: one program per SM
    over the plan's items round-robin; otherwise one program per item.
    """
    _, heads, dim = q.shape
    pages, kv_heads, page, _ = k_cache.shape
    if (dim, page) != (HEAD_DIM, KEYS) or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("the probe covers head_dim 128, page 64, FP8 V")
    if heads % kv_heads or plan.dtype != torch.int32 or plan.shape[1:] != (3,):
        raise ValueError("heads must be a multiple of kv heads, plan [items, 3] int32")
    tiles = pages * kv_heads
    k_desc = _descriptor(k_cache, [tiles * page, dim], [KEYS, dim], gl.int8)
    v_desc = _descriptor(v_cache, [tiles * dim, page], [dim, KEYS], gl.float8e4nv)
    items = plan.shape[0]
    grid = items
    if persistent:
        grid = min(items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    if items == 0:
        return
    _gluon_ws_varlen_kernel[(grid,)](
        q, k_desc, v_desc, k_scale, v_scale, page_table, out, plan, q_start, q_len, kv_len,
        items, q.stride(0), q.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        dim**-0.5, num_q_heads=heads, num_kv_heads=kv_heads, CAUSAL=causal,
        **_varlen_options(stages, maxnreg),
    )  # fmt: skip


# ----------------------------------------------------------------------------- offline report


def _compile_sm90(causal: bool, stages: int, maxnreg: int, persistent: bool = False):
    """The kernel compiled for sm_90 without a GPU (Triton's CompiledKernel). persistent only
    changes the causal kernel's order of work items (the grid is the launcher's)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    def desc(shape, box, dtype, torch_dtype):
        return mangle_type(_descriptor(torch.zeros(shape, dtype=torch_dtype), shape, box, dtype))

    signature = {
        "q_ptr": "*bf16",
        "k_desc": desc([4096, HEAD_DIM], [KEYS, HEAD_DIM], gl.int8, torch.int8),
        "v_desc": desc([8192, KEYS], [HEAD_DIM, KEYS], gl.float8e4nv, torch.float8_e4m3fn),
        "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16", "page_table_ptr": "*i32",
        "out_ptr": "*bf16", "seq_len": "i32", "batch": "i32", "stride_qt": "i32",
        "stride_qh": "i32", "stride_table": "i32", "stride_ot": "i32", "stride_oh": "i32",
        "sm_scale": "fp32",
    }  # fmt: skip
    options = _launch_options(stages, maxnreg, causal and persistent)
    constexprs = {"num_q_heads": 32, "num_kv_heads": 32, "CAUSAL": causal}
    for name in ("STAGES", "CONSUMER_REGS", "PRODUCER_REGS", "TILE_MAJOR"):
        constexprs[name] = options.pop(name)
    signature |= dict.fromkeys(constexprs, "constexpr")
    # What the launcher's specialization sees on the GPU: 16-byte aligned tensors, and these
    # integers multiples of 16 (page table strides are left out: they vary).
    aligned = ("q_ptr", "k_scale_ptr", "v_scale_ptr", "page_table_ptr", "out_ptr", "seq_len",
               "stride_qt", "stride_qh", "stride_ot", "stride_oh")  # fmt: skip
    names = _gluon_ws_prefill_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(_gluon_ws_prefill_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_sm90_varlen(causal: bool, stages: int, maxnreg: int):
    """The varlen kernel compiled for sm_90 without a GPU (one build serves both grids)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    def desc(shape, box, dtype, torch_dtype):
        return mangle_type(_descriptor(torch.zeros(shape, dtype=torch_dtype), shape, box, dtype))

    signature = {
        "q_ptr": "*bf16",
        "k_desc": desc([4096, HEAD_DIM], [KEYS, HEAD_DIM], gl.int8, torch.int8),
        "v_desc": desc([8192, KEYS], [HEAD_DIM, KEYS], gl.float8e4nv, torch.float8_e4m3fn),
        "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16", "page_table_ptr": "*i32",
        "out_ptr": "*bf16", "plan_ptr": "*i32", "q_start_ptr": "*i32", "q_len_ptr": "*i32",
        "kv_len_ptr": "*i32", "n_items": "i32", "stride_qt": "i32", "stride_qh": "i32",
        "stride_table": "i32", "stride_ot": "i32", "stride_oh": "i32", "sm_scale": "fp32",
    }  # fmt: skip
    options = _varlen_options(stages, maxnreg)
    constexprs = {"num_q_heads": 32, "num_kv_heads": 8, "CAUSAL": causal}
    for name in ("STAGES", "CONSUMER_REGS", "PRODUCER_REGS"):
        constexprs[name] = options.pop(name)
    signature |= dict.fromkeys(constexprs, "constexpr")
    # The launcher's specialization: 16-byte aligned tensors (`int32_on_device` aligns the
    # int32 arrays), q/out strides multiples of 16; n_items and the table stride vary.
    aligned = ("q_ptr", "k_scale_ptr", "v_scale_ptr", "page_table_ptr", "out_ptr", "plan_ptr",
               "q_start_ptr", "q_len_ptr", "kv_len_ptr", "stride_qt", "stride_qh",
               "stride_ot", "stride_oh")  # fmt: skip
    names = _gluon_ws_varlen_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(_gluon_ws_varlen_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _ptxas_verbose(ptx: str) -> list[str]:
    """ptxas -v messages for the PTX (registers, spills, warnings such as C7514)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True)  # fmt: skip
    return [ln.split("info    : ")[-1].strip() for ln in res.stderr.splitlines() if ln.strip()]


def _sass(cubin: bytes) -> list[str]:
    """The kernel's SASS, one instruction or label per line (nvdisasm)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True,
                             check=True)  # fmt: skip
    return res.stdout.splitlines()


def _instructions(sass: list[str]) -> tuple[list[str], dict[str, int]]:
    """(SASS instructions in order, label -> index of the instruction it precedes)."""
    labels, body = {}, []
    for line in sass:
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(body)
        elif m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            body.append(m.group(1))
    return body, labels


def _digest(body: list[str]) -> str:
    """A loop body as runs of the instructions that show the overlap: GMMAs, their waits,
    MUFU (exp2), FMUL, mbarrier waits and arrives."""
    kinds = (("GMMA", None), ("WARPGROUP.DEPBAR", "wait"), ("MUFU", "MUFU"), ("FMUL", "FMUL"),
             ("SYNCS.PHASECHK", "mbar.wait"), ("SYNCS.ARRIVE", "mbar.arrive"))  # fmt: skip
    runs: list[list] = []
    for ins in body:
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        for prefix, name in kinds:
            if op.startswith(prefix) or (prefix == "GMMA" and "GMMA" in op):
                key = op.split(".")[0] if name is None else name
                key += f"({ins.split()[-1]})" if name == "wait" else ""
                if runs and runs[-1][0] == key:
                    runs[-1][1] += 1
                else:
                    runs.append([key, 1])
                break
    return " ".join(k if n == 1 else f"{k}x{n}" for k, n in runs)


def _placement(body: list[str]) -> str:
    """Where a loop body's wgmma waits fall among its softmax: the consumer (from the named
    barrier its warpgroup syncs on: 0 for the default partition, consumer 0), the
    instruction index of each wait, the MUFU.EX2 between wait(1) and wait(0) (overlapped
    with the P·V) and after wait(0), FMUL and I2F counts."""
    waits = [(i, ins.split()[-1]) for i, ins in enumerate(body) if "WARPGROUP.DEPBAR" in ins]
    named = (re.search(r"BAR\.SYNC\S* (0x[0-9a-f]+), 0x80", ins) for ins in body)
    bars = {m.group(1) for m in named if m}
    last = max((i for i, n in waits if n == "0x0"), default=len(body))
    first = min((i for i, n in waits if n == "0x1"), default=0)
    ex2 = [i for i, ins in enumerate(body) if "MUFU.EX2" in ins]
    under = sum(first < i < last for i in ex2)
    consumer = {"0x0": "consumer 0", "0x2": "consumer 1"}.get(",".join(sorted(bars)), str(bars))
    fmul = sum(" FMUL " in f" {ins} " for ins in body)
    i2f = sum("I2FP" in ins for ins in body)
    return (
        f"{consumer}: waits {waits}; EX2 under the P·V {under}, after wait(0) "
        f"{len(ex2) - under}; FMUL {fmul}, I2F {i2f}"
    )


def _loops(sass: list[str]) -> list[tuple[int, str, str]]:
    """The innermost loops that issue wgmma: (SASS instructions per iteration, digest,
    wait placement). (Backward branches of the out-of-line mbarrier retry blocks, after the
    kernel's EXIT, are left out.)"""
    body, labels = _instructions(sass)
    spans = []
    for i, ins in enumerate(body):
        target = re.search(r"`\(\.(L_x_\d+)\)", ins)
        if "BRA" in ins and target and labels.get(target.group(1), i + 1) <= i:
            start = labels[target.group(1)]
            loop = body[start : i + 1]
            if any("GMMA" in b for b in loop) and not any(b.startswith("EXIT") for b in loop):
                spans.append((start, i))
    inner = [a for a in spans if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in spans)]
    return [(end - start + 1, _digest(body[start : end + 1]), _placement(body[start : end + 1]))
            for start, end in inner]  # fmt: skip


def sass_report(causal: bool = False, stages: int = DEFAULT_STAGES, maxnreg: int = MAXNREG,
                persistent: bool = False, varlen: bool = False) -> int:  # fmt: skip
    """Compile for sm_90 without a GPU; print the wgmma waits and kinds, the register plan
    (setmaxnreg per partition), shared memory, ptxas's verdict and the SASS loops.
    varlen: the varlen kernel (its loops: unmasked then masked, per consumer)."""
    if varlen:
        kernel = _compile_sm90_varlen(causal, stages, maxnreg)
    else:
        kernel = _compile_sm90(causal, stages, maxnreg, persistent)
    ptx = kernel.asm["ptx"]
    print("wgmma.wait_group:", re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    print("wgmma kinds:", sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx))))
    print("setmaxnreg:", re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx))
    print(f"warps {kernel.metadata.num_warps}; shared memory {kernel.metadata.shared} B")
    messages = _ptxas_verbose(ptx)
    keep = ("Used", "spill", "arning", "Performance Loss", "stack")
    print("ptxas:", " | ".join(ln for ln in messages if any(k in ln for k in keep)))
    for size, digest, placement in _loops(_sass(kernel.asm["cubin"])):
        print(f"SASS loop, {size} instructions per key block: {digest}")
        print(f"  {placement}")
    return 0


# ----------------------------------------------------------------------------- selfcheck


def _check_blocks(q_len: int, prefix: int, first_row: int, causal: bool) -> list[int]:
    """Brute force of one work item's block ranges against `_consumer_blocks` (the kernel's
    formula) and `_last_key_model`; returns each consumer's masked block count (-1: none of
    its rows is real). Raises AssertionError on a mismatch."""
    kv_len = prefix + q_len
    ns, masked = [], []
    for wg in (0, 1):
        n, full = _consumer_blocks(q_len, kv_len, first_row, wg, causal, ROWS, KEYS)
        lo = first_row + wg * ROWS
        limits = [_last_key_model(r, q_len, kv_len, causal) for r in range(lo, lo + ROWS)]
        real = [last for r, last in zip(range(lo, lo + ROWS), limits, strict=True) if r < q_len]
        case = f"q_len {q_len} prefix {prefix} row {first_row} wg {wg} causal {causal}"
        ns.append(n)
        if not real:
            assert (n, full) == (0, 0), case
            masked.append(-1)
            continue
        # The [rows, keys] visibility matrix (brute force over the keys, not the formula).
        rows = np.arange(lo, min(lo + ROWS, q_len))[:, None]
        sees = (np.arange(kv_len)[None, :] <= prefix + rows) | (not causal)
        assert sees.sum(1).tolist() == [lim + 1 for lim in real], case  # per-row limit
        last = int(np.nonzero(sees.any(0))[0].max()) // KEYS
        whole = int(np.argmin(np.append(sees.all(0), False))) // KEYS  # blocks seen by all
        assert n == max(last + 1, 2) and full == whole, (case, n, full, last, whole)
        # Every row (padding too) sees key 0; blocks past the last are fully masked for all
        # 64 rows, and only they can lie past the sequence's last page (clamped there).
        assert all(lim >= 0 for lim in limits), case
        for block in range(last + 1, n):
            assert all(lim < block * KEYS for lim in limits), case
        assert last <= (kv_len - 1) // KEYS, case
        masked.append(n - full)
    if ns[1]:
        assert ns[1] >= ns[0] and ns[1] - ns[0] <= 1, (q_len, prefix, first_row, ns)
    return masked


def _protocol_run(items: list[tuple[int, int, int]], stages: int, rng) -> None:
    """Random interleaving of the varlen kernel's barrier protocol for one program: the
    producer, the TMA completions and both consumers, op for op as the kernel issues them,
    on the items' (n0, n1, loaded). Asserts no deadlock, no stage read before it landed or
    overwritten before both releases, and wgmma issues alternating by turn."""
    bars = {("ready", s): [0, 0, 3] for s in range(stages)}  # expect, TMA bytes, scales
    bars |= {("empty", s): [0, 0, 2] for s in range(stages)}
    bars |= {("turn", w): [0, 0, 1] for w in (0, 1)}
    stage_holds: dict[int, int] = {}
    releases: dict[int, int] = {}
    issues: list[int] = []

    def producer():
        g = 0
        for _, _, loaded in items:
            for _ in range(loaded):
                s = g % stages
                yield ("wait", ("empty", s), ((g // stages) & 1) ^ 1)
                old = stage_holds.get(s)
                assert old is None or releases.get(old) == 2, f"stage {s} overwritten"
                stage_holds[s] = g
                yield ("arrive", ("ready", s))
                yield ("tma", ("ready", s))
                yield ("arrive", ("ready", s))
                g += 1

    def consumer(wg):
        base = 0

        def turn_wait(k):
            return ("wait", ("turn", wg), (k + 1 - wg) & 1)

        def read(g):
            assert stage_holds.get(g % stages) == g, f"block {g} read from a stale stage"

        def idle(start, stop):
            for g in range(start, stop):
                yield turn_wait(g)
                yield ("arrive", ("turn", 1 - wg))
                yield ("wait", ("ready", g % stages), (g // stages) & 1)
                yield ("release", g)

        for item in items:
            n, loaded = item[wg], item[2]
            if n == 0:
                yield from idle(base, base + loaded)
                base += loaded
                continue
            yield ("wait", ("ready", base % stages), (base // stages) & 1)
            read(base)
            yield turn_wait(base)
            for j in range(n - 1):
                g = base + j
                yield ("wait", ("ready", (g + 1) % stages), ((g + 1) // stages) & 1)
                read(g + 1)
                read(g)
                issues.append(wg)
                yield ("arrive", ("turn", 1 - wg))
                yield turn_wait(g + 1)
                read(g)
                yield ("release", g)
            g = base + n - 1
            read(g)
            issues.append(wg)
            yield ("arrive", ("turn", 1 - wg))
            yield from idle(g + 1, base + loaded)
            yield ("release", g)
            base += loaded

    def arrive(key):
        bar = bars[key]
        bar[1] += 1
        if bar[1] == bar[2]:
            bar[0], bar[1] = bar[0] + 1, 0

    agents = [producer(), consumer(0), consumer(1)]
    pending = [next(a, None) for a in agents]
    tma: list = []
    holding = [False, False]  # which consumer holds the turn: never both
    while any(op is not None for op in pending) or tma:
        ready = [
            i
            for i, op in enumerate(pending)
            if op is not None and (op[0] != "wait" or bars[op[1]][0] & 1 != op[2])
        ]
        choices = ready + (["tma"] if tma else [])
        assert choices, "deadlock"
        pick = choices[rng.randrange(len(choices))]
        if pick == "tma":
            arrive(tma.pop(rng.randrange(len(tma))))
            continue
        op = pending[pick]
        if op[0] == "wait" and op[1][0] == "turn":  # consumer pick - 1 takes a turn
            assert not holding[2 - pick], "both consumers hold a turn"
            holding[pick - 1] = True
        elif op[0] == "arrive" and op[1][0] == "turn":
            holding[pick - 1] = False
        if op[0] == "arrive":
            arrive(op[1])
        elif op[0] == "tma":
            tma.append(op[1])
        elif op[0] == "release":
            releases[op[1]] = releases.get(op[1], 0) + 1
            arrive(("empty", op[1] % stages))
        pending[pick] = next(agents[pick], None)
    assert not any(holding), "a turn left held"
    assert len(issues) == sum(n0 + n1 for n0, n1, _ in items)


def selfcheck(cases: int = 3000, seeds: int = 200, seed: int = 0) -> int:
    """No GPU: the block-range formulas against brute force over random (q_len, prefix,
    tile) cases, the work plan's coverage and order, and the barrier protocol under random
    interleavings (3 and 4 stages, random item lists with uneven and idle consumers)."""
    import random

    rng = random.Random(seed)
    special_q = [1, 7, 63, 64, 65, 127, 128, 129, 191, 192, 200, 255, 256, 333, 1000]
    special_p = [0, 1, 63, 64, 65, 100, 127, 128, 511, 3000]
    worst = {True: 0, False: 0}
    checked = 0
    for _ in range(cases):
        q_len = rng.choice(special_q) if rng.random() < 0.5 else rng.randint(1, 1200)
        prefix = rng.choice(special_p) if rng.random() < 0.5 else rng.randint(0, 3000)
        causal = rng.random() < 0.7
        for first_row in range(0, q_len, TILE):
            masked = _check_blocks(q_len, prefix, first_row, causal)
            worst[causal] = max(worst[causal], *masked)
            checked += 1
    print(f"block ranges: {checked} tiles match brute force; most masked blocks per "
          f"consumer: causal {worst[True]}, non-causal {worst[False]}")  # fmt: skip

    q_lens, kv_lens = [1, 7, 200, 333, 128, 1000], [1, 71, 300, 844, 3128, 1511]
    for causal in (True, False):
        plan = work_plan(q_lens, kv_lens, 4, causal).tolist()
        tiles = {(s, r) for s, r, _ in plan}
        assert len(plan) == len(set(map(tuple, plan))) == 4 * len(tiles)
        assert tiles == {(s, r) for s, q in enumerate(q_lens) for r in range(0, q, TILE)}
        work = [tile_work(q_lens[s], kv_lens[s], r, causal) for s, r, _ in plan]
        assert work == sorted(work, reverse=True)
    print("work plan: every (tile, head) once, longest work first")

    runs = 0
    for stages in (3, 4):
        for s in range(seeds):
            prng = random.Random(1000 * stages + s)
            causal = prng.random() < 0.7
            items = []
            for _ in range(prng.randint(1, 6)):
                q_len = prng.choice(special_q)
                prefix = prng.choice([0, 1, 64, 100, 200])
                row = prng.choice(range(0, q_len, TILE))
                n0, _ = _consumer_blocks(q_len, prefix + q_len, row, 0, causal, ROWS, KEYS)
                n1, _ = _consumer_blocks(q_len, prefix + q_len, row, 1, causal, ROWS, KEYS)
                items.append((n0, n1, max(n0, n1)))
            _protocol_run(items, stages, prng)
            runs += 1
    print(f"barrier protocol: {runs} random interleavings, no deadlock, no stale stage")
    return 0


# ----------------------------------------------------------------------------- GPU mode


WS_VARIANTS = {"gluon_ws": False, "gluon_ws_persistent": True}  # name -> persistent grid


def _runners_ws(case, caches, table, causal: bool, stages: int,
                variants: list[str]) -> dict[str, Callable]:  # fmt: skip
    """name -> fn(out): this kernel's variants (one program per work item, persistent), the
    v2 probe kernel, the Triton kernel, cuDNN SDPA."""
    runners = _runners(case, caches, table, causal)  # gluon (v2), triton_sage_fp8, sdpa_cudnn

    def ws(persistent: bool) -> Callable:
        def run_ws(out):
            gluon_ws_prefill(case.q, *caches, table, case.seq, out, causal=causal, stages=stages,
                             persistent=persistent)  # fmt: skip

        return run_ws

    def gluon_v2(out):
        gluon_prefill(case.q, *caches, table, case.seq, out, causal=causal)

    chosen = {name: ws(WS_VARIANTS[name]) for name in variants}
    return chosen | {"gluon_v2": gluon_v2, "triton_sage_fp8": runners["triton_sage_fp8"],
                     "sdpa_cudnn": runners["sdpa_cudnn"]}  # fmt: skip


def _checked_run(fn: Callable, like: torch.Tensor) -> torch.Tensor:
    """Run fn into an output poisoned with NaN; assert every element was written finite."""
    out = torch.full_like(like, float("nan"))
    fn(out)
    torch.cuda.synchronize()
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).nonzero()[:4].tolist()
        raise AssertionError(f"non-finite output, first at [token, head, dim] {bad}")
    return out


def _time(runners: dict[str, Callable], like: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per runner, alternating runners round by round (do_bench, rep 50 ms)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            out = torch.full_like(like, float("nan"))
            times[name].append(triton.testing.do_bench(lambda f=fn, o=out: f(o), rep=50))
            if not bool(torch.isfinite(out).all()):  # the timed launches wrote it too
                raise AssertionError(f"{name}: non-finite output while timing")
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _bench_shape(case, caches, table, causal: bool, rounds: int, stages: int,
                 variants: list[str]) -> list[dict]:  # fmt: skip
    """Check every runner (poisoned outputs, finite, vs fp32, vs the v2 probe), then time."""
    seq, runners = case.seq, _runners_ws(case, caches, table, causal, stages, variants)
    outs = {name: _checked_run(fn, case.q) for name, fn in runners.items()}
    first = slice(0, seq)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t[first].float().transpose(0, 1) for t in (case.q, case.k, case.v)), is_causal=causal
    ).transpose(0, 1)
    ms = _time(runners, case.q, rounds)
    flops = 4 * case.q.shape[0] * seq * case.q.shape[1] * HEAD_DIM / (2 if causal else 1)
    rows = []
    for name in runners:
        row = {"seq": seq, "causal": causal, "variant": name, "ms": ms[name],
               "tops": flops / ms[name] / 1e9, "vs_fp32": _accuracy(outs[name][first], exact),
               "vs_gluon_v2": _accuracy(outs[name], outs["gluon_v2"]),
               "vs_triton_sage_fp8": _accuracy(outs[name], outs["triton_sage_fp8"])}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        vs_v2 = row["vs_gluon_v2"]
        if row["variant"] in variants and vs_v2["cosine"] < 0.9999:  # same numerics as v2
            raise AssertionError(f"{row['variant']} disagrees with the v2 probe at seq {seq}, "
                                 f"causal {causal}: {vs_v2}")  # fmt: skip
    return rows


def run(seqs: list[int], rounds: int, stages: int, variants: list[str],
        masks: list[bool]) -> list[dict]:  # fmt: skip
    """Check against the v2 probe, the Triton kernel and fp32 attention, then time."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in seqs:
        case, caches, table = _build(seq, gen)
        for causal in masks:
            rows += _bench_shape(case, caches, table, causal, rounds, stages, variants)
    return rows


# ----------------------------------------------------------------------------- GPU mode: varlen


VARLEN_VARIANTS = {"gluon_ws_varlen": False, "gluon_ws_varlen_persistent": True}
CHECK_Q_LENS, CHECK_PREFIXES = (1, 7, 200, 333, 128, 1000), (0, 64, 100, 511, 3000)
VARLEN_HEADS, VARLEN_KV_HEADS = 32, 8  # GQA, as the served models
CUDNN_NOTE = (
    "cuDNN SDPA cannot take the cached prefix (bottom-right mask over paged keys): on a batch "
    "with prefixes it attends each sequence's new tokens only (q = k = v = the chunk, top-left "
    "causal), less work; on the 16k prompt (no prefix) it is exact"
)


@dataclass
class VarlenBatch:
    """A varlen batch. q: [T, Hq, D] bf16, sequence i at rows q_starts[i] .. + q_lens[i]
    (gap rows between them belong to none); k, v: [sum kv_lens, Hkv, D] bf16, sequence i's
    keys at kv_starts[i] .., its prefix first; caches: the 8-bit cache (INT8 K, FP8 V, page
    64, shuffled pages); table: [B, width] int32 padded; q_start, q_len, kv_len: [B] int32."""

    q_lens: list[int]
    kv_lens: list[int]
    q_starts: list[int]
    kv_starts: list[int]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    caches: tuple
    table: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_len: torch.Tensor

    def covered(self) -> torch.Tensor:
        """[T] bool: the rows of q that belong to a sequence."""
        mask = torch.zeros(self.q.shape[0], dtype=torch.bool, device=self.q.device)
        for start, n in zip(self.q_starts, self.q_lens, strict=True):
            mask[start : start + n] = True
        return mask


def _varlen_batch(q_lens: list[int], prefixes: list[int], gen: torch.Generator,
                  gaps: bool) -> VarlenBatch:  # fmt: skip
    """Random inputs (k with a per-(head, channel) bias), stored through `store_kv`."""
    from sageserve.attention.page_tables import int32_on_device, padded_page_table
    from sageserve.attention.sage_attn.kernels.store import store_kv
    from sageserve.attention.sage_attn.reference import FP8_DTYPE

    dev, hq, hkv = torch.device("cuda"), VARLEN_HEADS, VARLEN_KV_HEADS
    kv_lens = [q + p for q, p in zip(q_lens, prefixes, strict=True)]
    q_starts, row = [], 0
    for n in q_lens:
        row += int(torch.randint(0, 4, (1,), generator=gen)) if gaps else 0
        q_starts.append(row)
        row += n
    tokens = row + (3 if gaps else 0)
    kv_starts = [sum(kv_lens[:i]) for i in range(len(kv_lens))]
    q = torch.randn(tokens, hq, HEAD_DIM, generator=gen).to(dev).bfloat16()
    bias = 2 * torch.randn(1, hkv, HEAD_DIM, generator=gen)
    k = (torch.randn(sum(kv_lens), hkv, HEAD_DIM, generator=gen) + bias).to(dev).bfloat16()
    v = torch.randn(sum(kv_lens), hkv, HEAD_DIM, generator=gen).to(dev).bfloat16()
    per_seq = [-(-kv // KEYS) for kv in kv_lens]
    order = (torch.randperm(sum(per_seq), generator=gen) + 1).tolist()  # page 0: the null page
    tables, pages, offsets = [], [], []
    for i, kv in enumerate(kv_lens):
        table = order[sum(per_seq[:i]) : sum(per_seq[: i + 1])]
        tables.append(tuple(table))
        pos = torch.arange(kv)
        pages.append(torch.tensor(table)[pos // KEYS])
        offsets.append(pos % KEYS)
    num_pages = sum(per_seq) + 1
    caches = (
        torch.zeros(num_pages, hkv, KEYS, HEAD_DIM, dtype=torch.int8, device=dev),
        torch.zeros(num_pages, hkv, KEYS, dtype=torch.float16, device=dev),
        torch.zeros(num_pages, hkv, HEAD_DIM, KEYS, dtype=FP8_DTYPE, device=dev),
        torch.zeros(num_pages, hkv, KEYS, dtype=torch.float16, device=dev),
    )
    store_kv(k, v, k.float().mean(0), None, torch.cat(pages).to(dev), torch.cat(offsets).to(dev),
             *caches)  # fmt: skip
    table = padded_page_table(tables, kv_lens, KEYS, dev)
    q_start, q_len, kv_len = int32_on_device([q_starts, q_lens, kv_lens], dev)
    return VarlenBatch(list(q_lens), kv_lens, q_starts, kv_starts, q, k, v, caches, table,
                       q_start, q_len, kv_len)  # fmt: skip


def _exact_varlen(b: VarlenBatch, causal: bool) -> torch.Tensor:
    """fp32 attention of every sequence (bottom-right causal mask): [T, Hq, D], NaN on the
    rows outside the sequences."""
    group = VARLEN_HEADS // VARLEN_KV_HEADS
    out = torch.full(b.q.shape, float("nan"), dtype=torch.float32, device=b.q.device)
    for qs, n, ks, kv in zip(b.q_starts, b.q_lens, b.kv_starts, b.kv_lens, strict=True):
        q = b.q[qs : qs + n].float().transpose(0, 1)
        k, v = (t[ks : ks + kv].float().repeat_interleave(group, 1).transpose(0, 1)
                for t in (b.k, b.v))  # fmt: skip
        mask = None
        if causal:
            rows = torch.arange(n, device=q.device)[:, None] + (kv - n)
            mask = torch.arange(kv, device=q.device)[None, :] <= rows
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out[qs : qs + n] = o.transpose(0, 1)
    return out


def _varlen_flops(q_lens: list[int], kv_lens: list[int], causal: bool) -> float:
    """4 Hq D x the (row, key) pairs attended (causal: row r of a chunk sees prefix + r + 1)."""
    pairs = sum(n * (kv - n) + n * (n + 1) // 2 if causal else n * kv
                for n, kv in zip(q_lens, kv_lens, strict=True))  # fmt: skip
    return 4.0 * VARLEN_HEADS * HEAD_DIM * pairs


def _cudnn_runner(b: VarlenBatch, causal: bool) -> Callable:
    """cuDNN SDPA over each sequence's new tokens only (equal q_lens; K, V expanded to the
    query heads before timing): the prefix is left out (CUDNN_NOTE)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, group = b.q_lens[0], VARLEN_HEADS // VARLEN_KV_HEADS
    q = torch.stack([b.q[s : s + n] for s in b.q_starts]).transpose(1, 2)
    spans = [(ks + kv - n, ks + kv) for ks, kv in zip(b.kv_starts, b.kv_lens, strict=True)]
    k, v = (
        torch.stack([t[lo:hi] for lo, hi in spans]).repeat_interleave(group, 2).transpose(1, 2)
        for t in (b.k, b.v)
    )

    def cudnn(out):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.copy_(o.transpose(1, 2).reshape(out.shape))

    return cudnn


def _varlen_runners(b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                    timing: bool) -> dict[str, Callable]:  # fmt: skip
    """name -> fn(out): the varlen variants, the Triton kernel (the oracle); when timing,
    cuDNN (equal q_lens) and, on equal-length batches without prefix (multiples of 128),
    the equal-length kernel of this probe (both grids)."""
    from sageserve.attention.sage_attn.kernels import prefill as p8

    plan = work_plan(b.q_lens, b.kv_lens, VARLEN_HEADS, causal).to(b.q.device)

    def ws(persistent: bool) -> Callable:
        def run_ws(out):
            gluon_ws_prefill_varlen(b.q, *b.caches, b.table, b.q_start, b.q_len, b.kv_len, plan,
                                    out, causal=causal, stages=stages,
                                    persistent=persistent)  # fmt: skip

        return run_ws

    def triton_sage(out):
        p8.sage_attention_paged(b.q, None, *b.caches, b.table, b.q_start, b.q_len, b.kv_len,
                                max(b.q_lens), out=out, causal=causal)  # fmt: skip

    runners = {name: ws(VARLEN_VARIANTS[name]) for name in variants}
    runners["triton_sage_fp8"] = triton_sage
    if not timing:
        return runners
    n = b.q_lens[0]
    if all(q == n for q in b.q_lens):
        runners["sdpa_cudnn"] = _cudnn_runner(b, causal)
    if (
        all(q == n == kv for q, kv in zip(b.q_lens, b.kv_lens, strict=True))
        and n % TILE == 0
        and b.q.shape[0] == n * len(b.q_lens)
    ):
        for name, persistent in WS_VARIANTS.items():
            runners[name] = functools.partial(_equal_length, b, n, causal, stages, persistent)
    return runners


def _equal_length(b: VarlenBatch, seq: int, causal: bool, stages: int, persistent: bool,
                  out: torch.Tensor) -> None:  # fmt: skip
    """The equal-length kernel on a batch it covers (no prefix, equal multiples of 128)."""
    gluon_ws_prefill(b.q, *b.caches, b.table, seq, out, causal=causal, stages=stages,
                     persistent=persistent)  # fmt: skip


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def _poisoned_varlen(fn: Callable, b: VarlenBatch, covered: torch.Tensor) -> torch.Tensor:
    """Run fn into a NaN-poisoned output: every row of a sequence written finite, every
    other row still NaN. Returns the covered rows [rows, Hq, D]."""
    out = torch.full_like(b.q, float("nan"))
    fn(out)
    torch.cuda.synchronize()
    mine = out[covered]
    if not bool(torch.isfinite(mine).all()):
        bad = (~torch.isfinite(mine)).nonzero()[:4].tolist()
        raise AssertionError(f"non-finite output, first at [covered row, head, dim] {bad}")
    if not bool(out[~covered].isnan().all()):
        raise AssertionError("rows outside every sequence were written")
    return mine


def _check_varlen(label: str, b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                  exact: bool) -> list[dict]:  # fmt: skip
    """Check the varlen variants against the Triton kernel (cosine >= 0.9999) and fp32
    attention, on poisoned outputs."""
    covered = b.covered()
    runners = _varlen_runners(b, causal, stages, variants, timing=False)
    outs = {name: _poisoned_varlen(fn, b, covered) for name, fn in runners.items()}
    ref = _exact_varlen(b, causal)[covered] if exact else None
    oracle = outs["triton_sage_fp8"]
    rows = []
    for name, out in outs.items():
        vs_oracle = _accuracy(out, oracle) | {"max_abs": _max_abs(out, oracle)}
        row = {"check": label, "causal": causal, "variant": name, "sequences": len(b.q_lens),
               "rows": int(covered.sum()), "vs_triton_sage_fp8": vs_oracle}  # fmt: skip
        if ref is not None:
            row["vs_fp32"] = _accuracy(out, ref) | {"max_abs": _max_abs(out, ref)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        cos = row["vs_triton_sage_fp8"]["cosine"]
        if name in variants and cos < 0.9999:
            raise AssertionError(f"{name} disagrees with the Triton kernel ({label}, causal "
                                 f"{causal}): {row['vs_triton_sage_fp8']}")  # fmt: skip
    return rows


def _time_varlen(label: str, b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                 rounds: int) -> list[dict]:  # fmt: skip
    """Check (poisoned outputs, vs the Triton kernel), then time alternated with the Triton
    kernel, cuDNN and, where it applies, the equal-length kernel."""
    covered = b.covered()
    runners = _varlen_runners(b, causal, stages, variants, timing=True)
    outs = {name: _poisoned_varlen(fn, b, covered) for name, fn in runners.items()}
    ms = _time(runners, b.q, rounds)
    flops = _varlen_flops(b.q_lens, b.kv_lens, causal)
    cudnn_flops = _varlen_flops(b.q_lens, b.q_lens, causal)  # its work: the chunks only
    rows = []
    for name in runners:
        work = cudnn_flops if name == "sdpa_cudnn" else flops
        row = {"timing": label, "causal": causal, "variant": name, "ms": ms[name],
               "tops": work / ms[name] / 1e9, "flops": work,
               "vs_triton_sage_fp8": _accuracy(outs[name], outs["triton_sage_fp8"])}  # fmt: skip
        if name == "sdpa_cudnn":
            row["cudnn_prefix"] = "exact" if b.kv_lens == b.q_lens else "left out (CUDNN_NOTE)"
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if row["variant"] in variants and row["vs_triton_sage_fp8"]["cosine"] < 0.9999:
            raise AssertionError(f"{row['variant']} disagrees with the Triton kernel: {row}")
    return rows


def run_varlen(rounds: int, stages: int, variants: list[str], masks: list[bool],
               timings: list[str]) -> list[dict]:  # fmt: skip
    """The varlen checks (every q_len x prefix of CHECK_*, shuffled, and a random batch;
    gaps between sequences), then the timed batches: "serving" (16 sequences of 1024 new
    tokens over 0..4096-token prefixes) and "prompt16k" (one 16k prompt)."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(q, p) for q in CHECK_Q_LENS for p in CHECK_PREFIXES]
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=gen).tolist()]
    randoms = [(int(torch.randint(1, 1500, (1,), generator=gen)),
                int(torch.randint(0, 4000, (1,), generator=gen))) for _ in range(12)]  # fmt: skip
    checks = {"grid": pairs, "random": randoms}
    rows = []
    for label, chosen in checks.items():
        b = _varlen_batch([q for q, _ in chosen], [p for _, p in chosen], gen, gaps=True)
        for causal in masks:
            rows += _check_varlen(label, b, causal, stages, variants, exact=True)
        del b
    shapes = {
        "serving": ([1024] * 16, torch.randint(0, 4097, (16,), generator=gen).tolist()),
        "prompt16k": ([16384], [0]),
    }
    for label in timings:
        q_lens, prefixes = shapes[label]
        b = _varlen_batch(q_lens, prefixes, gen, gaps=False)
        for causal in masks:
            rows += _time_varlen(label, b, causal, stages, variants, rounds)
        del b
        torch.cuda.empty_cache()
    return rows


def _main_varlen(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """GPU: the varlen checks, then the timed batches; JSON to --out."""
    variants = (args.variants or ",".join(VARLEN_VARIANTS)).split(",")
    if unknown := set(variants) - set(VARLEN_VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    masks = [{"none": False, "causal": True}[m] for m in args.masks.split(",")]
    timings = [] if args.timings == "none" else args.timings.split(",")
    rows = run_varlen(args.rounds, args.stages, variants, masks, timings)
    result = {
        "what": "Gluon 8-bit prefill, warp-specialized, varlen batches with cached prefixes "
        "(host plan of 128-row tiles, longest first; bottom-right causal mask; FP8 P·V, "
        "page 64, 32 query / 8 KV heads, D 128), checked against the Triton kernel and fp32 "
        "on NaN-poisoned outputs with gap rows, then timed against the Triton kernel, cuDNN "
        "and (16k prompt) the equal-length kernel; TOPS count the attended (row, key) pairs",
        "cudnn": CUDNN_NOTE,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "stages": args.stages, "maxnreg": args.maxnreg,
        "variants": {name: {"persistent": VARLEN_VARIANTS[name]} for name in variants},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "rows": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--causal", action="store_true", help="with --sass: the causal kernel")
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="with --sass --causal: the persistent grid's order of work items",
    )
    parser.add_argument(
        "--varlen",
        action="store_true",
        help="the varlen kernel (with --sass: compile it; alone: its GPU check and timing)",
    )
    parser.add_argument(
        "--selfcheck",
        action="store_true",
        help="no GPU: the varlen block ranges vs brute force, the plan, the barrier protocol",
    )
    parser.add_argument("--stages", type=int, default=DEFAULT_STAGES)
    parser.add_argument("--maxnreg", type=int, default=MAXNREG)
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=None,
        help=f"variants to check and time, of {list(WS_VARIANTS)} (default all), with "
        f"--varlen of {list(VARLEN_VARIANTS)}",
    )
    parser.add_argument("--masks", default="none,causal", help="none,causal or one")
    parser.add_argument(
        "--timings",
        default="serving,prompt16k",
        help="with --varlen: timed batches, of serving,prompt16k, or none (checks only)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.selfcheck:
        return selfcheck()
    if args.sass:
        return sass_report(args.causal, args.stages, args.maxnreg, args.persistent,
                           args.varlen)  # fmt: skip
    if args.varlen:
        return _main_varlen(args, parser)
    variants = (args.variants or ",".join(WS_VARIANTS)).split(",")
    if unknown := set(variants) - set(WS_VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    masks = [{"none": False, "causal": True}[m] for m in args.masks.split(",")]
    rows = run([int(s) for s in args.seqs.split(",")], args.rounds, args.stages, variants, masks)
    result = {
        "what": "Gluon 8-bit prefill, warp-specialized (producer warp + 2 ping-pong consumer "
        "warpgroups, 128-row tiles, FP8 P·V, page 64; one program per tile, and persistent) "
        "vs the v2 probe, the Triton kernel and "
        "cuDNN; attention only, 16k tokens x 32 heads, D 128; TOPS halved for causal",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "stages": args.stages, "maxnreg": args.maxnreg,
        "variants": {name: {"persistent": WS_VARIANTS[name]} for name in variants},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "rows": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
