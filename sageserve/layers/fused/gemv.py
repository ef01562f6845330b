"""A one-row product y = x Wᵀ (+ b) for batch-1 decode, launched with programmatic dependent
launch where the GPU has it (sm_90+; layers/fused/pdl.py).

At batch 1 a decode step is its weight reads, and cuBLAS's small products read well below
the copy bandwidth: a 12-50 MB read does not reach full speed in 15-50 µs, and it starts
only after the kernel before it has drained. Here every program loads its first weight
tile, then waits for the kernel that writes x, so that ramp overlaps that kernel's tail
(`lab/pdl_gemv_probe.py`, BENCHMARKS.md 2026-12-07). Sums are fp32, in another order than
cuBLAS's: results differ from `F.linear` in the last places.

Grid: one program per BLOCK_N output columns; each walks K in BLOCK_K tiles (`config_for`:
the launch setting a sweep on an H100 chose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sageserve.launch_math import cdiv, next_power_of_2
from sageserve.layers.fused.pdl import pdl_options


@dataclass(frozen=True)
class GemvConfig:
    """Launch settings: output columns per program, K per tile, warps per program."""

    block_n: int
    block_k: int
    num_warps: int

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        """Parse BLOCK_NxBLOCK_KxWARPS, e.g. 8x1024x4 (the lab probe's --configs)."""
        block_n, block_k, num_warps = (int(part) for part in text.split("x"))
        return cls(block_n, block_k, num_warps)

    def label(self) -> str:
        return f"{self.block_n}x{self.block_k}x{self.num_warps}"


# Elements of W a program reads per tile. In the lab probe's sweep (H100, Llama-3.1-8B's
# four decode products, 14 settings; BENCHMARKS.md 2026-12-07) the best setting of every
# product read 8192-element tiles with 4 warps: 4 x 2048 for K = 4096 (qkv, o, gate_up),
# 2 x 4096 for K = 14336 (down).
TILE_ELEMENTS = 8192


def config_for(k: int) -> GemvConfig:
    """The launch setting for a product over K inputs: 8192-element tiles, K-wide tiles of
    4096 from K = 8192 up, 2048 below (or K's next power of two, if smaller; at most 32
    columns a program then)."""
    block_k = min(4096 if k >= 8192 else 2048, next_power_of_2(k))
    return GemvConfig(min(32, TILE_ELEMENTS // block_k), block_k, 4)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    # Weights are constant: the first tile may be read before the wait.
    w = _weight_tile(w_rows, cols < N, 0, K, BLOCK_K)
    if PDL:
        gdc_wait()
    acc = _tile_product(w, x_ptr, 0, K, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _tile_product(_weight_tile(w_rows, cols < N, k0, K, BLOCK_K), x_ptr, k0, K,
                             BLOCK_K)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _weight_tile(w_rows, live, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K]; the K mask only where K is not a multiple of BLOCK_K, so
    that the common case keeps 16-byte loads."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if K % BLOCK_K == 0:
        w = tl.load(w_rows + ks[None, :], mask=live[:, None], other=0.0)
    else:
        w = tl.load(w_rows + ks[None, :], mask=live[:, None] & (ks < K)[None, :], other=0.0)
    return w


@triton.jit
def _tile_product(w, x_ptr, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] fp32 partial sums of w [BLOCK_N, BLOCK_K] times x[k0:k0 + BLOCK_K]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
    return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [1, K] @ weight [N, K]ᵀ (+ bias [N]) -> [1, N] in x's dtype, as `F.linear` gives
    it up to the summation order. `out` ([1, N], contiguous) receives it if given;
    `config` defaults to `config_for(K)`.

    Raises ValueError for more than one row, mismatched dtypes or shapes, or a weight
    whose rows are not contiguous.
    """
    _check(x, weight, bias)
    n, k = weight.shape
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    elif out.shape != (1, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [1, {n}] {x.dtype}, got {tuple(out.shape)}")
    x = x.contiguous()
    config = config or config_for(k)
    _gemv_kernel[(cdiv(n, config.block_n),)](
        x, weight, weight if bias is None else bias, out, n, k, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=min(config.block_k, next_power_of_2(k)),
        num_warps=config.num_warps, **pdl_options(x.device),
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row x [1, K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride() != (x.shape[1], 1):
        raise ValueError(
            f"weight must be contiguous [N, {x.shape[1]}], got {tuple(weight.shape)} "
            f"strides {weight.stride()}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
