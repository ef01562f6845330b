"""Quantize new keys and values and write them into the 8-bit paged cache, in one pass.

Numerics are those of `reference.quantize_kv`: the key is smoothed and balanced,
((k - mean) / c), then INT8 with a per-token, per-head scale rounded to fp16; the value is
INT8 (pv="fp16") or FP8 e4m3 (pv="fp8") likewise. Every division is IEEE-rounded, so the
codes equal the reference's bit for bit (`_divide` says how that is done cheaply).

Work split: a program owns one KV head and `tiles_per_program` consecutive tiles of BLOCK_T
tokens (heads fastest across programs, so neighbouring programs read one token's heads,
which are contiguous in k and v). The per-channel mean and balance, and the balance's
reciprocal, are loaded and computed once per program. Per tile it loads [BLOCK_T, D] of K
and of V (16-byte vectors along D), quantizes them row by row and writes:

- K codes: one contiguous D-byte row per token (16-byte stores whatever the token's slot);
- V codes: the cache keeps V transposed per page ([D, page], keys contiguous), so the tile
  goes through shared memory (a layout conversion) and is stored with tokens fastest;
- scales: one fp16 per token and tensor.

When a tile's BLOCK_T tokens fill consecutive offsets of one page starting at a multiple of
BLOCK_T (a prefill chunk, away from its ends) the run path writes V as BLOCK_T-byte rows
(16-byte stores) and the scales as vectors. Other tiles (decode rows, chunk edges, pages
that BLOCK_T does not divide) take the scattered path: V byte by byte, tokens across the
lanes of a warp, so consecutive tokens of one page still coalesce into one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.kernels.rotate import (
    HadamardKernel,
    check_rotation,
    hadamard_tile,
)
from sageserve.attention.triton_common import interpreting, sm_count
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv, next_power_of_2

MIN_SCALE = tl.constexpr(2.0**-24)
# Under the interpreter (CPU), pretend to have this many SMs: several tiles per program.
CPU_SMS = 1


@dataclass(frozen=True)
class StoreConfig:
    """Launch knobs of `store_kv` (swept in lab/KERNEL_NOTES.md, "sage_store v2").

    block_t: tokens per tile, a power of two; the run path needs page_size % block_t == 0.
    num_warps, maxnreg: per program (maxnreg caps registers: more programs per SM).
    programs_per_sm, max_tiles: the grid is about programs_per_sm programs per SM, each
    with at most max_tiles tiles (None: no cap); see `tiles_per_program`.
    tiles_per_program: fixed instead (tests use it to cover the loop).
    fast_div: divide through an IEEE reciprocal and one FMA correction (`_divide`);
    None = on when compiled, off under the interpreter, whose `fma` rounds twice.
    """

    block_t: int = 16
    num_warps: int = 8
    maxnreg: int | None = None
    programs_per_sm: int = 2
    max_tiles: int | None = None
    tiles_per_program: int | None = None
    fast_div: bool | None = None


def default_config(
    page_size: int, rows: int | None = None, sms: int = 1, min_block_t: int = 1
) -> StoreConfig:
    """The library's choice, predicted from the sm_90 compile (KERNEL_NOTES "sage_store v2"):
    32-token tiles when pages hold whole tiles (16 KB of K/V per tile; capped at 128
    registers, no spills), else 16 (8 KB, 127 registers). Either way two 8-warp programs
    fill an SM's registers, so programs_per_sm=2 makes the grid one wave.

    rows: tokens × KV heads of the launch, sms: the device's SMs. A launch with fewer rows
    than one such tile per SM (a decode step) gets tiles just large enough to spread its
    rows over every SM (at least min_block_t: 16 for the tensor-core rotation): at 64
    tokens × 8 heads, 32-token tiles made 16 programs, each storing 4096 V bytes one by one
    to 32 different pages, while 116 SMs idled.
    """
    if page_size % 32 == 0:
        full = StoreConfig(block_t=32, num_warps=8, maxnreg=128)
    else:
        full = StoreConfig(block_t=16, num_warps=8)
    if rows is None or rows >= full.block_t * sms:
        return full
    block_t = max(min_block_t, next_power_of_2(cdiv(rows, sms)))
    if block_t >= full.block_t:
        return full
    return StoreConfig(block_t=block_t, num_warps=1 if block_t <= 2 else 2 if block_t <= 8 else 4)


@triton.jit
def _divide(x, d, r, neg_d, FAST_DIV: tl.constexpr):
    """x / d rounded as IEEE division does. x, d: [M, N] fp32; when FAST_DIV, r = RN(1/d)
    and neg_d = -d (Triton negates by subtracting from 0: one FADD per use otherwise).

    FAST_DIV: q = x·r, then Markstein's correction q + (x - q·d)·r in two FMAs, which is
    RN(x/d) whenever the residual x - q·d does not underflow. Checked against IEEE division
    (tests/test_kernels_sage_store.py): differences only where |x| or |x/d| < 1e-30, far
    below any value whose INT8/FP8 code or fp16 scale it could change. Three FP32 operations
    instead of `div.rn`'s ~11 (a MUFU reciprocal, FMAs, a slow-path check and branch): the
    sm_90 loop takes ~23 instructions per element instead of ~33, and at ~33 the store
    would be about as issue-bound as memory-bound on an H100.
    """
    if FAST_DIV:
        q = x * r
        return tl.fma(tl.fma(q, neg_d, x), r, q)
    else:
        return tl.div_rn(x, d)


@triton.jit
def _reciprocal(d, FAST_DIV: tl.constexpr):
    """RN(1 / d) when FAST_DIV (`_divide` needs it), else d itself (unused)."""
    if FAST_DIV:
        return tl.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
    else:
        return d


@triton.jit
def _scaled(x, max_code: tl.constexpr, FAST_DIV: tl.constexpr):
    """x: [M, N] fp32 -> (x / scale [M, N], scale [M] fp32): per row, scale = max|x| /
    max_code rounded through fp16, never below MIN_SCALE (the reference's `_scales`)."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, max_code, tl.float32)), MIN_SCALE)
    scale = scale.to(tl.float16).to(tl.float32)
    # Reciprocal and negation per row, before the broadcast: a thread holds whole row
    # segments, so this is one division per row it holds, not per element.
    row = scale[:, None]
    row_r = tl.broadcast_to(_reciprocal(row, FAST_DIV), x.shape)
    row_neg = tl.broadcast_to(0.0 - row, x.shape)
    return _divide(x, tl.broadcast_to(row, x.shape), row_r, row_neg, FAST_DIV), scale


@triton.jit
def _int8_codes(x, FAST_DIV: tl.constexpr):
    """x: [M, N] fp32 -> (int8 codes [M, N], fp32 scales [M]).

    The reference rounds half away from zero as trunc(fl(y ± 0.5)), clamped to ±127; the
    ±0.5 is copysign(0.5, y) by bits (one LOP3 instead of a compare and a select; -0.0 gets
    -0.5 where the reference adds +0.5, and both truncate to 0).
    """
    y, scale = _scaled(x, 127.0, FAST_DIV)
    half = (y.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000
    y = y + half.to(tl.float32, bitcast=True)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8), scale


@triton.jit
def _fp8_codes(x, FAST_DIV: tl.constexpr):
    """x: [M, N] fp32 -> (FP8 e4m3 codes [M, N], fp32 scales [M]), scale = max|x| / 448."""
    y, scale = _scaled(x, 448.0, FAST_DIV)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return y.to(tl.float8e4nv), scale


@triton.jit
def _is_run(pages, offsets, page0, offset0, tokens, num_tokens, BLOCK_T: tl.constexpr):
    """True when all BLOCK_T tokens exist and go to offsets offset0 + i of page page0, with
    offset0 a multiple of BLOCK_T. pages, offsets, tokens: [BLOCK_T]; page0, offset0: scalars."""
    i = tl.arange(0, BLOCK_T)
    same = (pages == page0) & (offsets == offset0 + i) & (tokens < num_tokens)
    return (tl.min(same.to(tl.int32), axis=0) == 1) & (offset0 % BLOCK_T == 0)


@triton.jit
def _store_run(
    k_codes, k_scale, v_codes, v_scale, head_page, start,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_size: tl.constexpr, head_dim: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Write a tile whose tokens fill offsets start.. start + BLOCK_T of one [page, head]
    block. head_page = page * Hkv + head, start: int64 scalars, start written by the caller
    as (offset // BLOCK_T) * BLOCK_T so that the compiler sees every store's alignment.
    k_codes, v_codes: [BLOCK_T, D]; k_scale, v_scale: [BLOCK_T] fp32."""
    i = tl.arange(0, BLOCK_T)
    d = tl.arange(0, head_dim)
    slot = head_page * page_size + start  # first token's [page, head, offset] index
    tl.store(k_cache_ptr + slot * head_dim + i[:, None] * head_dim + d[None, :], k_codes)
    tl.store(k_scale_ptr + slot + i, k_scale.to(tl.float16))
    tl.store(v_scale_ptr + slot + i, v_scale.to(tl.float16))
    v_dst = v_cache_ptr + head_page * (head_dim * page_size) + start
    tl.store(v_dst + i[:, None] + d[None, :] * page_size, v_codes)


@triton.jit
def _store_scattered(
    k_codes, k_scale, v_codes, v_scale, head_page, offsets, live,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_size: tl.constexpr, head_dim: tl.constexpr,
):  # fmt: skip
    """Write a tile token by token. head_page, offsets: [BLOCK_T] int64 (page * Hkv + head,
    offset in the page); live: [BLOCK_T] bool (tokens past the batch are not written).

    The V pointers are [BLOCK_T, D] with nothing known of their contiguity; the compiler
    then puts tokens across the lanes (the [D, BLOCK_T] orientation would put D there)."""
    d = tl.arange(0, head_dim)
    slot = head_page * page_size + offsets  # [BLOCK_T]: each token's [page, head, offset]
    tl.store(k_cache_ptr + (slot * head_dim)[:, None] + d[None, :], k_codes, mask=live[:, None])
    tl.store(k_scale_ptr + slot, k_scale.to(tl.float16), mask=live)
    tl.store(v_scale_ptr + slot, v_scale.to(tl.float16), mask=live)
    v_dst = v_cache_ptr + (head_page * (head_dim * page_size) + offsets)[:, None]
    tl.store(v_dst + (d * page_size)[None, :], v_codes, mask=live[:, None])


@triton.jit
def _load_tile(
    k_ptr, v_ptr, tile, last, h, num_tokens, stride_kt, stride_kh, stride_vt, stride_vh,
    head_dim: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """K and V of tile `tile` for head h, [BLOCK_T, D] in their own dtype; rows past the
    batch, and the whole tile when tile >= last, are not read (zeros)."""
    tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    live = ((tokens < num_tokens) & (tile < last))[:, None]
    t = tokens.to(tl.int64)[:, None]  # T × stride can pass 2^31 in long prefill steps
    d = tl.arange(0, head_dim)[None, :]
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=live, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=live, other=0.0)
    return k, v


# Token counts vary with every prompt: specializing on them (1, multiples of 16, other)
# would compile a variant on a user's request that the warm-up did not happen to make (a
# first 700-token prompt took 820 ms on an H200, its steady TTFT 33 ms).
@triton.jit(do_not_specialize=["num_tokens", "tiles_per_program"])
def _store_kv_kernel(
    k_ptr, v_ptr, mean_ptr, balance_ptr, pages_ptr, offsets_ptr,
    k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr, num_tokens, tiles_per_program,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads: tl.constexpr, page_size: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_BALANCE: tl.constexpr,
    V_FP8: tl.constexpr, RUNS: tl.constexpr, FAST_DIV: tl.constexpr, ROTATE: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """One program per (KV head, tiles_per_program tiles of BLOCK_T tokens), heads fastest.

    The next tile's K and V are loaded before the current one is quantized, so each program
    keeps a tile of reads in flight while it computes. RUNS (constexpr: page_size % BLOCK_T
    == 0) compiles the run path beside the scattered one. ROTATE (a `HadamardKernel`): each
    K tile is rotated (`hadamard_tile`, STAGES = log2 D) in registers before the mean is
    subtracted.
    """
    pid = tl.program_id(0)
    h = pid % num_kv_heads
    first = (pid // num_kv_heads) * tiles_per_program
    last = tl.minimum(first + tiles_per_program, tl.cdiv(num_tokens, BLOCK_T))
    i = tl.arange(0, BLOCK_T)
    # [BLOCK_T, D] loads of the per-channel vectors (rows repeated, served by L1): a [1, D]
    # load gets a layout of its own, and the compiler then moves the whole K tile to it.
    channel = h * head_dim + tl.arange(0, head_dim)[None, :] + tl.zeros([BLOCK_T, 1], tl.int32)
    mean = tl.load(mean_ptr + channel) if HAS_MEAN else None
    balance = tl.load(balance_ptr + channel) if HAS_BALANCE else None
    balance_r = _reciprocal(balance, FAST_DIV) if HAS_BALANCE else None
    balance_neg = 0.0 - balance if HAS_BALANCE else None
    k_next, v_next = _load_tile(k_ptr, v_ptr, first, last, h, num_tokens,
                                stride_kt, stride_kh, stride_vt, stride_vh,
                                head_dim, BLOCK_T)  # fmt: skip
    for tile in range(first, last):
        k = hadamard_tile(k_next, BLOCK_T, head_dim, STAGES, ROTATE, False)
        v = v_next.to(tl.float32)
        k_next, v_next = _load_tile(k_ptr, v_ptr, tile + 1, last, h, num_tokens,
                                    stride_kt, stride_kh, stride_vt, stride_vh,
                                    head_dim, BLOCK_T)  # fmt: skip
        if HAS_MEAN:
            k = k - mean
        if HAS_BALANCE:
            k = _divide(k, balance, balance_r, balance_neg, FAST_DIV)
        k_codes, k_scale = _int8_codes(k, FAST_DIV)
        if V_FP8:
            v_codes, v_scale = _fp8_codes(v, FAST_DIV)
        else:
            v_codes, v_scale = _int8_codes(v, FAST_DIV)

        tokens = tile * BLOCK_T + i
        live = tokens < num_tokens
        pages = tl.load(pages_ptr + tokens, mask=live, other=0).to(tl.int64)
        offsets = tl.load(offsets_ptr + tokens, mask=live, other=0).to(tl.int64)
        head_page = pages * num_kv_heads + h
        if RUNS:
            page0 = tl.load(pages_ptr + tile * BLOCK_T).to(tl.int64)
            offset0 = tl.load(offsets_ptr + tile * BLOCK_T).to(tl.int64)
            if _is_run(pages, offsets, page0, offset0, tokens, num_tokens, BLOCK_T):
                _store_run(k_codes, k_scale, v_codes, v_scale, page0 * num_kv_heads + h,
                           (offset0 // BLOCK_T) * BLOCK_T,
                           k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                           page_size, head_dim, BLOCK_T)  # fmt: skip
            else:
                _store_scattered(k_codes, k_scale, v_codes, v_scale, head_page, offsets, live,
                                 k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                                 page_size, head_dim)  # fmt: skip
        else:
            _store_scattered(k_codes, k_scale, v_codes, v_scale, head_page, offsets, live,
                             k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
                             page_size, head_dim)  # fmt: skip


def tiles_per_program(tokens: int, heads: int, device: torch.device, config: StoreConfig) -> int:
    """Tiles each program takes, from static quantities only (CUDA-graph safe).

    Each KV head's tiles are cut into programs_per_sm · SMs // heads chunks (at least one),
    so the grid is at most programs_per_sm programs per SM: one wave when that is how many
    fit, with every program within a tile of the others (no tail wave of long programs).
    The per-program work (mean/balance loads, the balance reciprocals) is paid once per
    program, and a program overlaps its next tile's reads with the current tile's arithmetic.
    """
    if config.tiles_per_program is not None:
        return config.tiles_per_program
    chunks = max(1, config.programs_per_sm * sm_count(device, CPU_SMS) // heads)
    per_program = cdiv(cdiv(tokens, config.block_t), chunks)
    return min(per_program, config.max_tiles or per_program)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_mean: torch.Tensor | None,
    balance: torch.Tensor | None,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    config: StoreConfig | None = None,
    rotation: HadamardKernel = HadamardKernel.OFF,
) -> None:
    """Write T new tokens of one layer into the 8-bit cache.

    k, v: [T, Hkv, D] (any float dtype, last dim contiguous); k_mean, balance: [Hkv, D]
    fp32 or None; pages, offsets: [T] int32/int64, where each token goes (tokens sharing a
    slot, such as a CUDA-graph batch's padding rows in the scratch page, leave it undefined).
    k_cache: [P, Hkv, page, D] int8; v_cache: [P, Hkv, D, page] int8 or float8_e4m3fn;
    k_scale, v_scale: [P, Hkv, page] fp16. All contiguous, on one device.
    config: launch knobs, default `default_config` for this page size and launch size.
    rotation: unless OFF, k is given unrotated and the kernel applies the Hadamard rotation
    first, this way (`kernels/rotate.py`; k_mean and balance are then of the rotated basis).
    One launch, no host sync, no allocation: safe to capture in a CUDA graph.
    """
    tokens, heads, dim = k.shape
    min_block_t = 16 if rotation == HadamardKernel.TENSOR_CORE else 1
    config = config or default_config(
        k_cache.shape[2], tokens * heads, sm_count(k.device, CPU_SMS), min_block_t
    )
    _check_store_args(k, v, k_cache, v_cache, k_scale, v_scale, k_mean, balance, pages, offsets)
    _check_config(config)
    check_rotation(rotation, k.dtype, dim)
    if tokens == 0:
        return
    block_t, page_size = config.block_t, k_cache.shape[2]
    per_program = tiles_per_program(tokens, heads, k.device, config)
    programs = cdiv(cdiv(tokens, block_t), per_program) * heads
    fast_div = not interpreting() if config.fast_div is None else config.fast_div
    dummy = k_scale  # never read when the matching flag is off
    launch(_store_kv_kernel, (programs,),
        k, v,
        k_mean if k_mean is not None else dummy,
        balance if balance is not None else dummy,
        pages, offsets, k_cache, k_scale, v_cache, v_scale, tokens, per_program,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads=heads, page_size=page_size, head_dim=dim, BLOCK_T=block_t,
        HAS_MEAN=k_mean is not None, HAS_BALANCE=balance is not None,
        V_FP8=v_cache.dtype == torch.float8_e4m3fn, RUNS=page_size % block_t == 0,
        FAST_DIV=fast_div, ROTATE=int(rotation), STAGES=dim.bit_length() - 1,
        num_warps=config.num_warps, maxnreg=config.maxnreg,
        enable_fp_fusion=False,  # no contraction of x·r into a later add: keep IEEE steps
    )  # fmt: skip


def _check_config(config: StoreConfig) -> None:
    if config.block_t < 1 or config.block_t & (config.block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {config.block_t}")
    counts = (config.max_tiles or 1, config.tiles_per_program or 1, config.programs_per_sm)
    if min(counts) < 1:
        raise ValueError("max_tiles, tiles_per_program and programs_per_sm must be at least 1")


def _check_store_args(
    k, v, k_cache, v_cache, k_scale, v_scale, k_mean, balance, pages, offsets
) -> None:
    tokens, heads, dim = k.shape
    if v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(
            f"k and v must share a shape with contiguous rows, got {k.shape}, {v.shape}"
        )
    if k_cache.dtype != torch.int8 or v_cache.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(
            f"cache dtypes must be int8 / int8|fp8, got {k_cache.dtype}, {v_cache.dtype}"
        )
    num_pages, _, page_size, _ = k_cache.shape
    if k_cache.shape != (num_pages, heads, page_size, dim) or v_cache.shape != (
        num_pages,
        heads,
        dim,
        page_size,
    ):
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit {k.shape}"
        )
    for s in (k_scale, v_scale):
        if s.shape != (num_pages, heads, page_size) or s.dtype != torch.float16:
            raise ValueError(f"scales must be fp16 [{num_pages}, {heads}, {page_size}]")
    for t in (k_cache, v_cache, k_scale, v_scale):
        if not t.is_contiguous():
            raise ValueError("the cache tensors must be contiguous")
    for t in (k_mean, balance):
        if t is not None and (t.shape != (heads, dim) or t.dtype != torch.float32):
            raise ValueError(f"mean and balance must be fp32 [{heads}, {dim}]")
    for t in (pages, offsets):
        if t.shape != (tokens,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"pages and offsets must be int32/int64 [{tokens}]")
    if dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two for the kernels, got {dim}")
