"""`quantize_q`: queries rotated and quantized in one pass, against the same math in torch.

On CPU through Triton's interpreter (the butterfly rotation or none), on a GPU compiled
(the tensor-core rotation too, which differs from the butterfly only in the order of fp32
additions: a code may flip by one there, `code_flips`).
"""

from __future__ import annotations

import math

import pytest
import torch

from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.attention.sage_attn.rotation import hadamard_rotate

LOG2E = 1 / math.log(2)


def _expected(q: torch.Tensor, rotate: bool, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-row quantization in torch: (codes [T, H, D] int8, scales [T, H])."""
    y = hadamard_rotate(q.float()) if rotate else q.float()
    scale = (y.abs().amax(-1) / 127.0).clamp_min(2.0**-24)
    z = y / scale[..., None]
    codes = torch.where(z >= 0, z + 0.5, z - 0.5).clamp(-127, 127).to(torch.int8)
    return codes, scale * factor


def _queries(tokens: int, heads: int, dim: int, dtype: torch.dtype, device: str):
    """Random rows with an outlier channel, as a strided view (q out of a fused QKV)."""
    gen = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = torch.randn(tokens, heads + 4, dim, generator=gen)
    qkv[..., 3] *= 20
    return qkv.to(device=device, dtype=dtype)[:, :heads]


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize(("tokens", "heads", "dim"), [(1, 9, 64), (7, 4, 128), (200, 3, 64),
                                                      (333, 2, 128)])  # fmt: skip
def test_codes_and_scales_match_torch(tokens: int, heads: int, dim: int, rotate: bool) -> None:
    q = _queries(tokens, heads, dim, torch.float32, "cpu")
    codes = torch.full((tokens, heads, dim), 99, dtype=torch.int8)  # poisoned
    scales = torch.full((tokens, heads), float("nan"))
    rotation = HadamardKernel.BUTTERFLY if rotate else HadamardKernel.OFF
    quantize_q(q, 0.125 * LOG2E, rotation, codes, scales)
    want_codes, want_scales = _expected(q, rotate, 0.125 * LOG2E)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)


def test_bad_outputs_are_refused() -> None:
    q = _queries(5, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="codes must be contiguous int8"):
        quantize_q(q, 1.0, codes=torch.empty(5, 2, 64, dtype=torch.int16))
    with pytest.raises(ValueError, match="scales must be contiguous fp32"):
        quantize_q(q, 1.0, scales=torch.empty(2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rotation", [HadamardKernel.OFF, HadamardKernel.TENSOR_CORE])
def test_bf16_rows_on_gpu(rotation: HadamardKernel) -> None:
    """Compiled, bf16 rows: codes equal the torch math up to a flip by one on a row that
    sits on a rounding boundary (the tensor-core sum's order), scales within fp32 rounding."""
    q = _queries(333, 32, 128, torch.bfloat16, "cuda")
    codes, scales = quantize_q(q, 0.1, rotation)
    want_codes, want_scales = _expected(q.cpu(), rotation != HadamardKernel.OFF, 0.1)
    diff = (codes.cpu().int() - want_codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3, diff.float().mean()
    torch.testing.assert_close(scales.cpu(), want_scales, rtol=1e-5, atol=0)
