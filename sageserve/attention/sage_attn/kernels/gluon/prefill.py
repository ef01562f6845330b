"""The warp-specialized 8-bit prefill kernel and its launcher `sage_attention_ws`.

The kernel allocates the shared memory (Q codes, the K/V stage ring, the block scales, the
Hadamard matrix, the fp16 V ring for fp16 P·V) and the mbarriers, then forks the
partitions: two consumer warpgroups (`consumer.py`), the TMA producer and, for fp16 P·V,
the widener (`producer.py`).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sageserve.attention.sage_attn.kernels.gluon.config import (
    BLOCK_M,
    DEFAULT_STAGES,
    HEAD_DIMS,
    KEYS,
    MAXNREG,
    ROTATE_ON_SHARED,
    ROTATE_REGISTERS,
    ROTATE_SHARED,
    block_keys_refusal,
    default_block_keys,
    launch_options,
    resolve_lazy_rescale,
    v16_slots,
)
from sageserve.attention.sage_attn.kernels.gluon.consumer import _consumer
from sageserve.attention.sage_attn.kernels.gluon.producer import _producer, _widener
from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.attention.triton_common import sm_count
from sageserve.kernel_launch import launch


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
def _block_view(v_pages, STAGES: gl.constexpr, N: gl.constexpr):
    """The V pages [STAGES * N // PAGE, D, PAGE] of the stage ring as [STAGES, D, N] tiles.
    An NVMMA tile wider than its swizzle is stored as column strips of the swizzle's width,
    one after the other, each laid out as a tile of that width: so two [D, 64] pages of
    8-bit codes (64-byte swizzle) are the two strips of a [D, 128] tile."""
    if v_pages.shape[0] == STAGES:
        return v_pages
    else:
        width: gl.constexpr = v_pages.type.layout.swizzle_byte_width
        layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=width,
                                                    element_bitwidth=8, rank=2)  # fmt: skip
        return v_pages._reinterpret(v_pages.dtype, [STAGES, v_pages.shape[1], N], layout)


# The item count and the page table's width (its row stride) change from step to step:
# specializing on them (== 1, divisible by 16) would compile variants while serving.
@gluon.jit(do_not_specialize=["n_items", "stride_table"])
def _sage_ws_prefill_kernel(
    q_ptr, q_scale_ptr, k_desc, v_desc, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr,
    plan_ptr, q_start_ptr, q_len_ptr, kv_len_ptr, n_items, stride_qt, stride_qh, stride_st,
    stride_table, stride_ot, stride_oh, sm_scale,
    num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr, CAUSAL: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ROTATE: gl.constexpr, WIDENER_WARPS: gl.constexpr, WIDENER_REGS: gl.constexpr,
    BLOCK_KEYS: gl.constexpr, V16_SLOTS: gl.constexpr, LAZY_RESCALE: gl.constexpr,
):  # fmt: skip
    """8-bit attention of a varlen batch with cached prefixes: work items w = program_id,
    + num_programs, ... < n_items of the plan ([items, 3] int32: sequence, first row of the
    128-row tile, query head), each a tile of 2 x 64 query rows of one head, one consumer
    warpgroup per 64 rows. q_start, q_len, kv_len: [B] int32; rows of
    q outside every sequence are neither read nor written. Causal: row r of a chunk sees
    keys 0 .. kv_len - q_len + r (bottom-right).

    The V descriptor's dtype chooses P·V: FP8 codes (P in e4m3), or INT8 codes, which a
    widener partition of WIDENER_WARPS warps turns into fp16 per stage (`_widener`)
    for an fp16 P·V. D (64 or 128) is the K descriptor's block width. ROTATE: Q rows are
    rotated by the Hadamard matrix before quantization (the cache's K codes are rotated by
    the store). BLOCK_KEYS: keys per block and stage, one page (64) or two (128); the V
    pages of a stage ([D, 64] TMA boxes, one after the other) are read as one [D, 128] tile
    of the same swizzle. V16_SLOTS (fp16 P·V): 0 gives each K/V stage its own fp16 V; > 0
    keeps the fp16 V in a ring of that many slots (`config.v16_slots`; protocol in
    lab/gluon_ws/selfcheck_two_rings.py). LAZY_RESCALE (fp16 P·V): the consumers keep a
    row's running max until it grows past RESCALE_THRESHOLD and rescale the accumulator
    only then (`consumer_steps._rescale_where_grown`)."""
    D: gl.constexpr = k_desc.block_type.shape[1]
    PV_FP8: gl.constexpr = v_desc.dtype == gl.float8e4nv
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.int8)
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per row
    q_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_M, D], q_layout)
    PAGES: gl.constexpr = BLOCK_KEYS // k_desc.block_type.shape[0]
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_KEYS, D], k_desc.layout)
    v_pages = gl.allocate_shared_memory(v_desc.dtype, [STAGES * PAGES, D, BLOCK_KEYS // PAGES],
                                        v_desc.layout)  # fmt: skip
    v_smem = _block_view(v_pages, STAGES, BLOCK_KEYS)
    scale_smem = gl.allocate_shared_memory(gl.float32, [3 * STAGES, BLOCK_KEYS], plain)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # Without the rotation, h_smem is never read.
    h_smem = _sylvester_smem(q_ptr.dtype.element_ty, D) if ROTATE == ROTATE_ON_SHARED else q_smem
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the producer's expect (TMA bytes) and scales
        # One arrive per consumer, and the widener's with a ring of fp16 V of its own.
        mbarrier.init(empty.index(i), count=3 if V16_SLOTS > 0 else 2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)  # the other consumer's end of turn
    # Constexprs go to the partitions directly (in an assigned tuple they become runtime).
    producer_args = (
        k_desc, v_desc, k_smem, v_pages, scale_smem, ready, empty, k_scale_ptr, v_scale_ptr,
        page_table_ptr, stride_table, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
    )  # fmt: skip
    if not PV_FP8:  # the consumers read the fp16 copy, `widened` for it
        RING: gl.constexpr = V16_SLOTS if V16_SLOTS > 0 else STAGES
        v16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, BLOCK_KEYS],
                                                                         gl.float16)  # fmt: skip
        v16_smem = gl.allocate_shared_memory(gl.float16, [RING, D, BLOCK_KEYS], v16_layout)
        widened = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(RING):
            mbarrier.init(widened.index(i), count=1)  # the widener's, after its stores
        if V16_SLOTS > 0:
            v16_empty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(RING):
                mbarrier.init(v16_empty.index(i), count=2)  # one arrive per consumer
        else:
            v16_empty = widened  # one ring: never waited or arrived on
    pv_smem = v_smem if PV_FP8 else v16_smem
    # One ring: the consumers wait on `widened` for the whole block (it follows `ready`).
    qk_ready = ready if (PV_FP8 or V16_SLOTS > 0) else widened
    v_ready = ready if PV_FP8 else widened
    v_empty = empty if PV_FP8 else v16_empty
    consumer_args = (
        q_ptr, out_ptr, q_smem, h_smem, k_smem, pv_smem, scale_smem, qk_ready, empty, turn,
        q_start_ptr, stride_qt, stride_qh, stride_ot, stride_oh, sm_scale, q_scale_ptr,
        stride_st, v_ready, v_empty,
    )  # fmt: skip
    # A partition list cannot be built in pieces (a tuple holding a function is not a value
    # here): one warp_specialize per P·V mode, the fp16 one with the widener.
    if PV_FP8:
        gl.warp_specialize(
            [
                (_consumer, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                             CAUSAL, 0, STAGES, ROTATE, V16_SLOTS, LAZY_RESCALE)),
                (_consumer, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                             CAUSAL, 1, STAGES, ROTATE, V16_SLOTS, LAZY_RESCALE)),
                (_producer, (producer_args, num_q_heads, num_kv_heads, CAUSAL, STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        widener_args = (v_smem, v16_smem, ready, widened, empty, v16_empty, plan_ptr, q_len_ptr,
                        kv_len_ptr, n_items)  # fmt: skip
        gl.warp_specialize(
            [
                (_consumer, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                             CAUSAL, 0, STAGES, ROTATE, V16_SLOTS, LAZY_RESCALE)),
                (_consumer, (consumer_args, plan_ptr, q_len_ptr, kv_len_ptr, n_items,
                             CAUSAL, 1, STAGES, ROTATE, V16_SLOTS, LAZY_RESCALE)),
                (_producer, (producer_args, num_q_heads, num_kv_heads, CAUSAL, STAGES)),
                (_widener, (widener_args, CAUSAL, STAGES, WIDENER_WARPS, V16_SLOTS)),
            ],
            [4, 1, WIDENER_WARPS],
            [CONSUMER_REGS, PRODUCER_REGS, WIDENER_REGS],
        )  # fmt: skip
        for i in gl.static_range(RING):
            mbarrier.invalidate(widened.index(i))
            if V16_SLOTS > 0:
                mbarrier.invalidate(v16_empty.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def sage_attention_ws(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    page_table: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_len: torch.Tensor,
    plan: torch.Tensor,
    out: torch.Tensor,
    sm_scale: float,
    causal: bool = True,
    rotate: bool = False,
    persistent: bool = True,
    stages: int | None = None,
    maxnreg: int = MAXNREG,
    block_keys: int | None = None,
    prequantize: bool = False,
    descriptor_memo: dict | None = None,
    rotate_in_registers: bool = False,
    lazy_rescale: bool | None = None,
) -> torch.Tensor:
    """8-bit attention of every sequence's query chunk over its cached keys, warp-specialized
    (sm_90): what `kernels.prefill.sage_attention_paged` computes, without the channel
    balance.

    q: [T, Hq, D] bf16 or fp16, D 64 or 128 (unrotated: with `rotate`, it is rotated before
    quantization); k_cache: [P, Hkv, 64, D] int8 (rotated keys when `rotate`); v_cache: [P,
    Hkv, D, 64] float8_e4m3fn (FP8 P·V) or int8 (fp16 P·V); k_scale, v_scale: [P, Hkv, 64]
    fp16. page_table: [B, width] int32 from `padded_page_table`; q_start, q_len, kv_len: [B]
    int32 (q_len >= 1 for every planned sequence, kv_len >= q_len, the new keys already
    stored); plan: `plan.work_plan(...)` [items, 3] int32 on q's device, made with the same
    causal flag; out: [T, Hq, D] in q's dtype, rows outside every planned sequence
    untouched. sm_scale: the softmax scale of the (rotated) basis. persistent: one program
    per SM over the plan's items round-robin (the default: on an H100 it was never slower
    than one program per item and 5-15% faster on a batch of 1k-token chunks over cached
    prefixes; BENCHMARKS.md, 2026-12-06); otherwise one program per item. block_keys: keys
    per softmax step and ring stage, one page (64) or two (128); None: `default_block_keys`.
    stages: K/V stages (None: DEFAULT_STAGES). prequantize: Q rotated and quantized by
    `quantize_q` before the launch, instead of in each tile's prologue (frees the shared
    memory of the ±1 matrix). descriptor_memo: a dict owned by the cache, where the cache's
    two TMA descriptors are kept (`cache_descriptors`); None: built every call. One or two
    launches, no host sync. rotate_in_registers: Q's rotation by mma.sync over the ±1
    matrix made in registers, not one wgmma over it in shared memory (lab, not served: 5-8%
    slower on the serving batch on an H100, lab/KERNEL_NOTES.md "v3, round 6 on an H100").
    lazy_rescale (fp16 P·V only): a row keeps its running max until a block's exceeds it by
    more than 2^8, and the accumulator is rescaled only then (FlashAttention-4's lever);
    None: `default_lazy_rescale` (on with fp16 P·V at head_dim 128). Returns out.
    """
    check_ws_args(q, k_cache, v_cache, plan, out)
    _, heads, dim = q.shape
    pv_fp8 = v_cache.dtype == torch.float8_e4m3fn
    block_keys = block_keys or default_block_keys(dim)
    if refusal := block_keys_refusal(pv_fp8, dim, block_keys, prequantize):
        raise ValueError(refusal)
    lazy_rescale = resolve_lazy_rescale(lazy_rescale, pv_fp8, dim)
    stages = stages or DEFAULT_STAGES
    if plan.shape[0] == 0:
        return out
    q_args = _query_args(q, sm_scale, rotate, prequantize)
    k_desc, v_desc = cache_descriptors(k_cache, v_cache, descriptor_memo)
    grid = plan.shape[0]
    if persistent:
        grid = min(grid, sm_count(q.device, cpu_sms=1))
    codes, scales, stride_t, stride_h, stride_s = q_args
    launch(_sage_ws_prefill_kernel, (grid,),
        codes, scales, k_desc, v_desc, k_scale, v_scale, page_table, out, plan, q_start, q_len,
        kv_len, plan.shape[0], stride_t, stride_h, stride_s, page_table.stride(0),
        out.stride(0), out.stride(1), sm_scale, num_q_heads=heads,
        num_kv_heads=k_cache.shape[1], CAUSAL=causal,
        **launch_options(stages, maxnreg, _rotate_constexpr(rotate and not prequantize,
                                                            rotate_in_registers), block_keys,
                         v16_slots(pv_fp8, dim, block_keys), lazy_rescale),
    )  # fmt: skip
    return out


def _rotate_constexpr(rotate: bool, in_registers: bool) -> int:
    """The kernel's ROTATE: 0 (no rotation in the kernel), ROTATE_SHARED or ROTATE_REGISTERS."""
    if not rotate:
        return 0
    return ROTATE_REGISTERS if in_registers else ROTATE_SHARED


def _query_args(q: torch.Tensor, sm_scale: float, rotate: bool, prequantize: bool) -> tuple:
    """(q_ptr, q_scale_ptr, stride_qt, stride_qh, stride_st) of the kernel: q itself (its
    scale pointer unused), or its codes [T, Hq, D] int8 and row scales [T, Hq] fp32 from
    `quantize_q` (rotated the tensor-core way, as the kernel's own rotation)."""
    if not prequantize:
        return q, q, q.stride(0), q.stride(1), 0
    rotation = HadamardKernel.TENSOR_CORE if rotate else HadamardKernel.OFF
    codes, scales = quantize_q(q, sm_scale, rotation)
    return codes, scales, codes.stride(0), codes.stride(1), scales.stride(0)


def cache_descriptors(
    k_cache: torch.Tensor, v_cache: torch.Tensor, memo: dict | None
) -> tuple[TensorDescriptor, TensorDescriptor]:
    """(K, V) TMA descriptors of one layer's 8-bit cache (k_cache: [P, Hkv, 64, D] int8;
    v_cache: [P, Hkv, D, 64] int8 or fp8). memo: a dict owned by the cache, keyed by the two
    tensors' addresses and shapes (what it holds lives as long as the pool); building the
    two took tens of µs of host time a layer on an H100 machine. None: built every call."""
    key = ("gluon", k_cache.data_ptr(), v_cache.data_ptr(), tuple(k_cache.shape), v_cache.dtype)
    if memo is not None and (built := memo.get(key)) is not None:
        return built
    dim, page = k_cache.shape[3], k_cache.shape[2]
    v_dtype = gl.float8e4nv if v_cache.dtype == torch.float8_e4m3fn else gl.int8
    built = (cache_descriptor(k_cache.view(-1, dim), [KEYS, dim], gl.int8),
             cache_descriptor(v_cache.view(-1, page), [dim, KEYS], v_dtype))  # fmt: skip
    if memo is not None:
        memo[key] = built
    return built


def cache_descriptor(rows: torch.Tensor, box: list[int], dtype: gl.dtype) -> TensorDescriptor:
    """A TMA descriptor over a cache viewed as 2-D rows ([P * Hkv * 64, D] keys or
    [P * Hkv * D, 64] transposed values), loading `box` tiles into the NVMMA layout wgmma
    reads."""
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(rows, list(rows.shape), [rows.shape[1], 1], box, layout)


def check_ws_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  plan: torch.Tensor, out: torch.Tensor) -> None:  # fmt: skip
    """ValueError unless the kernel covers these shapes and dtypes."""
    _, heads, dim = q.shape
    _, kv_heads, page, _ = k_cache.shape
    if dim not in HEAD_DIMS or page != KEYS or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"the warp-specialized prefill covers head_dim {HEAD_DIMS}, page size {KEYS} and "
            f"bf16/fp16 queries; got head_dim {dim}, page size {page}, {q.dtype}"
        )
    if v_cache.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"V codes must be FP8 e4m3 or INT8, got {v_cache.dtype}")
    if heads % kv_heads or plan.dtype != torch.int32 or plan.shape[1:] != (3,):
        raise ValueError("heads must be a multiple of KV heads, plan [items, 3] int32")
    if q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("q and out need their last dimension contiguous")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")  # fmt: skip
