"""The split-KV 8-bit decode kernel against `sage_reference` on the same 8-bit cache."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sageserve.attention.page_tables import padded_page_table
from sageserve.attention.sage_attn.kernels import decode as sage_decode
from sageserve.attention.sage_attn.kernels.decode import (
    CPU_SMS,
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    PROGRAMS_PER_SM,
    DecodeConfig,
    DecodeWorkspace,
    plan_splits,
    sage_decode_paged,
)
from sageserve.attention.sage_attn.reference import (
    FP8_DTYPE,
    dequantize,
    quantize_kv,
    quantized_scores,
    sage_attention,
)
from sageserve.attention.triton_common import decode_split_count


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
    q_levels: int = 1  # Q in one INT8 level or two (reference module doc)


def _poisoned_cache(pages: int, kv_heads: int, page: int, dim: int, pv: str, gen):
    """Finite garbage codes (the store never writes a non-finite one) and NaN scales."""
    k = torch.randint(-127, 128, (pages, kv_heads, page, dim), dtype=torch.int8, generator=gen)
    v = torch.randint(-127, 128, (pages, kv_heads, dim, page), dtype=torch.int8, generator=gen)
    if pv == "fp8":
        v = (v.float() * 3.0).to(FP8_DTYPE)
    nan = torch.full((pages, kv_heads, page), float("nan"), dtype=torch.float16)
    return {"k": k, "k_scale": nan, "v": v, "v_scale": nan.clone()}


def make_case(heads, kv_heads, dim, page, pv, contexts, seed=0, device="cpu", q_levels=1) -> Case:
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
        sage_attention(q[r : r + 1], kc, ks, vc, vs, pv, channel_scale=balance, q_levels=q_levels)
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
        q_levels=q_levels,
    )


def _unrounded_pv(q, k_codes, k_scale, v_codes, v_scale, balance) -> torch.Tensor:
    """sage_reference's scores (quantized Q and K), softmax and P·V in fp64 over the
    dequantized V: what the FP16 / FP8 rounding of P is an approximation of."""
    group = q.shape[1] // k_codes.shape[1]
    scores = quantized_scores(q, k_codes, k_scale, q.shape[-1] ** -0.5, balance).double()
    v = dequantize(v_codes, v_scale).double().repeat_interleave(group, dim=1)
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def workspace_for(case: Case, num_splits: int | None = None) -> DecodeWorkspace:
    """A workspace for the case's batch and table, its partials poisoned with NaN (every
    partial the merge reads must have been written by this launch)."""
    q, c = case.q, case.cache
    ws = DecodeWorkspace.allocate(
        case.table.shape[0], q.shape[1], c["k"].shape[1], q.shape[2],
        case.table.shape[1] * c["k"].shape[2], q.device, num_splits,
    )  # fmt: skip
    ws.acc.fill_(float("nan"))
    ws.ml.fill_(float("nan"))
    return ws


def run_decode(
    case: Case,
    num_splits: int | None = None,
    config: DecodeConfig = sage_decode.DEFAULT_CONFIG,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Returns the whole output, NaN where the kernel did not write."""
    q, c = case.q, case.cache
    out = torch.full_like(q, float("nan"))
    ws = workspace if workspace is not None else workspace_for(case, num_splits)
    sage_decode_paged(q, case.balance, c["k"], c["k_scale"], c["v"], c["v_scale"], case.table,
                      case.q_rows, case.kv_len, out, ws, config=config,
                      q_levels=case.q_levels)  # fmt: skip
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


# Mixed lengths in one batch: the edge lengths, and one long enough for several loop
# iterations per split and several splits (with CPU_SMS, 1-2 splits of 1280 keys).
MIXED = (1, 7, 200, 333, 2500)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "page"),
    [
        (8, 2, 128, 1),  # group 4
        (8, 1, 64, 7),  # group 8, a page size that is not a power of two
        (4, 4, 128, 16),  # group 1
        (16, 2, 64, 64),  # group 8, pages longer than a key block
        (8, 2, 64, 16),
    ],
)
def test_decode_shapes_mixed_lengths(heads, kv_heads, dim, page) -> None:
    case = make_case(heads, kv_heads, dim, page, "fp16", MIXED, seed=100 + heads * page + dim)
    check(case, run_decode(case))


CONFIGS = [
    DecodeConfig(),
    DecodeConfig(fused_combine=True),
    DecodeConfig(packed_scales=False),
    DecodeConfig(block_n=128, sub_n=128, num_stages=3),
    DecodeConfig(block_n=128, sub_n=64),
    DecodeConfig(block_n=256, sub_n=64, num_warps=8),  # blocks reach past the table padding
    DecodeConfig(block_n=16, sub_n=16),
    DecodeConfig(maxnreg=80, num_stages=4),  # compiled: registers capped, spills
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_configs_match_reference(config, num_splits) -> None:
    case = make_case(8, 2, 64, 16, "fp16", (333, 1, 7, 1100, 200), seed=7 + config.block_n)
    check(case, run_decode(case, num_splits, config))


@pytest.mark.parametrize("num_splits", [5, 20])  # 20: the merge takes 3 steps of 8 splits
def test_fused_merge_leaves_counters_zero_and_repeats_bitwise(num_splits: int) -> None:
    """CUDA-graph replays reuse one workspace: every launch must leave the arrival counters
    at zero, and the merge (fixed split order) must give the same bits every time."""
    case = make_case(8, 2, 128, 16, "fp16", MIXED, seed=21)
    ws = workspace_for(case, num_splits)
    fused = DecodeConfig(fused_combine=True)
    first = run_decode(case, config=fused, workspace=ws)
    assert torch.equal(ws.counter, torch.zeros_like(ws.counter))
    ws.acc.fill_(float("nan"))
    ws.ml.fill_(float("nan"))
    again = run_decode(case, config=fused, workspace=ws)
    assert torch.equal(again.view(torch.int32), first.view(torch.int32))  # NaN rows too
    assert torch.equal(ws.counter, torch.zeros_like(ws.counter))
    check(case, first)


def test_plan_for_a_longer_static_width_spreads_every_context() -> None:
    """A workspace planned for a static maximum (what CUDA graphs need) far past the step's
    table: each sequence is still cut into all the planned splits of its own length."""
    case = make_case(8, 2, 64, 16, "fp16", MIXED, seed=31)
    q, c = case.q, case.cache
    ws = DecodeWorkspace.allocate(len(MIXED), q.shape[1], c["k"].shape[1], q.shape[2],
                                  131072, q.device, 8)  # fmt: skip
    assert ws.num_splits == 8 and ws.split_tokens == 16384
    ws.acc.fill_(float("nan"))
    ws.ml.fill_(float("nan"))
    check(case, run_decode(case, workspace=ws))
    # 2500 keys in splits of ceil(2500 / 8) rounded up to 128 = 384: 7 used (6 full, 196).
    written = torch.isfinite(ws.ml[MIXED.index(2500), :, :, 0])
    assert written[:, :7].all() and not written[:, 7:].any()


@pytest.mark.parametrize("fused", [True, False])
def test_empty_context_row_is_zero(fused: bool) -> None:
    # A padded CUDA-graph row: kv_len 0 (its table row is the null page).
    case = make_case(8, 2, 64, 16, "fp16", (200, 333), seed=5)
    case.kv_len[0] = 0
    case.table[0] = 0
    out = run_decode(case, 3, DecodeConfig(fused_combine=fused))
    rows = case.q_rows.long()
    assert torch.equal(out[rows[0]], torch.zeros_like(out[rows[0]]))
    torch.testing.assert_close(out[rows[1]].double(), case.expected[1][0].double(),
                               atol=5e-3 * case.expected[1].abs().max().item(), rtol=0)  # fmt: skip


def test_int64_offsets_path(monkeypatch) -> None:
    # Caches of >= 2^31 codes need int64 offsets; too large for a CPU test, so lower the bar.
    monkeypatch.setattr(sage_decode, "WIDE_CODES", 1)
    case = make_case(8, 2, 64, 16, "fp16", CONTEXTS, seed=9)
    check(case, run_decode(case))


def test_split_rule_is_the_shared_one() -> None:
    cpu = torch.device("cpu")
    for batch in (1, 3, 16, 64, 256):
        for tokens in (128, 1024, 8192, 32768):
            splits, span = plan_splits(batch, 8, tokens, cpu)
            wanted = decode_split_count(batch * 8, tokens, CPU_SMS, PROGRAMS_PER_SM,
                                        MIN_SPLIT_TOKENS, MAX_SPLITS)  # fmt: skip
            per_split = -(-tokens // wanted)
            assert span == -(-per_split // 128) * 128
            assert splits == -(-tokens // span) <= wanted
    # 16 x 8k on 132 SMs at 4 programs per SM: 4 splits, one wave of 512 programs (v1: 5).
    assert decode_split_count(16 * 8, 8192, 132, 4, MIN_SPLIT_TOKENS, MAX_SPLITS) == 4


def test_bad_configs_raise() -> None:
    for bad in ({"block_n": 48}, {"block_n": 512}, {"num_warps": 3}, {"num_stages": 0}):
        with pytest.raises(ValueError):
            DecodeConfig(**bad)
    case = make_case(4, 2, 64, 16, "fp8", (5, 9))
    with pytest.raises(ValueError, match="FP8"):
        run_decode(case, config=DecodeConfig(block_n=32, sub_n=32))


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
        (32, 4, 64, 64, (1, 7, 200, 333, 9000)),
    ],
)
def test_decode_matches_reference_on_gpu(heads, kv_heads, dim, page, contexts, pv) -> None:
    case = make_case(heads, kv_heads, dim, page, pv, contexts, device="cuda")
    check(case, run_decode(case))
    check(case, run_decode(case, 1))
    check(case, run_decode(case, 64))


GPU_CONFIGS = [
    *CONFIGS,
    DecodeConfig(fast_v_cvt=False),
    DecodeConfig(block_n=128, sub_n=64, num_stages=5),
    DecodeConfig(block_n=64, num_stages=3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
def test_decode_configs_on_gpu(config: DecodeConfig, pv: str) -> None:
    if pv == "fp8" and config.block_n % 64:
        pytest.skip("FP8 P·V needs key blocks of multiples of 64")
    case = make_case(32, 8, 128, 16, pv, (1, 7, 200, 333, 5000), seed=3, device="cuda")
    check(case, run_decode(case, None, config))
    check(case, run_decode(case, 40, config))


@pytest.mark.gpu
def test_fused_merge_is_deterministic_on_gpu() -> None:
    """Which program of a (sequence, KV head) finishes last varies from launch to launch on a
    GPU; the merge reads the splits in a fixed order, so the bits must not."""
    case = make_case(32, 8, 128, 16, "fp16", (333, 20000, 7, 4097), seed=4, device="cuda")
    ws = workspace_for(case, 64)
    fused = DecodeConfig(fused_combine=True)
    first = run_decode(case, config=fused, workspace=ws)
    for _ in range(20):
        again = run_decode(case, config=fused, workspace=ws)
        assert torch.equal(again.view(torch.int32), first.view(torch.int32))
    assert not ws.counter.any()
    check(case, first)


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph() -> None:
    """Captured once, replayed with other lengths copied into the captured kv_len: the
    replays equal eager launches bitwise (the counters are back at zero after each)."""
    case = make_case(32, 8, 128, 16, "fp16", (300, 5000, 1, 2000), seed=6, device="cuda")
    c, q = case.cache, case.q
    ws = workspace_for(case)
    out = torch.zeros_like(q)
    kv_len = case.kv_len.clone()

    def launch(length: torch.Tensor, dest: torch.Tensor) -> None:
        sage_decode_paged(q, case.balance, c["k"], c["k_scale"], c["v"], c["v_scale"],
                          case.table, case.q_rows, length, dest, ws)  # fmt: skip

    launch(kv_len, out)  # compiled before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(kv_len, out)
    for lengths in ([300, 5000, 1, 2000], [17, 129, 1, 4999], [0, 4000, 1, 1]):
        kv_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        eager = torch.zeros_like(q)
        launch(kv_len.clone(), eager)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert not ws.counter.any()
    torch.cuda.synchronize()
