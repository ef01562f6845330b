"""silu(gate) * up in one kernel, reading the fused gate_up projection once.

Grid: (token rows, blocks of BLOCK intermediate columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv
from sageserve.layers.fused.pdl import pdl_options

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, stride_in, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    if PDL:  # the next kernel (the small-batch GEMV) may start loading its weights now
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=ok, other=0.0)
    # silu rounded to the model dtype first, as torch's F.silu(gate) stores it.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate then up, rows contiguous) -> silu(gate) * up [T, I], new."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I] with contiguous rows: {gate_up.shape}")
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        grid = (tokens, cdiv(inter, BLOCK))
        launch(_silu_mul_kernel, grid, gate_up, out, inter, gate_up.stride(0), BLOCK=BLOCK,
                               num_warps=4, **pdl_options(gate_up.device))  # fmt: skip
    return out
