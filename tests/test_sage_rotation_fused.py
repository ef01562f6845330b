"""The Hadamard rotation fused into the 8-bit kernels against rotating first
(`rotation.hadamard_rotate`) and running the kernels on the rotated rows: the butterfly gives
the same bits (the store's codes and scales, the prefill's and the decode's outputs); the
tensor-core product the same up to INT8 code flips (`code_flips.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sageserve.attention.page_tables import padded_page_table
from sageserve.attention.sage_attn.code_flips import codes_within_flips, signed_bits
from sageserve.attention.sage_attn.kernels.decode import DecodeWorkspace, sage_decode_paged
from sageserve.attention.sage_attn.kernels.prefill import PrefillConfig, sage_attention_paged
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel, check_rotation
from sageserve.attention.sage_attn.kernels.store import store_kv
from sageserve.attention.sage_attn.rotation import hadamard_rotate, rotated_sm_scale
from sageserve.attention.triton_common import interpreting

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
Q_HEADS, KV_HEADS, PAGE = 4, 2, 16
LENGTHS = (7, 1, 200)  # none a multiple of the page or of a tile
# Small tiles under the interpreter (CPU); the default launch when compiled.
CPU_PREFILL = PrefillConfig(32, 32, 4, 2)
OFF, BUTTERFLY, TENSOR_CORE = HadamardKernel


@dataclass
class Step:
    """One step of len(LENGTHS) sequences, each all new tokens on shuffled pages."""

    q: torch.Tensor  # [T, Hq, D], unrotated
    k: torch.Tensor  # [T, Hkv, D], unrotated
    v: torch.Tensor
    k_mean: torch.Tensor  # [Hkv, D], of the rotated basis
    pages: torch.Tensor  # [T] where each token is stored
    offsets: torch.Tensor
    table: torch.Tensor  # [B, width] int32
    num_pages: int


def make_step(dim: int, dtype: torch.dtype, device: str, seed: int) -> Step:
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // PAGE) for n in LENGTHS]
    num_pages = sum(counts) + 1
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables, pages, offsets = [], [], []
    for n, count in zip(LENGTHS, counts, strict=True):
        table, order = order[:count], order[count:]
        pos = torch.arange(n)
        pages.append(torch.tensor(table)[pos // PAGE])
        offsets.append(pos % PAGE)
        tables.append(tuple(table))
    tokens = sum(LENGTHS)
    bias = 3 * torch.randn(1, KV_HEADS, dim, generator=gen)  # keys have a channel bias

    def rand(heads: int) -> torch.Tensor:
        return (torch.randn(tokens, heads, dim, generator=gen) * 2).to(dtype).to(device)

    k = (torch.randn(tokens, KV_HEADS, dim, generator=gen) + bias).to(dtype).to(device)
    k_mean = hadamard_rotate(k.float()).mean(dim=0)
    return Step(
        rand(Q_HEADS), k, rand(KV_HEADS), k_mean, torch.cat(pages).to(device),
        torch.cat(offsets).to(device), padded_page_table(tables, list(LENGTHS), PAGE, device),
        num_pages,
    )  # fmt: skip


def stored(step: Step, pv: str, rotation: HadamardKernel) -> tuple[torch.Tensor, ...]:
    """(k codes, k scales, v codes, v scales) after storing the step's keys and values,
    rotated in the kernel (unless OFF) or by torch beforehand; unwritten slots poisoned."""
    dim, device = step.k.shape[-1], step.k.device
    shape = (step.num_pages, KV_HEADS, PAGE)
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.int8
    caches = (
        torch.full((*shape, dim), 77, dtype=torch.int8, device=device),
        torch.full(shape, float("nan"), dtype=torch.float16, device=device),
        torch.full((*shape[:2], dim, PAGE), 77, dtype=torch.int8, device=device).to(v_dtype),
        torch.full(shape, float("nan"), dtype=torch.float16, device=device),
    )
    k = step.k if rotation else hadamard_rotate(step.k)
    store_kv(k, step.v, step.k_mean, None, step.pages, step.offsets, *caches, rotation=rotation)
    return caches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dim", "dtype", "pv"), [(64, torch.bfloat16, "fp16"),
                                                  (128, torch.float32, "fp16"),
                                                  (64, torch.float16, "fp8")])  # fmt: skip
def test_fused_rotation_equals_rotating_first(
    device: str, dim: int, dtype: torch.dtype, pv: str
) -> None:
    if pv == "fp8" and device == "cpu":
        pytest.skip("Triton's interpreter casts to fp8 wrongly: GPU only")
    step = make_step(dim, dtype, device, seed=dim + len(pv))
    fused, first = stored(step, pv, BUTTERFLY), stored(step, pv, OFF)
    for a, b in zip(fused, first, strict=True):
        assert torch.equal(signed_bits(a), signed_bits(b))
    rotated_q = hadamard_rotate(step.q)
    for attend in (prefill, decode):
        assert torch.equal(
            attend(step, fused, step.q, BUTTERFLY), attend(step, fused, rotated_q, OFF)
        )


def _lengths(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """q_start and kv_len, [B] int32."""
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    starts = torch.cumsum(lens, 0) - lens
    return starts.int().to(step.q.device), lens.to(step.q.device)


def prefill(step: Step, caches, q: torch.Tensor, rotation: HadamardKernel) -> torch.Tensor:
    """Every sequence's causal attention over its own keys: [T, Hq, D] in the step's q
    dtype, NaN-poisoned first (every row must be written)."""
    out = torch.full_like(step.q, float("nan"))
    starts, lens = _lengths(step)
    config = CPU_PREFILL if q.device.type == "cpu" else None
    sm_scale = rotated_sm_scale(q.shape[-1] ** -0.5, q.shape[-1])
    sage_attention_paged(q, None, *caches, step.table, starts, lens, lens, max(LENGTHS),
                         sm_scale=sm_scale, config=config, out=out, rotation=rotation)  # fmt: skip
    assert not out.isnan().any()
    return out


def decode(step: Step, caches, q: torch.Tensor, rotation: HadamardKernel) -> torch.Tensor:
    """Each sequence's last token as a decode over all its keys: [B, Hq, D]."""
    starts, lens = _lengths(step)
    rows = (starts + lens - 1).int()
    out = torch.full_like(step.q, float("nan"))
    dim = q.shape[-1]
    workspace = DecodeWorkspace.allocate(len(LENGTHS), Q_HEADS, KV_HEADS, dim,
                                         step.table.shape[1] * PAGE, q.device)  # fmt: skip
    sage_decode_paged(q, None, *caches, step.table, rows, lens, out, workspace,
                      sm_scale=rotated_sm_scale(dim**-0.5, dim), rotation=rotation)  # fmt: skip
    out = out[rows.long()]
    assert not out.isnan().any()
    return out


# A flipped Q or K code moves its rows' scores by one code step: far below the 8-bit path's
# own error against exact attention (~1e-2 relative L1), far above what a wrong rotation
# leaves (the scores of other keys: ~1 relative L1).
MAX_FLIP_REL_L1 = 5e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dim", "dtype", "pv"), [(64, torch.float16, "fp16"),
                                                  (128, torch.float16, "fp16"),
                                                  (64, torch.bfloat16, "fp16"),
                                                  (128, torch.bfloat16, "fp8")])  # fmt: skip
def test_tensor_core_rotation_equals_rotating_first_up_to_code_flips(
    device: str, dim: int, dtype: torch.dtype, pv: str
) -> None:
    if device == "cpu" and (dtype == torch.bfloat16 or pv == "fp8"):
        pytest.skip("the interpreter's bf16 products and fp8 casts are wrong: GPU only")
    step = make_step(dim, dtype, device, seed=3 * dim + len(pv))
    product, first = stored(step, pv, TENSOR_CORE), stored(step, pv, OFF)
    for a, b in zip(product[:2], first[:2], strict=True):  # K codes and scales
        assert codes_within_flips(signed_bits(a), signed_bits(b))
    for a, b in zip(product[2:], first[2:], strict=True):  # V is never rotated
        assert torch.equal(signed_bits(a), signed_bits(b))
    rotated_q = hadamard_rotate(step.q)
    for attend in (prefill, decode):
        got = attend(step, first, step.q, TENSOR_CORE).float()
        want = attend(step, first, rotated_q, OFF).float()
        assert (got - want).abs().sum() <= MAX_FLIP_REL_L1 * want.abs().sum()


@pytest.mark.parametrize(
    ("dtype", "dim", "match"),
    [(torch.float32, 64, "fp16 or bf16"), (torch.float16, 8, "at least 16"),
     (torch.bfloat16, 64, "interpreter")],
)  # fmt: skip
def test_tensor_core_rotation_refuses_what_it_cannot_multiply(
    dtype: torch.dtype, dim: int, match: str
) -> None:
    if match == "interpreter" and not interpreting():
        pytest.skip("compiled kernels multiply bf16 tiles rightly")
    with pytest.raises(ValueError, match=match):
        check_rotation(TENSOR_CORE, dtype, dim)
    with pytest.raises(TypeError, match="HadamardKernel"):
        check_rotation(True, torch.float16, 64)
    check_rotation(BUTTERFLY, dtype, dim)  # the butterfly rotates any float rows
