"""The Hadamard rotation of queries or keys (`rotation.py`) in Triton.

`hadamard_rows` is the transform of one [ROWS, D] tile in registers: the store, prefill and
decode kernels apply it to the K and Q tiles they load (`rotate=True`), so the rotated rows
never pass through memory. `rotate_rows` runs it alone, one launch over [T, H, D] rows (the
tests check the transform's bits with it). Each of its programs rotates BLOCK_ROWS (token,
head) rows: it loads them as a [BLOCK_ROWS, D] tile in their own dtype, runs the fast
Walsh-Hadamard transform in registers in fp32, with the stages, pairing and operand order of
`rotation.hadamard_rotate` (so the bits are the same), and writes fp32 rows. Inputs may be
strided views (q and k straight out of the fused QKV projection); only the last dimension
must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageserve.attention.sage_attn.rotation import check_head_dim

BLOCK_ROWS = 16


@triton.jit
def hadamard_rows(x, ROWS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """x: [ROWS, D] fp32 -> x H in STAGES = log2(D) stages of [even + odd, even - odd]."""
    for _ in tl.static_range(STAGES):
        even, odd = tl.split(tl.reshape(x, [ROWS, D // 2, 2]))
        x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), [ROWS, D])
    return x


@triton.jit
def _rotate_kernel(
    x_ptr, out_ptr, num_rows, stride_t, stride_h,
    heads: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = (rows < num_rows)[:, None]
    token, head = (rows // heads).to(tl.int64), rows % heads
    d = tl.arange(0, D)[None, :]
    src = x_ptr + (token * stride_t + head * stride_h)[:, None] + d
    x = tl.load(src, mask=live, other=0.0).to(tl.float32)
    dst = out_ptr + rows.to(tl.int64)[:, None] * D + d
    tl.store(dst, hadamard_rows(x, BLOCK, D, STAGES), mask=live)


def rotate_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H, D] (fp32/fp16/bf16, last dim contiguous) -> x H as fp32 [T, H, D].

    out: a contiguous fp32 [T, H, D] to write into; None allocates one (graph-safe: under
    capture the allocation comes from the graph's pool). One launch, no host sync.
    """
    tokens, heads, dim = x.shape
    check_head_dim(dim)
    if x.stride(2) != 1:
        raise ValueError("rotate_rows needs rows whose last dimension is contiguous")
    if out is None:
        out = torch.empty(tokens, heads, dim, dtype=torch.float32, device=x.device)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous fp32 {tuple(x.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    rows = tokens * heads
    if rows:
        _rotate_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            x, out, rows, x.stride(0), x.stride(1),
            heads=heads, D=dim, STAGES=dim.bit_length() - 1, BLOCK=BLOCK_ROWS,
        )  # fmt: skip
    return out
