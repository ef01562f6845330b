"""The split-KV 8-bit decode kernel against `sage_reference` on the same 8-bit cache."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sageserve.attention.kernels.sage_attention import padded_page_table
from sageserve.attention.kernels.sage_decode import (
    MAX_SPLITS,
    DecodeWorkspace,
    plan_splits,
    sage_decode_paged,
)
from sageserve.attention.sage_reference import (
    FP8_DTYPE,
    dequantize,
    quantize_kv,
    quantized_scores,
    sage_attention,
)


@dataclass
class Case:
    """A filled 8-bit cache, the decode queries and what the reference says about them."""

    q: torch.Tensor  # [T, Hq, D], decode rows at q_rows, the other rows unused
    balance: torch.Tensor
    cache: dict[str, torch.Tensor]
    table: torch.Tensor
    q_rows: torch.Tensor
    kv_len: torch.Tensor
    expected: list[torch.Tensor]  # [1, Hq, D] per sequence: sage_reference
    exact: list[torch.Tensor]  # [1, Hq, D]: the same scores, P·V unrounded (fp64)
    pv: str


def _poisoned_cache(pages: int, kv_heads: int, page: int, dim: int, pv: str, gen):
    """Finite garbage codes (the store never writes a non-finite one) and NaN scales."""
    k = torch.randint(-127, 128, (pages, kv_heads, page, dim), dtype=torch.int8, generator=gen)
    v = torch.randint(-127, 128, (pages, kv_heads, dim, page), dtype=torch.int8, generator=gen)
    if pv == "fp8":
        v = (v.float() * 3.0).to(FP8_DTYPE)
    nan = torch.full((pages, kv_heads, page), float("nan"), dtype=torch.float16)
    return {"k": k, "k_scale": nan, "v": v, "v_scale": nan.clone()}


def make_case(heads, kv_heads, dim, page, pv, contexts, seed=0, device="cpu") -> Case:
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // page) for n in contexts]
    num_pages = sum(counts) + 3  # + the null page and two never used
    cache = _poisoned_cache(num_pages, kv_heads, page, dim, pv, gen)
    cache["k"][0], cache["k_scale"][0], cache["v_scale"][0] = 0, 0, 0  # the null page
    cache["v"][0] = torch.zeros_like(cache["v"][0])
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    k_mean = torch.randn(kv_heads, dim, generator=gen)
    balance = torch.rand(kv_heads, dim, generator=gen) + 0.5
    bias = 3 * torch.randn(1, kv_heads, dim, generator=gen)  # real keys have a channel bias
    tables, stored = [], []
    for n, count in zip(contexts, counts, strict=True):
        table, order = order[:count], order[count:]
        k = torch.randn(n, kv_heads, dim, generator=gen) + bias
        v = torch.randn(n, kv_heads, dim, generator=gen)
        codes = quantize_kv(k, v, k_mean, pv, balance)
        pos = torch.arange(n)
        pages, offsets = torch.tensor(table)[pos // page], pos % page
        cache["k"][pages, :, offsets] = codes[0]
        cache["k_scale"][pages, :, offsets] = codes[1].half()
        cache["v"][pages, :, :, offsets] = codes[2]
        cache["v_scale"][pages, :, offsets] = codes[3].half()
        tables.append(tuple(table))
        stored.append(codes)
    # Decode rows sit among other rows of the step (a mixed batch): every other row.
    rows = torch.arange(len(contexts)) * 2 + 1
    q = torch.randn(2 * len(contexts) + 1, heads, dim, generator=gen) * 2
    expected = [
        sage_attention(q[r : r + 1], kc, ks, vc, vs, pv, channel_scale=balance)
        for r, (kc, ks, vc, vs) in zip(rows.tolist(), stored, strict=True)
    ]
    exact = [
        _unrounded_pv(q[r : r + 1], kc, ks, vc, vs, balance)
        for r, (kc, ks, vc, vs) in zip(rows.tolist(), stored, strict=True)
    ]
    dev = torch.device(device)
    return Case(
        q=q.to(dev),
        balance=balance.to(dev),
        cache={name: t.to(dev) for name, t in cache.items()},
        table=padded_page_table(tables, list(contexts), page, dev),
        q_rows=rows.int().to(dev),
        kv_len=torch.tensor(contexts, dtype=torch.int32, device=dev),
        expected=expected,
        exact=exact,
        pv=pv,
    )


def _unrounded_pv(q, k_codes, k_scale, v_codes, v_scale, balance) -> torch.Tensor:
    """sage_reference's scores (quantized Q and K), softmax and P·V in fp64 over the
    dequantized V: what the FP16 / FP8 rounding of P is an approximation of."""
    group = q.shape[1] // k_codes.shape[1]
    scores = quantized_scores(q, k_codes, k_scale, q.shape[-1] ** -0.5, balance).double()
    v = dequantize(v_codes, v_scale).double().repeat_interleave(group, dim=1)
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def run_decode(case: Case, num_splits: int | None = None) -> torch.Tensor:
    """Returns the whole output, NaN where the kernel did not write."""
    q, c = case.q, case.cache
    out = torch.full_like(q, float("nan"))
    ws = DecodeWorkspace.allocate(
        case.table.shape[0], q.shape[1], c["k"].shape[1], q.shape[2],
        case.table.shape[1] * c["k"].shape[2], q.device, num_splits,
    )  # fmt: skip
    ws.acc.fill_(float("nan"))  # every partial the combine reads must have been written
    ws.ml.fill_(float("nan"))
    sage_decode_paged(q, case.balance, c["k"], c["k_scale"], c["v"], c["v_scale"], case.table,
                      case.q_rows, case.kv_len, out, ws)  # fmt: skip
    return out


def check(case: Case, out: torch.Tensor) -> None:
    out = out.double().cpu()
    rows = case.q_rows.long().cpu()
    untouched = torch.ones(out.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert out[untouched].isnan().all(), "wrote rows that are not decode rows"
    got = out[rows]
    ref = torch.cat(case.expected).double()
    assert torch.isfinite(got).all()
    if case.pv == "fp8":
        # The kernel rounds P to e4m3 against each split's running maximum, the reference
        # against the final one: their roundings differ by up to e4m3's 6%, so compare how
        # far each is from the unrounded product instead. The kernel must be as close.
        exact = torch.cat(case.exact)
        kernel_err, ref_err = _rel_l2(got, exact), _rel_l2(ref, exact)
        assert kernel_err <= 1.25 * ref_err + 1e-3, (kernel_err, ref_err)
        return
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    err = ((got - ref).abs().amax(dim=(1, 2)) / ref.abs().amax(dim=(1, 2))).max().item()
    # Split and online softmax round P to fp16 against partial maxima, the reference
    # against the final one: rounding-level differences only.
    assert cosine >= 0.99999 and err <= 5e-3, (cosine, err)


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


CONTEXTS = (1, 7, 200, 333)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page"),
    [(8, 2, 64, 16), (4, 4, 64, 1), (6, 1, 128, 7), (2, 1, 32, 16)],
)
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_matches_reference(heads, kv_heads, dim, page, num_splits) -> None:
    case = make_case(heads, kv_heads, dim, page, "fp16", CONTEXTS, seed=heads + page)
    check(case, run_decode(case, num_splits))


def test_decode_many_splits_most_empty() -> None:
    # 333 keys in splits of 128: three used, the rest (and all but one for the context-1
    # sequence) empty; NaN-filled partials prove the combine reads only written ones.
    case = make_case(4, 2, 64, 16, "fp16", (1, 333, 7), seed=3)
    width = case.table.shape[1] * 16
    assert plan_splits(3, 2, width, torch.device("cpu"), 3) == (3, 128)
    check(case, run_decode(case, 3))


def test_plan_is_static_and_covers_the_table() -> None:
    cpu = torch.device("cpu")
    for batch, kv_heads, tokens in [(1, 8, 32768), (64, 8, 4096), (3, 2, 384), (1, 1, 128)]:
        splits, span = plan_splits(batch, kv_heads, tokens, cpu)
        assert 1 <= splits <= MAX_SPLITS and span % 128 == 0
        assert splits * span >= tokens > (splits - 1) * span
    assert plan_splits(1, 8, 32768, cpu)[0] >= 16  # one long sequence still fills the card


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_splits"):
        plan_splits(1, 1, 1024, torch.device("cpu"), 0)
    case = make_case(4, 2, 64, 16, "fp16", (5, 9))
    small = DecodeWorkspace.allocate(1, 4, 2, 64, 128, torch.device("cpu"))
    c = case.cache
    with pytest.raises(ValueError, match="workspace"):
        sage_decode_paged(case.q, case.balance, c["k"], c["k_scale"], c["v"], c["v_scale"],
                          case.table, case.q_rows, case.kv_len, torch.empty_like(case.q),
                          small)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page", "contexts"),
    [
        (32, 8, 128, 16, (1, 333, 4097, 32768)),
        (32, 8, 128, 16, (200,) * 7 + (7,)),
        (9, 3, 64, 16, (1, 7, 200, 333, 2050)),
        (8, 2, 128, 1, (1, 7, 200, 333)),
        (6, 1, 128, 7, (1, 7, 200, 1000)),
    ],
)
def test_decode_matches_reference_on_gpu(heads, kv_heads, dim, page, contexts, pv) -> None:
    case = make_case(heads, kv_heads, dim, page, pv, contexts, device="cuda")
    check(case, run_decode(case))
    check(case, run_decode(case, 1))
