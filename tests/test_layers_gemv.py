"""The small-batch GEMV (sageserve/layers/fused/gemv.py) against an fp64 product, and
`DecodeLinear`'s choice between it and `F.linear`.

On CPU the kernel runs in Triton's interpreter (fp32, fp16); bf16 and the launch with
programmatic dependent launch run on a GPU, the latter as a chain of PDL kernels inside a
CUDA graph, where a missing wait would read a half-written input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sageserve.layers.activation import silu_and_mul
from sageserve.layers.fused.add_rmsnorm import add_rmsnorm
from sageserve.layers.fused.gemv import MAX_ROWS, GemvConfig, config_for, gemv
from sageserve.layers.fused.silu_mul import silu_mul
from sageserve.layers.linear import DecodeLinear, MergedLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu))


def draw(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_close_to_fp64(y: torch.Tensor, x, weight, bias) -> None:
    """y within the fp32 summation error plus one rounding to y's dtype of the exact
    product: |y - exact| <= 2^-23 * K * sum|w||x| + half a place of y's dtype."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs())
    sum_error = 2.0**-23 * x.shape[1] * magnitude
    rounding = exact.abs() * torch.finfo(y.dtype).eps  # a whole place: generous by 2x
    assert ((y.double() - exact).abs() <= sum_error + rounding).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(7, 64), (200, 576), (333, 1100), (96, 2048), (5, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_an_exact_product(dtype: torch.dtype, n: int, k: int, with_bias: bool,
                                       rows: int):  # fmt: skip
    x, weight = draw(rows, k, dtype=dtype), draw(n, k, dtype=dtype, scale=k**-0.5)
    bias = draw(n, dtype=dtype) if with_bias else None
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv(x, weight, bias, out=out)
    assert y is out and not y.isnan().any()
    assert_close_to_fp64(y, x, weight, bias)


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_each_row_is_its_own_product(rows: int) -> None:
    """Several rows, the tile's padding row masked (3): each row's product as exact as
    one row's, and independent of the other rows' values (a row changed alone changes only
    its own output, bit for bit)."""
    x, weight = draw(rows, 1100, dtype=torch.float32), draw(333, 1100, dtype=torch.float32)
    y = gemv(x, weight)
    assert_close_to_fp64(y, x, weight, None)
    x2 = x.clone()
    x2[0] = draw(1100, dtype=torch.float32)
    y2 = gemv(x2, weight)
    assert torch.equal(y2[1:], y[1:]) and not torch.equal(y2[0], y[0])


def test_a_row_count_and_its_next_power_of_two_give_the_same_bits() -> None:
    """3 rows eagerly and the same 3 in a CUDA graph's bucket of 4 (a padding row of other
    values): the same tile, so the same bits."""
    x, weight = draw(4, 576, dtype=torch.float32), draw(200, 576, dtype=torch.float32)
    assert torch.equal(gemv(x[:3], weight), gemv(x, weight)[:3])


def test_launch_settings_follow_the_sweep() -> None:
    """One row: 8192-element tiles, 4 x 2048 for Llama-3.1-8B's K = 4096, 2 x 4096 for its
    down_proj (K = 14336); smaller K takes its next power of two, at most 32 columns a
    program; so for 2 rows. 3-4 rows: 8 columns by 1024."""
    assert config_for(4096) == GemvConfig(4, 2048, 4)
    assert config_for(14336) == GemvConfig(2, 4096, 4)
    assert config_for(576) == GemvConfig(8, 1024, 4)
    assert config_for(64) == GemvConfig(32, 64, 4)
    assert config_for(4096, rows=2) == GemvConfig(4, 2048, 4)
    assert config_for(4096, rows=4) == config_for(14336, rows=3) == GemvConfig(8, 1024, 4)
    assert config_for(100, rows=4) == GemvConfig(8, 128, 4)
    assert GemvConfig.parse("16x512x8") == GemvConfig(16, 512, 8)


@pytest.mark.parametrize("config", [None, GemvConfig(2, 128, 1), GemvConfig(32, 256, 8),
                                    GemvConfig(4, 8, 2)])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 4])
def test_gemv_is_right_at_other_launch_settings(config, rows: int) -> None:
    """Settings whose tiles cover K unevenly (333 columns, K = 1100)."""
    x, weight = draw(rows, 1100, dtype=torch.float32), draw(333, 1100, dtype=torch.float32)
    assert_close_to_fp64(gemv(x, weight, config=config), x, weight, None)


def test_gemv_rejects_what_it_cannot_compute() -> None:
    x, weight = draw(1, 64, dtype=torch.float32), draw(16, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        gemv(draw(MAX_ROWS + 1, 64, dtype=torch.float32), weight)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        gemv(draw(0, 64, dtype=torch.float32), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(x, draw(64, 16, dtype=torch.float32).t())
    with pytest.raises(ValueError, match="share a dtype"):
        gemv(x.half(), weight)
    with pytest.raises(ValueError, match="bias must be"):
        gemv(x, weight, torch.zeros(15, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, weight, out=torch.empty(1, 15, device=DEVICE))


@pytest.mark.parametrize("layer_class", [DecodeLinear, MergedLinear])
def test_decode_linear_takes_the_gemv_up_to_four_rows(layer_class) -> None:
    """Up to 4 rows: the GEMV's result bit for bit; more rows, or the GEMV off:
    F.linear's."""
    args = (96, [40, 24, 24]) if layer_class is MergedLinear else (96, 88)
    layer = layer_class(*args, bias=True).to(DEVICE).requires_grad_(False)
    one, few, many = (draw(n, 96, dtype=torch.float32) for n in (1, MAX_ROWS, MAX_ROWS + 1))
    assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
    layer.use_gemv = True
    assert torch.equal(layer(one), gemv(one, layer.weight, layer.bias))
    assert torch.equal(layer(few), gemv(few, layer.weight, layer.bias))
    assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_a_pdl_chain_in_a_cuda_graph_matches_eager_torch_on_gpu(rows: int) -> None:
    """norm -> GEMV -> SiLU-mul -> GEMV -> norm, each launched with programmatic dependent
    launch (sm_90+), captured once and replayed on new inputs: every replay must equal the
    same kernels run eagerly one by one (a kernel that read before its wait would see the
    previous replay's or a half-written input)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    hidden, inter, dtype = 4096, 14336, torch.bfloat16
    norm_w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    gate_up_w = draw(2 * inter, hidden, dtype=dtype, scale=hidden**-0.5)
    down_w = draw(hidden, inter, dtype=dtype, scale=inter**-0.5)
    h, residual = draw(rows, hidden, dtype=dtype), draw(rows, hidden, dtype=dtype)

    def chain():
        x, total = add_rmsnorm(h, residual, norm_w, 1e-5)
        y = gemv(silu_mul(gemv(x, gate_up_w)), down_w)
        return (*add_rmsnorm(y, total, norm_w, 1e-5), y)

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(5):
        h.copy_(draw(rows, hidden, dtype=dtype))
        residual.copy_(draw(rows, hidden, dtype=dtype))
        for tensor in captured:
            tensor.fill_(float("nan"))
        graph.replay()
        eager = chain()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, eager, strict=True))
    # And the kernels compute the layer: cuBLAS and torch's SiLU-mul on the last inputs.
    x = add_rmsnorm(h, residual, norm_w, 1e-5)[0]
    reference = F.linear(silu_and_mul(F.linear(x, gate_up_w)), down_w)
    assert (F.cosine_similarity(reference.float(), eager[2].float()) > 0.9999).all()
