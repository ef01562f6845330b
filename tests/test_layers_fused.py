"""The fused layer kernels (sageserve/layers/fused) against the torch ops they replace.

On CPU the kernels run in Triton's interpreter, in fp32 and fp16 (the interpreter truncates
fp32 -> bf16 casts instead of rounding them); bf16 runs on a GPU. Each kernel runs before
its reference is computed, so an output it leaves unwritten cannot hold the expected values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sageserve.layers.activation import silu_and_mul
from sageserve.layers.fused.add_rmsnorm import add_rmsnorm
from sageserve.layers.fused.rotary import rotary_qk
from sageserve.layers.fused.silu_mul import silu_mul
from sageserve.layers.rmsnorm import RMSNorm
from sageserve.layers.rotary import RotaryEmbedding, apply_rotary

CPU_DTYPES = (torch.float32, torch.float16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Rows are independent programs (no token blocks); the interpreter takes ~0.1 s per program.
TOKENS = (1, 7, 41)


def dtypes() -> list:
    gpu_bf16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)
    return [*CPU_DTYPES, gpu_bf16]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise |a - b| in units of the last place of a's dtype at b's magnitude."""
    info = torch.finfo(a.dtype)
    _, exponent = torch.frexp(b.float().abs().clamp_min(info.smallest_normal))
    spacing = info.eps * torch.pow(2.0, (exponent - 1).float())
    return (a.float() - b.float()).abs() / spacing


def rows(tokens: int, width: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(tokens, width, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [64, 333, 576])
def test_add_rmsnorm_matches_torch(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE, dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    x, residual = rows(tokens, hidden, dtype, 3.0), rows(tokens, hidden, dtype, 3.0)
    out, total = add_rmsnorm(x, residual, norm.weight, norm.eps)
    ref_out, ref_total = norm(x, residual)
    assert torch.equal(total, ref_total)  # the add rounds exactly as torch's does
    # The fp32 sum of squares is reduced in another order, so a row's scale may move by a
    # few fp32 last places: a 16-bit value by one last place, hence 2 after the weight.
    if dtype == torch.float32:
        assert ulps_apart(out, ref_out).max() <= 8
    else:
        assert ulps_apart(out, ref_out).max() <= 2
        assert (out != ref_out).float().mean() < 0.02


@pytest.mark.parametrize("dtype", dtypes())
def test_add_rmsnorm_without_residual(dtype: torch.dtype) -> None:
    norm = RMSNorm(200, eps=1e-6).to(DEVICE, dtype)
    x = rows(7, 200, dtype, 2.0)
    out, total = add_rmsnorm(x, None, norm.weight, norm.eps)
    assert total is x
    assert ulps_apart(out, norm(x)[0]).max() <= (8 if dtype == torch.float32 else 2)


def test_add_rmsnorm_rejects_mismatched_weight() -> None:
    x = rows(3, 64, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        add_rmsnorm(x, None, torch.ones(32), 1e-5)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", [1, 333, 1536])
def test_silu_mul_matches_torch(dtype: torch.dtype, tokens: int, inter: int) -> None:
    gate_up = rows(tokens, 2 * inter, dtype, 4.0)
    out = silu_mul(gate_up)
    ref = silu_and_mul(gate_up)
    assert out.shape == ref.shape == (tokens, inter)
    # exp(-g) of an fp32 argument errs relatively by about |g| * 2^-24 (~1e-6 at the |g| ~ 20
    # drawn here), in torch and in Triton alike. In 16 bits that is a rare flip of the
    # rounded silu by one place, which moves the product by up to two.
    if dtype == torch.float32:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-30)
    else:
        assert ulps_apart(out, ref).max() <= 2
        assert (out != ref).float().mean() < 0.01


def test_silu_mul_reads_a_strided_view() -> None:
    wide = rows(7, 2 * 333 + 5, torch.float32)
    gate_up = wide[:, : 2 * 333]
    assert not gate_up.is_contiguous()
    assert torch.allclose(silu_mul(gate_up), silu_and_mul(gate_up), rtol=1e-6, atol=1e-6)


def qkv_views(tokens: int, q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    """q [T, Hq, D] and k [T, Hkv, D] as strided views of one fused QKV output."""
    qkv = rows(tokens, (q_heads + 2 * kv_heads) * dim, dtype, 2.0)
    q, k, _ = qkv.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(tokens, q_heads, dim), k.view(tokens, kv_heads, dim)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(9, 3, 64), (4, 1, 128), (2, 2, 32)])
def test_rotary_matches_torch(dtype, tokens: int, q_heads: int, kv_heads: int, dim: int) -> None:
    rope = RotaryEmbedding(dim, 4096, 500000.0, None).to(DEVICE, dtype)
    q, k = qkv_views(tokens, q_heads, kv_heads, dim, dtype)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q_out, k_out = rotary_qk(q, k, positions, rope.cos_sin)
    cos, sin = rope.lookup(positions)
    # Each product and sum is rounded to the dtype as the torch ops round it: bit-exact.
    assert torch.equal(q_out, apply_rotary(q, cos, sin))
    assert torch.equal(k_out, apply_rotary(k, cos, sin))
    assert q_out.is_contiguous() and k_out.is_contiguous()


def test_rotation_objects_agree() -> None:
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    q, k = qkv_views(7, 9, 3, 64, torch.float32)
    positions = torch.randint(0, 512, (7,))
    rope.use_triton = True
    fused = rope.at(positions)(q, k)
    rope.use_triton = False
    plain = rope.at(positions)(q, k)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain, strict=True))
    assert not torch.equal(plain[0], q)  # the rotation did something


def test_rotary_rejects_odd_head_dim() -> None:
    q, k = qkv_views(3, 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        rotary_qk(q, k, torch.zeros(3, dtype=torch.int64), torch.randn(16, 48))


def test_silu_and_mul_reference() -> None:
    gate_up = rows(5, 8, torch.float32)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(silu_and_mul(gate_up), F.silu(gate) * up)
