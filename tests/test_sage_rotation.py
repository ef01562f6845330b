"""The Hadamard rotation of Q and K (`rotation.py`, `kernels/rotate.py`), on CPU."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from sageserve.attention.base import AttentionShape, BackendOptions
from sageserve.attention.sage_attn.backend import SageAttentionBackend, resolve_rotation_kernel
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel, rotate_rows
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.reference import quantize_kv, sage_attention
from sageserve.attention.sage_attn.rotation import (
    hadamard_matrix,
    hadamard_rotate,
    rotated_sm_scale,
)


@pytest.mark.parametrize("dim", [2, 16, 64, 128])
def test_hadamard_matrix_is_orthogonal_up_to_dim(dim: int) -> None:
    h = hadamard_matrix(dim)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, dim * torch.eye(dim, dtype=torch.float64))


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_rotation_keeps_every_product_in_fp64(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(7, 3, dim, generator=gen, dtype=torch.float64) * 5
    k = torch.randn(200, 3, dim, generator=gen, dtype=torch.float64) * 5 + 2
    rq, rk = hadamard_rotate(q), hadamard_rotate(k)
    assert rq.dtype == torch.float64
    torch.testing.assert_close(rq, q @ hadamard_matrix(dim), rtol=0, atol=1e-12)
    dots = torch.einsum("qhd,khd->hqk", q, k)
    rotated = torch.einsum("qhd,khd->hqk", rq, rk) / dim
    assert (rotated - dots).abs().max() <= 1e-12 * dots.abs().max()


def test_rotation_spreads_an_outlier_channel() -> None:
    x = torch.randn(333, 2, 64, generator=torch.Generator().manual_seed(1))
    x[..., 5] *= 40  # one spiky channel, as post-rotary keys have
    before = x.abs().amax(-1) / x.abs().mean(-1)
    after = (r := hadamard_rotate(x)).abs().amax(-1) / r.abs().mean(-1)
    assert after.median() < 0.25 * before.median()


def test_rotation_of_rows_does_not_depend_on_the_batch() -> None:
    x = torch.randn(333, 4, 64, generator=torch.Generator().manual_seed(2))
    whole = hadamard_rotate(x)
    assert torch.equal(hadamard_rotate(x[200:207]), whole[200:207])
    assert torch.equal(hadamard_rotate(x[:1]), whole[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "dim"), [(1, 64), (7, 128), (200, 16), (333, 64)])
def test_triton_rotation_equals_the_torch_transform_bitwise(
    tokens: int, dim: int, dtype: torch.dtype
) -> None:
    """Strided views (q and k of one fused QKV row), rows that do not fill the last block."""
    gen = torch.Generator().manual_seed(tokens * dim)
    qkv = (torch.randn(tokens, 10, dim, generator=gen) * 3).to(dtype)
    for view in (qkv[:, :6], qkv[:, 6:8]):
        out = torch.full(view.shape, float("nan"))
        rotate_rows(view, out=out)
        assert torch.equal(out, hadamard_rotate(view))
        assert torch.equal(rotate_rows(view), out)


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize(("tokens", "dim"), [(1, 64), (7, 128), (200, 16), (333, 64)])
def test_tensor_core_rotation_equals_the_exact_product(
    tokens: int, dim: int, dtype: torch.dtype
) -> None:
    """x H by one 16-bit product with the ±1 matrix: exact products summed in fp32, so
    within fp32 rounding of the fp64 product (the butterfly's bits are not promised)."""
    device = "cuda" if dtype == torch.bfloat16 else "cpu"
    gen = torch.Generator().manual_seed(tokens + dim)
    qkv = (torch.randn(tokens, 10, dim, generator=gen) * 3).to(dtype).to(device)
    qkv[:, :, 5] *= 40  # an outlier channel, as post-rotary keys have
    for view in (qkv[:, :6], qkv[:, 6:8]):
        out = torch.full(view.shape, float("nan"), device=device)
        rotate_rows(view, out=out, rotation=HadamardKernel.TENSOR_CORE)
        exact = view.double() @ hadamard_matrix(dim).to(device)
        scale = exact.abs().amax(dim=-1, keepdim=True)
        assert ((out.double() - exact).abs() <= 1e-6 * scale).all()


def test_triton_rotation_rejects_a_bad_output() -> None:
    x = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="fp32"):
        rotate_rows(x, out=torch.empty(3, 2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="power-of-two"):
        rotate_rows(torch.randn(3, 2, 48))
    with pytest.raises(ValueError, match="needs a rotation"):
        rotate_rows(x, rotation=HadamardKernel.OFF)


def test_rotated_attention_matches_unrotated_math() -> None:
    """The reference over rotated q and k (softmax scale / D) is the same attention: closer to
    exact than without rotation on keys with an outlier channel."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(200, 4, 64, generator=gen)
    k = torch.randn(200, 2, 64, generator=gen)
    k[..., 9] = k[..., 9] * 8 + 20  # an outlier channel with a large mean, as real keys have
    v = torch.randn(200, 2, 64, generator=gen)
    exact = _exact(q, k, v)
    plain = sage_attention(q, *quantize_kv(k, v, None, "fp16"))
    rq, rk = hadamard_rotate(q), hadamard_rotate(k)
    scale = rotated_sm_scale(64**-0.5, 64)
    rotated = sage_attention(rq, *quantize_kv(rk, v, None, "fp16"), sm_scale=scale)
    assert _rel_l1(rotated, exact) < 0.02
    assert _rel_l1(rotated, exact) < 0.7 * _rel_l1(plain, exact)


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, -torch.inf).softmax(-1), v)


def _rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().sum() / ref.abs().sum()).item()


def _shape(head_dim: int) -> AttentionShape:
    return AttentionShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=head_dim,
                          vocab_size=64, max_position_embeddings=4096)  # fmt: skip


def test_rotation_needs_a_power_of_two_head_dim() -> None:
    """The reference runs any head_dim, the rotation only powers of two: a start-up error
    that names the flag turning it off."""
    options = BackendOptions("auto", torch.float32, torch.device("cpu"), SageOptions())
    with pytest.raises(ValueError, match="--sage-disable-qk-rotation"):
        SageAttentionBackend(_shape(48), options)
    off = BackendOptions("auto", torch.float32, torch.device("cpu"), SageOptions(rotate_qk=False))
    assert SageAttentionBackend(_shape(48), off).sm_scale == 48**-0.5
    assert SageAttentionBackend(_shape(64), options).sm_scale == 64**-0.5 / 64


def test_rotation_flag() -> None:
    parser = argparse.ArgumentParser()
    SageOptions.add_cli_flags(parser.add_argument_group())
    off = parser.parse_args(["--sage-disable-qk-rotation"])
    assert not SageOptions.from_cli_args(off).rotate_qk
    assert SageOptions.from_cli_args(parser.parse_args([])).rotate_qk


def test_rotation_kernel_flag_and_what_it_needs() -> None:
    """--sage-rotation-kernel picks how the kernels rotate; tensor_core is refused at start-up,
    naming the way out, where it cannot run: the torch reference, the rotation off, fp32."""
    parser = argparse.ArgumentParser()
    SageOptions.add_cli_flags(parser.add_argument_group())
    assert SageOptions.from_cli_args(parser.parse_args([])).rotation_kernel == "auto"
    chosen = parser.parse_args(["--sage-rotation-kernel", "tensor_core"])
    assert SageOptions.from_cli_args(chosen).rotation_kernel == "tensor_core"
    with pytest.raises(SystemExit):
        parser.parse_args(["--sage-rotation-kernel", "fwht"])
    with pytest.raises(ValueError, match="butterfly, tensor_core, prepass"):
        SageOptions(rotation_kernel="fwht")
    cpu = torch.device("cpu")
    refused = [
        (torch.float16, SageOptions(rotation_kernel="tensor_core", impl="reference")),
        (torch.float16, SageOptions(rotation_kernel="tensor_core", impl="triton", rotate_qk=False)),
        (torch.float32, SageOptions(rotation_kernel="tensor_core", impl="triton")),
    ]
    for dtype, sage in refused:
        reasons = SageAttentionBackend.unsupported_reasons(
            _shape(64), BackendOptions("auto", dtype, cpu, sage)
        )
        assert any("--sage-rotation-kernel" in r for r in reasons), (dtype, sage)
    served = BackendOptions("auto", torch.float16, cpu,
                            SageOptions(rotation_kernel="tensor_core", impl="triton"))  # fmt: skip
    assert not SageAttentionBackend.unsupported_reasons(_shape(64), served)
    assert SageAttentionBackend(_shape(64), served).rotation == HadamardKernel.TENSOR_CORE
    off = BackendOptions("auto", torch.float32, cpu, SageOptions(rotate_qk=False))
    assert SageAttentionBackend(_shape(64), off).rotation == HadamardKernel.OFF


def test_prepass_rotation_kernel_and_what_it_needs() -> None:
    """--sage-rotation-kernel prepass: the store and decode rotate by the butterfly, prefill
    queries come rotated from one pass; refused without the Triton kernels, with the
    rotation off, and with the Gluon prefill (which rotates its own tiles)."""
    parser = argparse.ArgumentParser()
    SageOptions.add_cli_flags(parser.add_argument_group())
    chosen = parser.parse_args(["--sage-rotation-kernel", "prepass"])
    assert SageOptions.from_cli_args(chosen).rotation_kernel == "prepass"
    cpu = torch.device("cpu")
    for sage in (SageOptions(rotation_kernel="prepass", impl="reference"),
                 SageOptions(rotation_kernel="prepass", impl="triton", rotate_qk=False),
                 SageOptions(rotation_kernel="prepass", impl="gluon")):  # fmt: skip
        reasons = SageAttentionBackend.unsupported_reasons(
            _shape(64), BackendOptions("auto", torch.bfloat16, cpu, sage)
        )
        assert any("--sage-rotation-kernel prepass" in r for r in reasons), sage
    served = BackendOptions("auto", torch.float32, cpu,
                            SageOptions(rotation_kernel="prepass", impl="triton"))  # fmt: skip
    assert not SageAttentionBackend.unsupported_reasons(_shape(64), served)
    assert SageAttentionBackend(_shape(64), served).rotation == HadamardKernel.BUTTERFLY


def test_auto_rotation_kernel_is_the_pass_for_the_triton_prefill_at_head_dim_128() -> None:
    """--sage-rotation-kernel auto (the default): prepass where the Triton prefill runs at
    head_dim >= 128, the butterfly at head_dim 64, with the Gluon prefill, on the torch
    reference, and with the rotation off (nothing refused); a given choice stays."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cases = [
        (SageOptions(impl="triton"), cpu, 128, "prepass"),
        (SageOptions(), cuda, 256, "prepass"),
        (SageOptions(), cuda, 64, "butterfly"),
        (SageOptions(impl="gluon"), cuda, 128, "butterfly"),
        (SageOptions(), cpu, 128, "butterfly"),  # auto impl on CPU: the torch reference
        (SageOptions(impl="triton", rotate_qk=False), cpu, 128, "butterfly"),
        (SageOptions(impl="triton", rotation_kernel="butterfly"), cpu, 128, "butterfly"),
    ]
    for sage, device, dim, want in cases:
        assert resolve_rotation_kernel(sage, device, dim).rotation_kernel == want, (sage, dim)
    for dim in (64, 128):
        options = BackendOptions("auto", torch.float32, cpu, SageOptions(impl="triton"))
        assert not SageAttentionBackend.unsupported_reasons(_shape(dim), options)
        backend = SageAttentionBackend(_shape(dim), options)
        assert backend.sage.rotation_kernel == ("prepass" if dim == 128 else "butterfly")
        assert backend.rotation == HadamardKernel.BUTTERFLY


_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sageserve.attention.sage_attn.kernels.rotate import _rotate_kernel

# (head_dim, dtype, HadamardKernel): the butterfly in every dtype, the tensor-core product
for dim, dtype, rotate in ((64, "*bf16", 1), (128, "*fp16", 1), (128, "*fp32", 1),
                           (128, "*bf16", 2), (64, "*fp16", 2)):
    signature = {"x_ptr": dtype, "out_ptr": "*fp32", "num_rows": "i32", "stride_t": "i32",
                 "stride_h": "i32", "heads": "constexpr", "D": "constexpr",
                 "STAGES": "constexpr", "BLOCK": "constexpr", "ROTATE": "constexpr"}
    constants = {"heads": 8, "D": dim, "STAGES": dim.bit_length() - 1, "BLOCK": 16,
                 "ROTATE": rotate}
    compiled = triton.compile(ASTSource(_rotate_kernel, signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"], (dim, dtype)
    print("compiled", dim, dtype, rotate)
"""


def test_rotation_kernel_compiles_for_hopper() -> None:
    """The interpreter skips the GPU compiler; this runs it (to sm_90 cubins, no GPU needed;
    in a fresh process, since kernels defined under the interpreter cannot be compiled), so a
    layout the compiler cannot lower fails here rather than on a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("compiled") == 5


@pytest.mark.parametrize("hadamard", [True, False])
def test_calibration_query_maxima_do_not_depend_on_the_offset_chunks(hadamard: bool) -> None:
    """The query maxima over 20 rotary offsets (not a multiple of the chunk), taken chunk
    by chunk to bound memory, equal those over all offsets at once."""
    from sageserve.attention.sage_attn.calibration import (
        QUERY_OFFSET_CHUNK,
        _layer_stats,
        _shifted,
    )

    gen = torch.Generator().manual_seed(20)
    q = torch.randn(33, 2, 3, 64, generator=gen) * 4  # [T, Hkv, group, D]
    k = torch.randn(33, 2, 64, generator=gen) + 1
    angles = torch.rand(20, 32, generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    assert cos.shape[0] % QUERY_OFFSET_CHUNK
    shifted = _shifted(q, cos, sin)
    expected = (hadamard_rotate(shifted) if hadamard else shifted).abs().amax(dim=(0, 1, 3))
    assert torch.equal(_layer_stats(q, k, cos, sin, hadamard)[3], expected)
