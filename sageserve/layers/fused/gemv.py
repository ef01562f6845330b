"""A few-row product y = x Wᵀ (+ b) for decode steps of 1 to 4 rows, launched with
programmatic dependent launch where the GPU has it (sm_90+; layers/fused/pdl.py).

At small batches a decode step is its weight reads, and cuBLAS's small products read well
below the copy bandwidth: a 12-50 MB read does not reach full speed in 15-50 µs, and it
starts only after the kernel before it has drained. Here every program loads its first
weight tile, then waits for the kernel that writes x, so that ramp overlaps that kernel's
tail (`lab/pdl_gemv_probe.py`, BENCHMARKS.md 2026-12-07). Each weight tile is read once for
all rows. Sums are fp32, in another order than cuBLAS's: results differ from `F.linear` in
the last places.

Grid: one program per BLOCK_N output columns; each walks K in BLOCK_K tiles (`config_for`:
the launch setting a sweep on an H100 chose). Each thread owns runs of 8 consecutive
inputs of a tile, for every column and row (one 16-byte load per column and run; x's 8
values reused across the columns); it keeps those runs' partial sums across tiles, and
they are reduced across threads once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv, next_power_of_2
from sageserve.layers.fused.pdl import pdl_options

# More rows than this: F.linear's. At 8 rows the GEMV read Llama-3.1-8B's decode weights
# slower than cuBLAS at every setting tried (H100, lab/pdl_gemv_probe.py --rows 2,4,8;
# BENCHMARKS.md 2026-12-07 afternoon): its per-thread sums of 8 rows took 187 registers.
MAX_ROWS = 4


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
# four decode products, 14 settings, one row; BENCHMARKS.md 2026-12-07) the best setting of
# every product read 8192-element tiles with 4 warps: 4 x 2048 for K = 4096 (qkv, o,
# gate_up), 2 x 4096 for K = 14336 (down).
TILE_ELEMENTS = 8192
# Columns per program at 3-4 rows. Every program reads all of x (rows x K) through L2
# besides its share of W, so x's traffic is rows / BLOCK_N of W's.
MULTI_ROW_BLOCK_N = 8


def config_for(k: int, rows: int = 1) -> GemvConfig:
    """The launch setting for a product over K inputs and `rows` rows (1 to MAX_ROWS), as
    the H100 sweeps chose: 8192-element tiles of 4 warps. 1-2 rows: K-wide tiles of 4096
    from K = 8192 up, 2048 below (or K's next power of two, if smaller; at most 32 columns
    a program then). 3-4 rows: 8 columns by 1024 (or K's next power of two, if smaller)."""
    if rows > 2:
        return GemvConfig(MULTI_ROW_BLOCK_N, min(1024, next_power_of_2(k)), 4)
    block_k = min(4096 if k >= 8192 else 2048, next_power_of_2(k))
    return GemvConfig(min(32, TILE_ELEMENTS // block_k), block_k, 4)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[:M] = x[:M] W[cols]ᵀ for this program's BLOCK_N columns; ROWS = M's next power of
    two. Tiles are [ROWS or 1, BLOCK_N, BLOCK_K]: K last, so that a thread's 8 consecutive
    inputs are one load and the rows and columns repeat per thread."""
    if PDL:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    w_rows = w_ptr + cols.to(tl.int64)[None, :, None] * K
    live = (cols < N)[None, :, None]
    # Weights are constant: the first tile may be read before the wait.
    w = _weight_tile(w_rows, live, 0, K, BLOCK_K)
    if PDL:
        gdc_wait()
    acc = _tile_sums(w, x_ptr, rows, M, 0, K, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _weight_tile(w_rows, live, k0, K, BLOCK_K)
        acc += _tile_sums(w, x_ptr, rows, M, k0, K, BLOCK_K)
    y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _weight_tile(w_rows, live, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K] as [1, BLOCK_N, BLOCK_K]; the K mask only where K is not a
    multiple of BLOCK_K, so that the common case keeps 16-byte loads."""
    ks = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
    if K % BLOCK_K == 0:
        w = tl.load(w_rows + ks, mask=live, other=0.0)
    else:
        w = tl.load(w_rows + ks, mask=live & (ks < K), other=0.0)
    return w


@triton.jit
def _tile_sums(w, x_ptr, rows, M, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_N, BLOCK_K // 8] fp32 sums of w [1, BLOCK_N, BLOCK_K] times x[:,
    k0:k0 + BLOCK_K] over each run of 8 inputs: within a thread, no shuffles."""
    ks = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
    r = rows[:, None, None]
    x = tl.load(x_ptr + r * K + ks, mask=(r < M) & (ks < K), other=0.0)
    products = w.to(tl.float32) * x.to(tl.float32)
    runs = tl.reshape(products, [products.shape[0], products.shape[1], BLOCK_K // 8, 8])
    return tl.sum(runs, axis=3)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]ᵀ (+ bias [N]) -> [M, N] in x's dtype for 1 <= M <= MAX_ROWS,
    as `F.linear` gives it up to the summation order. `out` ([M, N], contiguous) receives
    it if given; `config` defaults to `config_for(K, M)`. A row's result depends on M only
    through M's next power of two (the tile's rows), never on the other rows' values.

    Raises ValueError for 0 or more than MAX_ROWS rows, mismatched dtypes or shapes, or a
    weight whose rows are not contiguous.
    """
    _check(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{m}, {n}] {x.dtype}, got {tuple(out.shape)}")
    x = x.contiguous()
    rows = next_power_of_2(m)
    config = config or config_for(k, rows)
    # At least one run of 8 inputs per thread (`_tile_sums`); a shorter K is masked.
    block_k = max(8, min(config.block_k, next_power_of_2(k)))
    launch(_gemv_kernel, (cdiv(n, config.block_n),),
        x, weight, weight if bias is None else bias, out, m, n, k, ROWS=rows,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, **pdl_options(x.device),
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows x [M, K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride() != (x.shape[1], 1):
        raise ValueError(
            f"weight must be contiguous [N, {x.shape[1]}], got {tuple(weight.shape)} "
            f"strides {weight.stride()}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
