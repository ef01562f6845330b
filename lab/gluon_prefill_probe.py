"""Probe: the 8-bit prefill with explicitly overlapped wgmma, written in Gluon (Triton 3.6).

KERNEL_NOTES.md ("Where the 8-bit prefill's time goes") found the Triton kernel at the
serialized bound: every wgmma is followed by `wgmma.wait_group 0`, so the softmax never runs
under the tensor cores. Gluon exposes the waits: here the softmax of key block j runs under
the QKᵀ of block j + 1 and the P·V of block j - 1, with TMA loads two blocks ahead.

Scope of the probe (not wired into the backend): FP8 P·V, head_dim 128, 64-row query
blocks, page 64 (one key block per page), equal sequence lengths that are multiples of 64,
no cached prefix; causal or not. Same cache layout and numerics as
`sage_attention_paged(..., pv="fp8")`: INT8 Q per row (quantized in the kernel), INT8 K per
token (fp16 scales), FP8 V per token; P scaled by the block's largest V scale and 448
before its e4m3 rounding.

    python lab/gluon_prefill_probe.py --sass [--causal]  # no GPU: compile for sm_90
    python lab/gluon_prefill_probe.py --out probe.json     # GPU: check, then time
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

ROWS, KEYS, HEAD_DIM = 64, 64, 128  # query rows and keys per block (= page), head dim
TOKENS, HEADS = 16384, 32  # timed shapes: TOKENS // seq sequences of seq tokens
DEV = torch.device("cuda")
BLOCK_M, BLOCK_N, DIM = gl.constexpr(ROWS), gl.constexpr(KEYS), gl.constexpr(HEAD_DIM)
STAGES = gl.constexpr(3)  # key blocks in shared memory (TMA runs two ahead)
LOG2E = gl.constexpr(1.4426950408889634)
FP8_MAX = gl.constexpr(448.0)


@gluon.jit
def _issue_block_load(k_desc, v_desc, k_smem, v_smem, bars, table, block, kv_head,
                      num_kv_heads: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """TMA K [BLOCK_N, D] and V [D, BLOCK_N] of key block `block` (= one page) into its stage."""
    stage = block % STAGES
    page = gl.load(table + block)
    tile = page * num_kv_heads + kv_head
    bar = bars.index(stage)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [tile * BLOCK_N, 0], bar, k_smem.index(stage))
    tma.async_copy_global_to_shared(v_desc, [tile * DIM, 0], bar, v_smem.index(stage))


@gluon.jit
def _qk(q_smem, k_smem, bars, block, regs, STAGES: gl.constexpr):
    """Issue S = Q_codes · K_codesᵀ of `block` (INT32, asynchronous) once its load landed.

    regs: zeros of the scores' layout (the product does not read them: use_acc=False).
    """
    stage = block % STAGES
    mbarrier.wait(bars.index(stage), phase=(block // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), regs, use_acc=False,
                         is_async=True)  # fmt: skip


@gluon.jit
def _load_scales(k_scale_ptr, v_scale_ptr, table, block, kv_head, num_kv_heads: gl.constexpr,
                 s_layout: gl.constexpr):  # fmt: skip
    """([BLOCK_N] K scales, [BLOCK_N] V scales) of key block `block` (one page), fp32."""
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    page = gl.load(table + block)
    slot = (page * num_kv_heads + kv_head) * BLOCK_N + keys
    return gl.load(k_scale_ptr + slot).to(gl.float32), gl.load(v_scale_ptr + slot).to(gl.float32)


@gluon.jit
def _softmax(s_float, q_scale, m_i, l_i, k_scale, v_scale, rows, block,
             s_layout: gl.constexpr, CAUSAL: gl.constexpr):  # fmt: skip
    """Online softmax of one block of scores (INT32 products, as fp32): (FP8 P codes, alpha,
    m, l, unit).

    P is scaled per key by its V scale over the block's largest and by 448 before the e4m3
    rounding; unit = that largest scale / 448 is what the block's P·V must be multiplied by.
    CAUSAL: row `rows[i]` (position in its sequence) sees keys up to itself.
    """
    scores = s_float * k_scale[None, :]
    if CAUSAL:
        keys = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        scores = gl.where(keys[None, :] <= rows[:, None], scores, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(scores, axis=1) * q_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(scores * q_scale[:, None] - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    block_max = gl.maximum(gl.max(v_scale, axis=0), 2.0**-24)
    p_codes = (p * (v_scale * (FP8_MAX / block_max))[None, :]).to(gl.float8e4nv)
    return p_codes, alpha, m_new, l_i, block_max / FP8_MAX


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
def _gluon_prefill_kernel(
    q_ptr, k_desc, v_desc, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr,
    seq_len, stride_qt, stride_qh, stride_table, stride_ot, stride_oh, sm_scale,
    num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
):  # fmt: skip
    """One program per (64 query rows, query head, sequence), longest causal rows first; see
    the module doc.

    q: [T, Hq, D] bf16, quantized here; k_desc: [P * Hkv * 64, D] INT8; v_desc:
    [P * Hkv * D, 64] e4m3; k_scale_ptr, v_scale_ptr: [P * Hkv * 64] fp16; out: [T, Hq, D]
    bf16. CAUSAL: row r of a sequence sees keys 0..r (no cached prefix).
    """
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    block_m = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    seq = gl.program_id(2)
    kv_head = head // (num_q_heads // num_kv_heads)
    table = page_table_ptr + seq * stride_table
    first_row = seq * seq_len + block_m * BLOCK_M
    num_blocks = block_m + 1 if CAUSAL else seq_len // BLOCK_N

    q_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                  rank=2)  # fmt: skip
    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, DIM], q_layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, DIM, BLOCK_N], v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for b in gl.static_range(STAGES):
        if b < num_blocks:
            _issue_block_load(k_desc, v_desc, k_smem, v_smem, bars, table, b, kv_head,
                              num_kv_heads, STAGES)  # fmt: skip
    q_scale = _quantize_q_block(q_ptr, q_smem, first_row, head, stride_qt, stride_qh, sm_scale,
                                rows_s)  # fmt: skip
    # Causal: the mask is applied to every block (one select per score); only the last block
    # (the diagonal, with 64-row query blocks over 64-key blocks) has anything masked.
    rows_in_seq = block_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    # acc is kept in units of the last block's (largest V scale / 448): the FP8 product of a
    # block joins acc inside the wgmma, and the unit change rides on the softmax rescale.
    # Block 0 is peeled: the loop carries acc as an in-flight wgmma accumulator. In each
    # iteration the QKᵀ of the next block and the P·V of the previous one run under this
    # block's softmax; one wait retires both before acc is read. Shapes that ptxas pipelines
    # (read with --sass; others make it serialize every wgmma, C7514, or sink the product
    # below the softmax): an in-flight accumulator crosses the loop's back edge only as
    # acc, and the block's scales are loaded one iteration ahead, so that the product is
    # the first thing after the barrier wait. The last block's product is repeated: a spare
    # per program keeps the waits static.
    last = num_blocks - 1
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q_smem, k_smem, bars, 0, s_zero,
                                                        STAGES),)).to(gl.float32)  # fmt: skip
    k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, table, 0, kv_head, num_kv_heads,
                                    s_layout)  # fmt: skip
    s_next = _qk(q_smem, k_smem, bars, gl.minimum(1, last), s_zero, STAGES)
    p_codes, alpha, m_i, l_i, unit = _softmax(s, q_scale, m_i, l_i, k_scale, v_scale,
                                              rows_in_seq, 0, s_layout, CAUSAL)  # fmt: skip
    k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, table, gl.minimum(1, last),
                                    kv_head, num_kv_heads, s_layout)  # fmt: skip
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_next,)).to(gl.float32)
    zero = gl.zeros([BLOCK_M, DIM], gl.float32, o_layout)
    acc = warpgroup_mma(gl.convert_layout(p_codes, p_layout), v_smem.index(0).permute((1, 0)),
                        zero, use_acc=False, is_async=True)  # fmt: skip
    for j in range(1, num_blocks):
        s_next = _qk(q_smem, k_smem, bars, gl.minimum(j + 1, last), s_zero, STAGES)
        p_codes, alpha, m_i, l_i, new_unit = _softmax(s, q_scale, m_i, l_i, k_scale, v_scale,
                                                      rows_in_seq, j, s_layout,
                                                      CAUSAL)  # fmt: skip
        k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, table,
                                        gl.minimum(j + 1, last), kv_head, num_kv_heads,
                                        s_layout)  # fmt: skip
        acc_now, s_int = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
        s = s_int.to(gl.float32)
        if j - 1 + STAGES < num_blocks:  # block j - 1's stage is free: its P·V is done
            _issue_block_load(k_desc, v_desc, k_smem, v_smem, bars, table, j - 1 + STAGES,
                              kv_head, num_kv_heads, STAGES)  # fmt: skip
        acc_now = acc_now * gl.convert_layout(alpha * (unit / new_unit), rows_o)[:, None]
        acc = warpgroup_mma(gl.convert_layout(p_codes, p_layout),
                            v_smem.index(j % STAGES).permute((1, 0)), acc_now,
                            is_async=True)  # fmt: skip
        unit = new_unit
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    out = acc * gl.convert_layout(unit / l_i, rows_o)[:, None]
    out_rows = first_row + gl.arange(0, BLOCK_M, layout=rows_o)
    d = gl.arange(0, DIM, layout=cols_o)
    offsets = out_rows[:, None] * stride_ot + head * stride_oh + d[None, :]
    gl.store(out_ptr + offsets, out.to(gl.bfloat16))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def _descriptor(tensor: torch.Tensor, shape: list[int], box: list[int], dtype) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(tensor.view(shape), shape, [shape[1], 1], box, layout)


def gluon_prefill(q, k_cache, k_scale, v_cache, v_scale, page_table, seq_len, out,
                  causal: bool = False, maxnreg: int | None = 168) -> None:  # fmt: skip
    """8-bit attention of equal-length sequences (no cached prefix) over a page-64 FP8-V cache.

    q: [T, Hq, D] bf16 (quantized in the kernel); k_cache: [P, Hkv, 64, D] int8; v_cache:
    [P, Hkv, D, 64] float8_e4m3fn; k_scale, v_scale: [P, Hkv, 64] fp16; page_table:
    [B, >= seq_len // 64] int32; out: [T, Hq, D] bf16 (T = B * seq_len). maxnreg 168: three
    programs per SM (measured faster than the compiler's 237 registers and two).
    """
    tokens, heads, dim = q.shape
    pages, kv_heads, page, _ = k_cache.shape
    if (dim, page) != (HEAD_DIM, KEYS) or seq_len % ROWS or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("the probe covers head_dim 128, page 64, FP8 V, seq_len % 64 == 0")
    tiles = pages * kv_heads
    k_desc = _descriptor(k_cache, [tiles * page, dim], [KEYS, dim], gl.int8)
    v_desc = _descriptor(v_cache, [tiles * dim, page], [dim, KEYS], gl.float8e4nv)
    grid = (seq_len // ROWS, heads, tokens // seq_len)
    _gluon_prefill_kernel[grid](
        q, k_desc, v_desc, k_scale, v_scale, page_table, out,
        seq_len, q.stride(0), q.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        dim**-0.5, num_q_heads=heads, num_kv_heads=kv_heads, CAUSAL=causal, num_warps=4,
        maxnreg=maxnreg,
    )  # fmt: skip


def sass_report(maxnreg: int | None = 168, causal: bool = False) -> int:
    """Compile for sm_90 without a GPU; print the wgmma waits and the register use."""
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
        "out_ptr": "*bf16", "seq_len": "i32", "stride_qt": "i32", "stride_qh": "i32",
        "stride_table": "i32", "stride_ot": "i32", "stride_oh": "i32", "sm_scale": "fp32",
        "num_q_heads": "constexpr", "num_kv_heads": "constexpr", "CAUSAL": "constexpr",
    }  # fmt: skip
    constexprs = {"num_q_heads": 32, "num_kv_heads": 32, "CAUSAL": causal}
    src = GluonASTSource(_gluon_prefill_kernel, signature, constexprs=constexprs)
    options = {"num_warps": 4} if maxnreg is None else {"num_warps": 4, "maxnreg": maxnreg}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    print("wgmma.wait_group:", re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    print("wgmma kinds:", sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx))))
    print(f"shared memory {kernel.metadata.shared} B;", _ptxas(ptx))
    return 0


def _ptxas(ptx: str) -> str:
    """ptxas -v of the PTX: registers, spills, and any wgmma serialization warning."""
    from sageserve.attention.sage_attn.kernels.gluon.offline import ptxas_verdict

    keep = ("Used", "spill", "Performance Loss")
    return " | ".join(ln for ln in ptxas_verdict(ptx).messages if any(k in ln for k in keep))


@dataclass
class Case:
    """One shape's bf16 inputs: q, k, v [TOKENS, HEADS, D] (`batch` sequences of `seq`)."""

    seq: int
    batch: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor  # [batch] int32: first row of each sequence
    lens: torch.Tensor  # [batch] int32: seq


def _case(seq: int, gen: torch.Generator) -> Case:
    """Random normal q, v; k normal plus a per-(head, channel) bias, as real keys carry."""
    batch, shape = TOKENS // seq, (TOKENS, HEADS, HEAD_DIM)
    q = torch.randn(shape, generator=gen).to(DEV).bfloat16()
    bias = 2 * torch.randn(1, HEADS, HEAD_DIM, generator=gen)
    k = (torch.randn(shape, generator=gen) + bias).to(DEV).bfloat16()
    v = torch.randn(shape, generator=gen).to(DEV).bfloat16()
    starts = (torch.arange(batch) * seq).int().to(DEV)
    lens = torch.full((batch,), seq, dtype=torch.int32, device=DEV)
    return Case(seq, batch, q, k, v, starts, lens)


def _fp8_caches(case: Case, gen: torch.Generator):
    """The case's K/V in the 8-bit cache (INT8 K, FP8 V, page KEYS), pages shuffled:
    ((k codes [P, H, page, D], k scales [P, H, page], v codes [P, H, D, page], v scales),
    padded page table [batch, width] int32)."""
    from sageserve.attention.page_tables import padded_page_table
    from sageserve.attention.sage_attn.kernels.store import store_kv
    from sageserve.attention.sage_attn.reference import FP8_DTYPE

    per_seq = case.seq // KEYS
    num_pages = case.batch * per_seq + 1
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).view(case.batch, per_seq)
    pos = torch.arange(case.seq)
    pages, offsets = order[:, pos // KEYS].flatten(), (pos % KEYS).repeat(case.batch)
    caches = (
        torch.zeros(num_pages, HEADS, KEYS, HEAD_DIM, dtype=torch.int8, device=DEV),
        torch.zeros(num_pages, HEADS, KEYS, dtype=torch.float16, device=DEV),
        torch.zeros(num_pages, HEADS, HEAD_DIM, KEYS, dtype=FP8_DTYPE, device=DEV),
        torch.zeros(num_pages, HEADS, KEYS, dtype=torch.float16, device=DEV),
    )
    k_mean = case.k[: case.seq].float().mean(0)
    store_kv(case.k, case.v, k_mean, None, pages.to(DEV), offsets.to(DEV), *caches)
    tables = [tuple(r) for r in order.tolist()]
    return caches, padded_page_table(tables, [case.seq] * case.batch, KEYS, DEV)


def _build(seq: int, gen: torch.Generator):
    """Inputs of one shape: (case, 8-bit caches with FP8 V at page 64, padded page table)."""
    case = _case(seq, gen)
    return case, *_fp8_caches(case, gen)


def _runners(case, caches, table, causal: bool) -> dict:
    """name -> fn(out): this kernel (Q quantized inside, as in the Triton kernel), the Triton
    kernel (FP8 P·V), and SDPA's cuDNN back end."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sageserve.attention.sage_attn.kernels import prefill as p8

    seq = case.seq

    def gluon(out):
        gluon_prefill(case.q, *caches, table, seq, out, causal=causal)

    def triton(out):
        p8.sage_attention_paged(case.q, None, *caches, table, case.starts, case.lens, case.lens,
                                seq, out=out, causal=causal)  # fmt: skip

    def cudnn(out):
        def heads_first(x):
            return x.view(case.batch, seq, *x.shape[1:]).transpose(1, 2)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(
                *(heads_first(t) for t in (case.q, case.k, case.v)), is_causal=causal
            )
        out.copy_(o.transpose(1, 2).reshape(out.shape))

    return {"gluon": gluon, "triton_sage_fp8": triton, "sdpa_cudnn": cudnn}


def _accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {"cosine": cos, "rel_l1": ((a - b).abs().sum() / b.abs().sum()).item()}


def run(seqs: list[int], rounds: int) -> list[dict]:
    """Check against the Triton kernel and fp32 attention, then time, alternating."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in seqs:
        case, caches, table = _build(seq, gen)
        for causal in (False, True):
            rows += _bench_shape(case, caches, table, causal, rounds)
    return rows


def _bench_shape(case, caches, table, causal: bool, rounds: int) -> list[dict]:
    seq, runners = case.seq, _runners(case, caches, table, causal)
    outs = {}
    for name, fn in runners.items():
        outs[name] = torch.full_like(case.q, float("nan"))
        fn(outs[name])
    torch.cuda.synchronize()
    first = slice(0, seq)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t[first].float().transpose(0, 1) for t in (case.q, case.k, case.v)), is_causal=causal
    ).transpose(0, 1)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            out = outs[name]
            times[name].append(triton.testing.do_bench(lambda f=fn, o=out: f(o), rep=50))
    flops = 4 * case.q.shape[0] * seq * case.q.shape[1] * HEAD_DIM / (2 if causal else 1)
    rows = []
    for name in runners:
        ms = sorted(times[name])[len(times[name]) // 2]
        row = {"seq": seq, "causal": causal, "variant": name, "ms": ms,
               "tops": flops / ms / 1e9, "vs_fp32": _accuracy(outs[name][first], exact),
               "vs_triton_sage_fp8": _accuracy(outs[name], outs["triton_sage_fp8"]),
               "finite": bool(torch.isfinite(outs[name]).all())}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--causal", action="store_true", help="with --sass: the causal kernel")
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.sass:
        return sass_report(causal=args.causal)
    rows = run([int(s) for s in args.seqs.split(",")], args.rounds)
    result = {
        "what": "Gluon 8-bit prefill probe v2 (FP8 P·V, in-kernel Q quantization, page 64, "
        "causal and not) vs the Triton kernel and cuDNN; attention only (no cache store), 16k "
        "tokens x 32 heads, D 128; TOPS halved for causal",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "rows": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
