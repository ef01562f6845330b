"""`quantize_q`: queries rotated and quantized in one pass, against the same math in torch;
the prefill kernel over its codes against the same kernel quantizing its own tiles.

On CPU through Triton's interpreter (the butterfly rotation or none), on a GPU compiled
(the tensor-core rotation too, which differs from the butterfly only in the order of fp32
additions: a code may flip by one there, `code_flips`).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama_config

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.rotation import hadamard_rotate

LOG2E = 1 / math.log(2)


def _expected(q: torch.Tensor, rotate: bool, sm_scale: float,
              balance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The kernels' per-row quantization in torch: (codes [T, H, D] int8, scales [T, H])."""
    y = hadamard_rotate(q.float()) if rotate else q.float()
    if balance is not None:
        y = y * balance.repeat_interleave(q.shape[1] // balance.shape[0], dim=0)
    scale = (y.abs().amax(-1) / 127.0).clamp_min(2.0**-24)
    z = y / scale[..., None]
    codes = torch.where(z >= 0, z + 0.5, z - 0.5).clamp(-127, 127).to(torch.int8)
    factor = torch.tensor(sm_scale, dtype=torch.float32) * torch.tensor(LOG2E, dtype=torch.float32)
    return codes, scale * factor


def _queries(tokens: int, heads: int, dim: int, dtype: torch.dtype, device: str):
    """Random rows with an outlier channel, as a strided view (q out of a fused QKV)."""
    gen = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = torch.randn(tokens, heads + 4, dim, generator=gen)
    qkv[..., 3] *= 20
    return qkv.to(device=device, dtype=dtype)[:, :heads]


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize(("tokens", "heads", "dim"), [(1, 9, 64), (7, 4, 128), (200, 3, 64),
                                                      (333, 2, 128)])  # fmt: skip
def test_codes_and_scales_match_torch(tokens: int, heads: int, dim: int, rotate: bool,
                                      balanced: bool) -> None:  # fmt: skip
    q = _queries(tokens, heads, dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(dim)
    balance = torch.rand(1, dim, generator=gen) + 0.5 if balanced else None
    codes = torch.full((tokens, heads, dim), 99, dtype=torch.int8)  # poisoned
    scales = torch.full((tokens, heads), float("nan"))
    rotation = HadamardKernel.BUTTERFLY if rotate else HadamardKernel.OFF
    quantize_q(q, 0.125, rotation, balance, codes, scales)
    want_codes, want_scales = _expected(q, rotate, 0.125, balance)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)


def test_bad_outputs_are_refused() -> None:
    q = _queries(5, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="codes must be contiguous int8"):
        quantize_q(q, 1.0, codes=torch.empty(5, 2, 64, dtype=torch.int16))
    with pytest.raises(ValueError, match="scales must be contiguous fp32"):
        quantize_q(q, 1.0, scales=torch.empty(2, 5))
    with pytest.raises(ValueError, match="balance must be"):
        quantize_q(q, 1.0, balance=torch.ones(3, 64))


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


# (prefix, new tokens) of one mixed step: decodes, odd chunks, a chunk over a cached prefix.
STEP = [(0, 1), (0, 7), (0, 200), (120, 80), (332, 1)]


def _backends(balanced: bool, gen: torch.Generator) -> list[SageAttentionBackend]:
    """sage_attn's Triton kernels with --sage-rotation-kernel butterfly and prepass, given
    the same calibration."""
    shape = tiny_llama_config(4, 2, 64, max_position_embeddings=4096).attention_shape()
    k_mean = torch.randn(shape.num_layers, 2, 64, generator=gen)
    balance = torch.rand(shape.num_layers, 2, 64, generator=gen) + 0.5 if balanced else None
    backends = []
    for kind in ("butterfly", "prepass"):
        sage = SageOptions(impl="triton", rotation_kernel=kind, balance_qk=balanced)
        options = BackendOptions("auto", torch.float32, torch.device("cpu"), sage)
        backends.append(SageAttentionBackend(shape, options))
        backends[-1].set_calibration(k_mean, balance)
    return backends


@pytest.mark.parametrize("balanced", [False, True])
def test_prefill_over_prepass_codes_equals_the_butterfly_bitwise(balanced: bool) -> None:
    """The same cache and step through both backends: every row (prefill chunks and decodes)
    bit for bit the same, since the pass computes the butterfly's codes and scales."""
    gen = torch.Generator().manual_seed(3 + balanced)
    backends = _backends(balanced, gen)
    tables, page = [], 1
    for prefix, n in STEP:
        pages = -(-(prefix + n) // 16)
        tables.append(tuple(range(page, page + pages)))
        page += pages
    slices = [SequenceSlice(t, p, n) for t, (p, n) in zip(tables, STEP, strict=True)]
    batch = build_forward_batch(slices, [[1] * n for _, n in STEP], [], 16, torch.device("cpu"))
    tokens = sum(n for _, n in STEP)
    q = torch.randn(tokens, 4, 64, generator=gen)
    k, v = (torch.randn(tokens, 2, 64, generator=gen) for _ in range(2))
    outs = []
    for backend in backends:
        cache = backend.allocate(page, 16)
        outs.append(backend.forward(0, q, k, v, cache, backend.build_metadata(batch)))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_prefill_refuses_codes_without_their_scales_and_vice_versa() -> None:
    """INT8 q needs its row scales, unrotated and unbalanced in the prefill, and an out."""
    from sageserve.attention.page_tables import padded_page_table
    from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged

    caches = (torch.zeros(2, 2, 16, 64, dtype=torch.int8), torch.ones(2, 2, 16),
              torch.zeros(2, 2, 64, 16, dtype=torch.int8), torch.ones(2, 2, 16))  # fmt: skip
    table = padded_page_table([(1,)], [3], 16, torch.device("cpu"))
    lens = [torch.tensor([v], dtype=torch.int32) for v in (0, 3, 3)]
    codes, scales = torch.ones(3, 4, 64, dtype=torch.int8), torch.ones(3, 4)
    out = torch.empty(3, 4, 64)
    cases = [
        (codes, None, {}, "q_scale goes with INT8"),
        (codes.float(), scales, {}, "q_scale goes with INT8"),
        (codes, scales.t(), {}, "q_scale must be fp32"),
        (codes, scales, {"rotation": HadamardKernel.BUTTERFLY}, "rotation OFF"),
        (codes, scales, {"out": None}, "out given"),
    ]
    for q, q_scale, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sage_attention_paged(q, None, *caches, table, *lens, 3, q_scale=q_scale,
                                 **({"out": out} | kwargs))  # fmt: skip
