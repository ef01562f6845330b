"""The error ablation's emulation of Q in two INT8 levels (benchmarks/sage_error_ablation.py),
whose figures BENCHMARKS.md reports: the second level must be INT8 codes on a step of
2^-Q_LEVEL_SHIFT of the first level's scale, and must shrink the error to half that step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sageserve.attention.sage_attn.reference import Q_LEVEL_SHIFT, quantize_int8

_PATH = Path(__file__).parents[1] / "benchmarks" / "sage_error_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("sage_error_ablation", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_two_level_q_is_within_half_a_residual_step(ablation, tokens: int) -> None:
    x = torch.randn(tokens, 3, 64) * torch.rand(tokens, 3, 1) * 4
    x[..., 5] += 6.0  # an outlier channel, so that the first level's scale is coarse
    one = ablation._rotated_int8(x, None, torch.float32, levels=1)
    two = ablation._rotated_int8(x, None, torch.float32, levels=2)
    _, scale = quantize_int8(x)
    step = scale[..., None] * 2.0**-Q_LEVEL_SHIFT
    # The two levels are summed in fp32: a few ulps of |x| on top of half a step.
    rounding = 4 * torch.finfo(torch.float32).eps * x.abs()
    assert ((two - x).abs() <= step / 2 + rounding).all()
    assert ((one - x).abs() > step).any()  # the first level alone is coarser
    codes = (two - one) / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 0.5 * 2.0**Q_LEVEL_SHIFT + 1e-3


def test_two_level_q_keeps_the_rotation_orthonormal(ablation) -> None:
    x = torch.randn(33, 2, 64)
    rotation = ablation._hadamard(64)
    two = ablation._rotated_int8(x, rotation, torch.float32, levels=2)
    one = ablation._rotated_int8(x, rotation, torch.float32, levels=1)
    assert (two - x).norm() < (one - x).norm() / 30
