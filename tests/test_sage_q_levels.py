"""Q in two INT8 levels (`reference.quantize_q_two_levels`): the codes, the scores, and the
Triton prefill against the reference."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_kernels_sage_attention import CPU_CONFIGS, _close, run_case
from test_kernels_sage_decode import check, make_case, run_decode
from tiny_models import tiny_llama_config

import sageserve.attention.sage_attn.backend as backend_module
from sageserve.attention.base import BackendOptions
from sageserve.attention.sage_attn.backend import (
    SageAttentionBackend,
    resolve_impl,
    resolve_rotation_kernel,
)
from sageserve.attention.sage_attn.kernels.prefill import PrefillConfig, sage_attention_paged
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.reference import (
    quantize_int8,
    quantize_kv,
    quantize_q_two_levels,
    quantized_scores,
    sage_attention,
)


@pytest.mark.parametrize("tokens", [1, 7, 333])
def test_two_levels_reconstruct_within_half_a_fine_step(tokens: int) -> None:
    x = torch.randn(tokens, 3, 64) * torch.rand(tokens, 3, 1) * 10
    first, second, scale = quantize_q_two_levels(x)
    one_level, one_scale = quantize_int8(x)
    assert torch.equal(first, one_level) and torch.equal(scale, one_scale)
    assert second.abs().max() <= 64
    fine_step = scale[..., None] / 128
    rebuilt = scale[..., None] * (first.double() + second.double() / 128)
    # Half a fine step, plus fp32's rounding of x / scale: half an ulp of codes below 128
    # (2^-18 of a code) is 2^-11 of a fine step.
    assert ((rebuilt - x.double()).abs() <= fine_step * (0.5 + 2**-11)).all()


def test_two_level_scores_are_closer_to_exact_than_one_level() -> None:
    q, k = torch.randn(200, 4, 128), torch.randn(333, 2, 128) + 2 * torch.randn(1, 2, 128)
    k_codes, k_scale = quantize_int8(k)
    exact = torch.einsum(
        "qhd,khd->hqk",
        q.double(),
        (k_codes.double() * k_scale.double()[..., None]).repeat_interleave(2, 1),
    )
    exact = exact * 128**-0.5
    errors = [
        (quantized_scores(q, k_codes, k_scale, 128**-0.5, q_levels=n).double() - exact).abs()
        for n in (1, 2)
    ]
    # K's codes are exact here, so the error is Q's alone: 7 more bits shrink it ~128x
    # (123x on one draw of these inputs); 30x leaves room for any draw.
    assert errors[1].mean() < errors[0].mean() / 30, [e.mean().item() for e in errors]


def test_bad_q_levels_name_the_choices() -> None:
    q, k, v = torch.randn(3, 2, 32), torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    with pytest.raises(ValueError, match="choose one of: 1, 2"):
        sage_attention(q, *quantize_kv(k, v, None, "fp16"), q_levels=3)


def _options(sage: SageOptions, device: str = "cpu"):
    shape = tiny_llama_config(4, 2, 128).attention_shape()
    return shape, BackendOptions("auto", torch.bfloat16, torch.device(device), sage)


def test_two_levels_choose_the_triton_prefill_and_the_butterfly(monkeypatch) -> None:
    """auto on CUDA: the Triton kernels, not the Gluon prefill (one level), and the butterfly
    in the kernel, not the query pass (it writes one level); asked for by name, either is
    a start-up error that names what serves two levels."""
    monkeypatch.setattr(backend_module, "gluon_unsupported_reasons", lambda *_: [])
    two = SageOptions(q_levels=2)
    shape, cuda = _options(two, "cuda")
    assert resolve_impl(SageOptions(), shape, cuda).impl == "gluon"  # the default, for contrast
    resolved = resolve_impl(two, shape, cuda)
    assert resolved.impl == "triton"
    assert resolve_rotation_kernel(resolved, cuda.device, 128).rotation_kernel == "butterfly"
    for sage, expected in ((SageOptions(q_levels=2, impl="gluon"), "--sage-impl triton"),
                           (SageOptions(q_levels=2, impl="triton", rotation_kernel="prepass"),
                            "butterfly or tensor_core")):  # fmt: skip
        reasons = SageAttentionBackend.unsupported_reasons(*_options(sage, "cuda"))
        assert any("--sage-q-levels 2" in r and expected in r for r in reasons), reasons
    with pytest.raises(ValueError, match="choose one of: 1, 2"):
        SageOptions(q_levels=0)


def test_q_levels_flag(capsys) -> None:
    parser = argparse.ArgumentParser()
    SageOptions.add_cli_flags(parser.add_argument_group())
    assert SageOptions.from_cli_args(parser.parse_args([])).q_levels == 1
    assert SageOptions.from_cli_args(parser.parse_args(["--sage-q-levels", "2"])).q_levels == 2
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--sage-q-levels", "3"])
    assert exited.value.code == 2 and "choose from 1, 2" in capsys.readouterr().err


def _two_level_case(heads, kv_heads, dim, page_size, pv, device, config):
    """run_case with the backend's reference and the kernel both in two Q levels."""
    return run_case(heads, kv_heads, dim, page_size, pv, device, config, seed=1, q_levels=2)


@pytest.mark.parametrize("config", CPU_CONFIGS[:2], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"),
                         [(4, 2, 64, 16), (2, 1, 128, 7), (2, 1, 32, 32)])  # fmt: skip
def test_two_level_kernel_matches_reference(heads, kv_heads, dim, page_size,
                                            config) -> None:  # fmt: skip
    out, ref = _two_level_case(heads, kv_heads, dim, page_size, "fp16",
                               torch.device("cpu"), config)  # fmt: skip
    _close(out, ref)
    # And not the one-level result: the second level reaches the output.
    one, _ = run_case(heads, kv_heads, dim, page_size, "fp16", torch.device("cpu"), config,
                      seed=1)  # fmt: skip
    assert (one - out).abs().max() > 1e-4 * ref.abs().max()


def test_two_levels_refuse_prepass_codes() -> None:
    q = torch.zeros(1, 1, 32, dtype=torch.int8)
    k = torch.zeros(2, 1, 16, 32, dtype=torch.int8)
    scales = torch.ones(2, 1, 16, dtype=torch.float16)
    v = torch.zeros(2, 1, 32, 16, dtype=torch.int8)
    ones = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_levels=2 needs 16-bit q"):
        sage_attention_paged(q, None, k, scales, v, scales, torch.zeros(1, 2, dtype=torch.int32),
                             ones * 0, ones, ones, 1, out=torch.empty(1, 1, 32),
                             q_scale=torch.ones(1, 1), q_levels=2)  # fmt: skip


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page"), [(8, 2, 64, 16), (6, 1, 128, 7)])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_two_level_decode_matches_reference(heads, kv_heads, dim, page, num_splits) -> None:
    contexts = (1, 7, 200, 333)
    case = make_case(heads, kv_heads, dim, page, "fp16", contexts, seed=5, q_levels=2)
    out = run_decode(case, num_splits)
    check(case, out)
    one = make_case(heads, kv_heads, dim, page, "fp16", contexts, seed=5)
    rows = case.q_rows.long()
    assert (run_decode(one, num_splits)[rows] - out[rows]).abs().max() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_two_level_decode_matches_reference_on_gpu(pv: str) -> None:
    case = make_case(32, 8, 128, 64, pv, (1, 7, 200, 333, 5000), seed=6, device="cuda",
                     q_levels=2)  # fmt: skip
    check(case, run_decode(case))


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"),
                         [(9, 3, 64, 16), (8, 2, 128, 7), (8, 2, 128, 64)])  # fmt: skip
def test_two_level_kernel_matches_reference_on_gpu(heads, kv_heads, dim,
                                                   page_size, pv) -> None:  # fmt: skip
    out, ref = _two_level_case(heads, kv_heads, dim, page_size, pv,
                               torch.device("cuda"), PrefillConfig())  # fmt: skip
    _close(out, ref)
