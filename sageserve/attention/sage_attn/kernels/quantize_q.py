"""Queries to INT8 codes in one pass before the warp-specialized prefill (`kernels/gluon`).

The Triton prefill quantizes each Q tile it loads. The Gluon prefill can do the same
(its ROTATE path: a ±1 matrix in shared memory and one wgmma per tile), but that matrix and
its layout conversion take 48.6 KB of shared memory, and the tile prologue sits on the
critical path of short chunks. `quantize_q` instead rotates (optionally) and quantizes every
(token, head) row once, in fp32, exactly as the kernels do: per-row scale max|y| / 127
(floored at 2^-24), y / scale rounded half away from zero, clamped to ±127. The returned
scales are multiplied by `scale_factor` (the softmax scale times log2 e, as the kernels
fold them). Reading the bf16 rows and writing the codes costs ~3 bytes per element: ~0.1 ms
for a 16k-token chunk of 32 heads × 128, against ~5 ms of attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.kernels.rotate import (
    BLOCK_ROWS,
    HadamardKernel,
    check_rotation,
    hadamard_tile,
)

MAX_CODE = tl.constexpr(127.0)
MIN_SCALE = tl.constexpr(2.0**-24)


@triton.jit
def _quantize_q_kernel(
    q_ptr, codes_ptr, scales_ptr, num_rows, stride_t, stride_h, scale_factor,
    heads: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < num_rows
    token, head = (rows // heads).to(tl.int64), rows % heads
    d = tl.arange(0, D)[None, :]
    x = tl.load(q_ptr + (token * stride_t + head * stride_h)[:, None] + d,
                mask=live[:, None], other=0.0)  # fmt: skip
    y = hadamard_tile(x, BLOCK, D, STAGES, ROTATE, False)
    scale = tl.maximum(tl.max(tl.abs(y), axis=1) / MAX_CODE, MIN_SCALE)
    y = tl.div_rn(y, tl.zeros_like(y) + scale[:, None])
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    codes = tl.minimum(tl.maximum(y, -MAX_CODE), MAX_CODE).to(tl.int8)
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * D + d, codes, mask=live[:, None])
    tl.store(scales_ptr + rows, scale * scale_factor, mask=live)


def quantize_q(
    q: torch.Tensor,
    scale_factor: float,
    rotation: HadamardKernel = HadamardKernel.OFF,
    codes: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D] bf16/fp16/fp32 (last dim contiguous) -> (codes [T, H, D] int8, scales
    [T, H] fp32): q H (rotation BUTTERFLY or TENSOR_CORE) or q, per (token, head) row
    quantized as the prefill kernels do, scales times scale_factor.

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
    rows = tokens * heads
    if rows:
        _quantize_q_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            q, codes, scales, rows, q.stride(0), q.stride(1), scale_factor,
            heads=heads, D=dim, STAGES=dim.bit_length() - 1, BLOCK=BLOCK_ROWS,
            ROTATE=int(rotation),
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
