"""Queries to INT8 codes in one pass before the Triton prefill (`--sage-rotation-kernel
prepass`).

The Triton prefill can rotate and quantize each 64-row Q tile it loads; on an H100 the
rotation made that kernel 10-15% slower (BENCHMARKS.md, 2026-12-06). `quantize_q` instead
rotates (optionally), balances (optionally) and quantizes every (token, head) row once, in
fp32, exactly as the kernels do: per-row scale max|y| / 127 (floored at 2^-24), y / scale
rounded half away from zero, clamped to ±127; the scales times the softmax scale and log2 e
in fp32, as the kernels fold them. Reading the 16-bit rows and writing the codes is ~3
bytes per element: ~0.15 ms for 16k tokens of 32 heads × 128 on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.kernels.prefill import LOG2E, _quantize_q
from sageserve.attention.sage_attn.kernels.rotate import (
    BLOCK_ROWS,
    HadamardKernel,
    check_rotation,
    hadamard_tile,
)
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv


@triton.jit
def load_q_rows(q_ptr, num_rows, stride_t, stride_h, heads: tl.constexpr, D: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """This program's BLOCK (token, head) rows of q -> (x [BLOCK, D] in q's dtype, rows
    [BLOCK], live [BLOCK]): rows past num_rows load zeros and are not live."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < num_rows
    token, head = (rows // heads).to(tl.int64), rows % heads
    d = tl.arange(0, D)[None, :]
    x = tl.load(q_ptr + (token * stride_t + head * stride_h)[:, None] + d,
                mask=live[:, None], other=0.0)  # fmt: skip
    return x, rows, live


@triton.jit
def store_q_codes(y, rows, live, balance_ptr, codes_ptr, scales_ptr, sm_scale,
                  heads: tl.constexpr, group: tl.constexpr, D: tl.constexpr,
                  HAS_BALANCE: tl.constexpr):  # fmt: skip
    """Rotated rows y [BLOCK, D] fp32 -> balanced (in the prefill kernel's order: rotate,
    then balance), quantized as the prefill kernel does, codes and folded scales stored."""
    d = tl.arange(0, D)[None, :]
    if HAS_BALANCE:
        y = y * tl.load(balance_ptr + ((rows % heads) // group)[:, None] * D + d)
    codes, scale = _quantize_q(y, 127.0)  # the prefill kernel's own quantization
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * D + d, codes, mask=live[:, None])
    tl.store(scales_ptr + rows, scale * (sm_scale * LOG2E), mask=live)


# The row count changes with every step: specializing on it (== 1, divisible by 16) would
# compile variants while serving.
@triton.jit(do_not_specialize=["num_rows"])
def _quantize_q_kernel(
    q_ptr, balance_ptr, codes_ptr, scales_ptr, num_rows, stride_t, stride_h, sm_scale,
    heads: tl.constexpr, group: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
    BLOCK: tl.constexpr, ROTATE: tl.constexpr, HAS_BALANCE: tl.constexpr,
):  # fmt: skip
    x, rows, live = load_q_rows(q_ptr, num_rows, stride_t, stride_h, heads, D, BLOCK)
    y = hadamard_tile(x, BLOCK, D, STAGES, ROTATE, False)
    store_q_codes(y, rows, live, balance_ptr, codes_ptr, scales_ptr, sm_scale, heads, group,
                  D, HAS_BALANCE)  # fmt: skip


def quantize_q(
    q: torch.Tensor,
    sm_scale: float,
    rotation: HadamardKernel = HadamardKernel.OFF,
    balance: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D] bf16/fp16/fp32 (last dim contiguous) -> (codes [T, H, D] int8, scales
    [T, H] fp32): q H (rotation BUTTERFLY or TENSOR_CORE) or q, times balance[h // (H /
    Hkv)] when given ([Hkv, D] fp32, the Q/K channel balance), per (token, head) row
    quantized as the prefill kernels do, scales times sm_scale · log2 e (in fp32, as the
    prefill kernel folds them).

    codes, scales: contiguous outputs to write into (None allocates them, graph-safe). One
    launch, no host sync.
    """
    tokens, heads, dim = q.shape
    check_rotation(rotation, q.dtype, dim)
    if q.stride(2) != 1:
        raise ValueError("quantize_q needs rows whose last dimension is contiguous")
    if codes is None:
        codes = torch.empty(tokens, heads, dim, dtype=torch.int8, device=q.device)
    if scales is None:
        scales = torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
    _check_outputs(q, codes, scales)
    _check_balance(balance, heads, dim)
    rows = tokens * heads
    if rows:
        group = heads // balance.shape[0] if balance is not None else 1
        launch(_quantize_q_kernel, (cdiv(rows, BLOCK_ROWS),),
            q, balance, codes, scales, rows, q.stride(0), q.stride(1), sm_scale,
            heads=heads, group=group, D=dim, STAGES=dim.bit_length() - 1, BLOCK=BLOCK_ROWS,
            ROTATE=int(rotation), HAS_BALANCE=balance is not None,
        )  # fmt: skip
    return codes, scales


def _check_outputs(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """ValueError unless codes is contiguous int8 shaped like q and scales contiguous fp32
    [T, H]."""
    if codes.shape != q.shape or codes.dtype != torch.int8 or not codes.is_contiguous():
        raise ValueError(f"codes must be contiguous int8 {tuple(q.shape)}, got {codes.dtype} "
                         f"{tuple(codes.shape)}")  # fmt: skip
    if (scales.shape != q.shape[:2] or scales.dtype != torch.float32
            or not scales.is_contiguous()):  # fmt: skip
        raise ValueError(f"scales must be contiguous fp32 {tuple(q.shape[:2])}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")  # fmt: skip


def _check_balance(balance: torch.Tensor | None, heads: int, dim: int) -> None:
    """ValueError unless balance is None or fp32 [Hkv, dim] with Hkv dividing heads."""
    if balance is None:
        return
    if balance.dim() != 2 or heads % balance.shape[0] or balance.shape[1] != dim:
        raise ValueError(f"balance must be [Hkv, {dim}] with Hkv dividing {heads}, got "
                         f"{tuple(balance.shape)}")  # fmt: skip
    if balance.dtype != torch.float32 or not balance.is_contiguous():
        raise ValueError(f"balance must be contiguous fp32, got {balance.dtype}")
