"""The Hadamard rotation of queries or keys (`rotation.py`) in Triton.

The store, prefill and decode kernels rotate the K and Q tiles they load (`hadamard_tile`,
their ROTATE constexpr), so the rotated rows never pass through memory. Two ways, chosen per
launch (`HadamardKernel`):

- BUTTERFLY, `hadamard_rows`: the fast Walsh-Hadamard transform of a [ROWS, D] fp32 tile,
  the bits of `rotation.hadamard_rotate`. Cheap in arithmetic, but on sm_90 each of its
  log2(D) stages re-lays the tile out through shared memory (BENCHMARKS.md, "The rotation's
  kernel cost").
- TENSOR_CORE: one `tl.dot` of the tile, in its own 16-bit dtype, with the ±1 Sylvester
  matrix, built in registers from the parity of popcount(i & j). Products by ±1 are exact
  and accumulate in fp32, so it differs from the butterfly only in the order of the fp32
  additions (~1e-7 relative): an INT8 code that sits that close to a rounding boundary can
  flip. fp16/bf16 input only (fp32 would go through TF32).

`rotate_rows` runs either alone, one launch over [T, H, D] rows (the tests check the
transform with it). Each of its programs loads BLOCK_ROWS (token, head) rows as a
[BLOCK_ROWS, D] tile in their own dtype, rotates them, and writes fp32 rows. Inputs may be
strided views (q and k straight out of the fused QKV projection); only the last dimension
must be contiguous.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.rotation import check_head_dim
from sageserve.attention.triton_common import interpreting
from sageserve.kernel_launch import launch
from sageserve.launch_math import cdiv

BLOCK_ROWS = 16


class HadamardKernel(IntEnum):
    """How a kernel rotates the Q or K tiles it loads (the value of its ROTATE constexpr)."""

    OFF = 0
    BUTTERFLY = 1
    TENSOR_CORE = 2


def check_rotation(rotation: HadamardKernel, dtype: torch.dtype, dim: int) -> None:
    """ValueError unless a kernel can rotate [.., dim] rows of `dtype` this way."""
    if not isinstance(rotation, HadamardKernel):
        raise TypeError(f"rotation must be a HadamardKernel, got {rotation!r}")
    if rotation == HadamardKernel.OFF:
        return
    check_head_dim(dim)
    if rotation != HadamardKernel.TENSOR_CORE:
        return
    if dtype not in (torch.float16, torch.bfloat16) or dim < 16:
        raise ValueError(
            f"the tensor-core Hadamard rotation needs fp16 or bf16 rows of at least 16 "
            f"values, got {dtype} [{dim}]; use the butterfly"
        )
    if dtype == torch.bfloat16 and interpreting():
        raise ValueError(
            "Triton's interpreter multiplies bf16 tiles wrongly (3.6): the tensor-core "
            "rotation of bf16 runs compiled only; use the butterfly"
        )


@triton.jit
def hadamard_rows(x, ROWS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """x: [ROWS, D] fp32 -> x H in STAGES = log2(D) stages of [even + odd, even - odd]."""
    for _ in tl.static_range(STAGES):
        even, odd = tl.split(tl.reshape(x, [ROWS, D // 2, 2]))
        x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), [ROWS, D])
    return x


@triton.jit
def sylvester_matrix(D: tl.constexpr, dtype: tl.constexpr):
    """[D, D] ±1 Hadamard matrix: H[i, j] = (-1)^popcount(i & j), D <= 2^16."""
    bits = tl.arange(0, D)[:, None] & tl.arange(0, D)[None, :]
    for shift in tl.static_range(4):  # fold 16 bits down to their parity in bit 0
        bits = bits ^ (bits >> (8 >> shift))
    return tl.where((bits & 1) == 0, 1.0, -1.0).to(dtype)


@triton.jit
def hadamard_tile(x, ROWS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
                  ROTATE: tl.constexpr, AS_B: tl.constexpr):  # fmt: skip
    """x: [ROWS, D] as loaded (its own dtype) -> [ROWS, D] fp32: x H by the way ROTATE
    (a `HadamardKernel` value) names, or x itself when it is OFF.

    AS_B: the tensor-core product is taken as (H xᵀ)ᵀ (H symmetric), x its B operand. For
    a result that becomes the A operand of a later product (the prefill's Q codes), the
    compiler then stages it in shared memory once, where x H out of an accumulator is
    converted to the operand layout at every key block; the store and decode compile
    leaner the direct way (lab/rotation_compile_probe.py, BENCHMARKS.md)."""
    if ROTATE == 2 and AS_B:
        y = tl.trans(tl.dot(sylvester_matrix(D, x.dtype), tl.trans(x)))
    elif ROTATE == 2:
        y = tl.dot(x, sylvester_matrix(D, x.dtype))
    elif ROTATE == 1:
        y = hadamard_rows(x.to(tl.float32), ROWS, D, STAGES)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _rotate_kernel(
    x_ptr, out_ptr, num_rows, stride_t, stride_h,
    heads: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = (rows < num_rows)[:, None]
    token, head = (rows // heads).to(tl.int64), rows % heads
    d = tl.arange(0, D)[None, :]
    src = x_ptr + (token * stride_t + head * stride_h)[:, None] + d
    x = tl.load(src, mask=live, other=0.0)
    dst = out_ptr + rows.to(tl.int64)[:, None] * D + d
    tl.store(dst, hadamard_tile(x, BLOCK, D, STAGES, ROTATE, False), mask=live)


def rotate_rows(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    rotation: HadamardKernel = HadamardKernel.BUTTERFLY,
) -> torch.Tensor:
    """x: [T, H, D] (fp32/fp16/bf16, last dim contiguous) -> x H as fp32 [T, H, D].

    out: a contiguous fp32 [T, H, D] to write into; None allocates one (graph-safe: under
    capture the allocation comes from the graph's pool). rotation: BUTTERFLY or TENSOR_CORE
    (fp16/bf16 x). One launch, no host sync.
    """
    tokens, heads, dim = x.shape
    check_head_dim(dim)
    check_rotation(rotation, x.dtype, dim)
    if rotation == HadamardKernel.OFF:
        raise ValueError("rotate_rows needs a rotation: BUTTERFLY or TENSOR_CORE")
    if x.stride(2) != 1:
        raise ValueError("rotate_rows needs rows whose last dimension is contiguous")
    if out is None:
        out = torch.empty(tokens, heads, dim, dtype=torch.float32, device=x.device)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous fp32 {tuple(x.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    rows = tokens * heads
    if rows:
        launch(_rotate_kernel, (cdiv(rows, BLOCK_ROWS),),
            x, out, rows, x.stride(0), x.stride(1),
            heads=heads, D=dim, STAGES=dim.bit_length() - 1, BLOCK=BLOCK_ROWS,
            ROTATE=int(rotation),
        )  # fmt: skip
    return out
