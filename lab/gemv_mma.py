"""A tensor-core variant of the small-batch GEMV, for decode batches of 5-16 rows (lab).

The served GEMV (`sageserve/layers/fused/gemv.py`) sums on the CUDA cores and keeps rows x
columns of partial sums per thread; at 8 rows that took 187 registers and lost to cuBLAS
on every Llama-3.1-8B product (H100, BENCHMARKS.md 2026-12-07 afternoon). Here each tile
is one `tl.dot` of x [16, BLOCK_K] (rows past M masked to zero) with the weight tile
transposed, accumulated in fp32 in the MMA layout: a few registers of sums whatever the
rows, both tiles staged through shared memory (cp.async, Triton's pipeliner, `num_stages`)
on their way to the tensor cores. Launched with programmatic dependent launch on sm_90+
like the served GEMV, but waiting at once. `lab/pdl_gemv_probe.py --mma-configs` times it.

    gemv_mma(x [M, K], weight [N, K], config=GemvConfig(16, 256, 4)) -> [M, N], M <= 16
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sageserve.launch_math import cdiv, next_power_of_2
from sageserve.layers.fused.gemv import GemvConfig
from sageserve.layers.fused.pdl import pdl_options

MMA_ROWS = 16  # an MMA tile's rows: x is padded to them


@triton.jit
def _gemv_mma_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Both tiles are loaded inside the loop so that Triton's pipeliner stages them in
    shared memory ahead of the products (num_stages); so no weight load precedes the
    wait: the loop's prologue, after it, issues the first stages' loads."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :],
                    mask=(rows < M)[:, None] & (k0 + ks < K)[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_rows + (k0 + ks)[None, :],
                    mask=(cols < N)[:, None] & (k0 + ks < K)[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    out = y_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def gemv_mma(
    x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, num_stages: int = 3
) -> torch.Tensor:
    """x [M, K] (M <= 16) @ weight [N, K]ᵀ -> [M, N] in x's dtype; fp16/bf16 (fp32 would
    take TF32; Triton 3.6's interpreter multiplies bf16 tiles wrongly, so on CPU only fp16
    is right). config.block_n and block_k: at least 16 (an MMA tile's least width)."""
    (m, k), n = x.shape, weight.shape[0]
    if not 1 <= m <= MMA_ROWS or weight.shape[1] != k or x.dtype != weight.dtype:
        raise ValueError(
            f"gemv_mma takes x [1-16, K] and weight [N, K] of one dtype, got "
            f"{tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}"
        )
    if config.block_n < 16 or config.block_k < 16:
        raise ValueError(f"gemv_mma needs tiles of at least 16 x 16, got {config.label()}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_mma_kernel[(cdiv(n, config.block_n),)](
        x.contiguous(), weight, out, m, n, k, BLOCK_N=config.block_n,
        BLOCK_K=min(config.block_k, max(16, next_power_of_2(k))),
        num_warps=config.num_warps, num_stages=num_stages, **pdl_options(x.device),
    )  # fmt: skip
    return out
