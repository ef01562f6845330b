"""RMSNorm with the residual add in one kernel: one read of x and residual, one write each
of the sum and the normed output.

One program per token row, the whole hidden row in one block (hidden <= MAX_HIDDEN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sageserve.kernel_launch import launch
from sageserve.launch_math import next_power_of_2
from sageserve.layers.fused.pdl import pdl_options

MAX_HIDDEN = 16384


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, hidden, eps,
    stride_x, stride_r, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # the next kernel (the small-batch GEMV) may start loading its weights now
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=in_row, other=0.0)
        # Rounded to the model dtype, as torch's `x + residual` stores it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * hidden + cols, x, mask=in_row)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual), as `RMSNorm.forward` computes them.

    x, residual: [T, hidden] with contiguous rows, same dtype; weight: [hidden], same dtype.
    Returns two new [T, hidden] tensors; without a residual, x itself is the second.
    """
    _check(x, residual, weight)
    tokens, hidden = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x if residual is None else torch.empty_like(out)
    if tokens == 0:
        return out, total
    block = next_power_of_2(hidden)
    launch(_add_rmsnorm_kernel, (tokens,),
        x, x if residual is None else residual, weight, out, total, hidden, eps,
        x.stride(0), 0 if residual is None else residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
        **pdl_options(x.device),
    )  # fmt: skip
    return out, total


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, hidden] with contiguous rows, got {tuple(x.shape)}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} is above the kernel's {MAX_HIDDEN}")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
    ):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{x.shape[1]}] {x.dtype}, got {tuple(weight.shape)}")
