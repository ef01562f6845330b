"""The warp-specialized Hopper prefill (`--sage-impl gluon`, `kernels/gluon`).

On CPU: its work plan and each consumer's key blocks against brute force, what it refuses
and with which message, the plan in the step's metadata, and its sm_90 compile (every
served build compiles without spills: ptxas runs without a GPU). On an H100/H200 (`gpu`):
its output against the Triton prefill with the same numerics and against fp64, on
NaN-poisoned outputs; the engine's greedy outputs against the Triton prefill's, over cached
prefixes and chunked prompts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama_config
from triton.experimental.gluon import language as gl

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.kernels.gluon.config import (
    BLOCK_KEYS,
    KEYS,
    ROWS,
    TILE,
    block_keys_refusal,
    default_block_keys,
    v16_slots,
)
from sageserve.attention.sage_attn.kernels.gluon.plan import (
    consumer_blocks,
    last_key,
    tile_work,
    work_plan,
)
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.engine_args import add_engine_args, engine_config_from_args

SPECIAL_Q = [1, 7, 63, 64, 65, 127, 128, 129, 200, 255, 256, 333, 1000]
SPECIAL_PREFIX = [0, 1, 63, 64, 65, 100, 128, 511, 3000]

# ------------------------------------------------------------------ plan and block ranges


def _check_item(q_len: int, prefix: int, first_row: int, causal: bool, block_n: int) -> None:
    """Each consumer's (n, full) against the [rows, keys] visibility matrix, brute force."""
    kv_len = prefix + q_len
    ns = []
    for wg in (0, 1):
        n, full = consumer_blocks(q_len, kv_len, first_row, wg, causal, ROWS, block_n)
        lo = first_row + wg * ROWS
        case = (q_len, prefix, first_row, wg, causal)
        ns.append(n)
        if lo >= q_len:  # no real row: every turn empty
            assert (n, full) == (0, 0), case
            continue
        rows = np.arange(lo, min(lo + ROWS, q_len))[:, None]
        sees = (np.arange(kv_len)[None, :] <= prefix + rows) | (not causal)
        limits = [last_key(r, q_len, kv_len, causal) for r in range(lo, lo + ROWS)]
        assert sees.sum(1).tolist() == [lim + 1 for lim in limits[: len(rows)]], case
        last = int(np.nonzero(sees.any(0))[0].max()) // block_n
        whole = int(np.argmin(np.append(sees.all(0), False))) // block_n
        assert n == max(last + 1, 2) and full == whole, (case, n, full, last, whole)
        assert n - full <= 2, case  # the masked loop runs at most twice
        # Blocks past the last are fully masked for all 64 rows, padding rows included.
        for block in range(last + 1, n):
            assert all(lim < block * block_n for lim in limits), case
    if ns[1]:
        assert 0 <= ns[1] - ns[0] <= 1, (q_len, prefix, first_row, ns)


@pytest.mark.parametrize("block_n", BLOCK_KEYS)
@pytest.mark.parametrize("causal", [True, False])
def test_consumer_blocks_match_brute_force(causal: bool, block_n: int) -> None:
    rng = random.Random(int(causal) + block_n)
    for _ in range(600):
        q_len = rng.choice(SPECIAL_Q) if rng.random() < 0.5 else rng.randint(1, 1200)
        prefix = rng.choice(SPECIAL_PREFIX) if rng.random() < 0.5 else rng.randint(0, 3000)
        for first_row in range(0, q_len, TILE):
            _check_item(q_len, prefix, first_row, causal, block_n)


@pytest.mark.parametrize("causal", [True, False])
def test_work_plan_covers_every_tile_and_head_longest_first(causal: bool) -> None:
    q_lens, kv_lens = [1, 7, 200, 333, 128, 1000], [1, 71, 300, 844, 3128, 1511]
    plan = work_plan(q_lens, kv_lens, 4, causal)
    assert plan.dtype == np.int32 and plan.shape[1] == 3
    items = [tuple(row) for row in plan.tolist()]
    tiles = {(s, r) for s, q in enumerate(q_lens) for r in range(0, q, TILE)}
    assert len(items) == len(set(items)) == 4 * len(tiles)
    assert {(s, r) for s, r, _ in items} == tiles
    work = [tile_work(q_lens[s], kv_lens[s], r, causal) for s, r, _ in items]
    assert work == sorted(work, reverse=True)
    assert [h for _, _, h in items[:8]] == [0, 1, 2, 3] * 2  # a tile's heads side by side
    assert work_plan([], [], 4, causal).shape == (0, 3)


# ------------------------------------------------------------------ refusals and metadata


def _backend(sage: SageOptions, head_dim: int = 64, dtype=torch.bfloat16, device="cpu"):
    shape = tiny_llama_config(4, 2, head_dim).attention_shape()
    return shape, BackendOptions("auto", dtype, torch.device(device), sage)


def test_gluon_is_refused_without_an_sm90_gpu() -> None:
    reasons = SageAttentionBackend.unsupported_reasons(*_backend(SageOptions(impl="gluon")))
    assert len(reasons) == 1
    assert "sm_90" in reasons[0] and "--sage-impl triton" in reasons[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_auto_on_a_cuda_device_without_cuda_is_not_a_crash() -> None:
    """Asking for CUDA where there is none: gluon names the missing device; auto resolves to
    the Triton kernels (the engine then refuses the device itself)."""
    from sageserve.attention.sage_attn.backend import resolve_impl

    shape, cuda = _backend(SageOptions(), device="cuda")
    assert resolve_impl(SageOptions(), shape, cuda).impl == "triton"
    reasons = SageAttentionBackend.unsupported_reasons(*_backend(SageOptions(impl="gluon"),
                                                                 device="cuda"))  # fmt: skip
    assert any("no CUDA device" in r for r in reasons), reasons


def test_gluon_refuses_what_it_does_not_cover() -> None:
    sage = SageOptions(impl="gluon", balance_qk=True)
    text = "; ".join(
        SageAttentionBackend.unsupported_reasons(*_backend(sage, head_dim=32, dtype=torch.float32))
    )
    for expected in ("head_dim (64, 128), not 32", "bf16 or fp16 model", "--sage-qk-balance"):
        assert expected in text, text


@pytest.fixture
def gluon_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a gluon backend be built on the CPU, for its host side (the device check is
    test_gluon_is_refused_without_an_sm90_gpu's)."""
    import sageserve.attention.sage_attn.backend as backend_module

    monkeypatch.setattr(backend_module, "gluon_unsupported_reasons", lambda *_: [])


def test_gluon_needs_pages_of_64_tokens(gluon_on_cpu) -> None:
    backend = SageAttentionBackend(*_backend(SageOptions(impl="gluon")))
    assert backend.preferred_page_size() == KEYS
    with pytest.raises(ValueError, match="--page-size 64"):
        backend.allocate(8, 16)
    backend.allocate(8, KEYS)


def test_auto_picks_gluon_where_it_serves_and_triton_where_not(gluon_on_cpu) -> None:
    """--sage-impl auto on CUDA: gluon where `gluon_unsupported_reasons` has none (patched
    here: the device check is test_gluon_is_refused_without_an_sm90_gpu's), Triton with
    --sage-rotation-kernel prepass or other page sizes (switched at allocate, not refused);
    the reference off CUDA. --sage-impl gluon by name still refuses other page sizes."""
    from sageserve.attention.sage_attn.backend import resolve_impl

    shape, cuda = _backend(SageOptions(), device="cuda")
    assert resolve_impl(SageOptions(), shape, cuda).impl == "gluon"
    prepass = SageOptions(rotation_kernel="prepass")
    assert resolve_impl(prepass, shape, cuda).impl == "triton"
    assert resolve_impl(SageOptions(impl="triton"), shape, cuda).impl == "triton"
    assert resolve_impl(SageOptions(), *_backend(SageOptions())).impl == "reference"
    backend = SageAttentionBackend(*_backend(SageOptions(), head_dim=128, device="cuda"))
    assert backend.gluon_prefill and backend.sage.rotation_kernel == "butterfly"
    backend._check_gluon_pages(KEYS)
    assert backend.gluon_prefill
    assert "Gluon" in backend.kernels() and "butterfly" in backend.kernels()
    backend._check_gluon_pages(16)
    assert not backend.gluon_prefill and backend.use_kernels
    assert (backend.sage.impl, backend.sage.rotation_kernel) == ("triton", "prepass")
    assert "Gluon" not in backend.kernels() and "prepass" in backend.kernels()
    named = SageAttentionBackend(*_backend(SageOptions(impl="gluon"), device="cuda"))
    with pytest.raises(ValueError, match="--page-size 64"):
        named._check_gluon_pages(16)


def test_cache_descriptors_are_built_once_per_cache() -> None:
    """The Gluon prefill's two TMA descriptors come from the cache's memo after the first
    call, and another cache (or no memo) gets its own."""
    from sageserve.attention.sage_attn.kernels.gluon.prefill import cache_descriptors

    def cache():
        k = torch.randint(-127, 128, (3, 2, KEYS, 64), dtype=torch.int8)
        return k, torch.randint(-127, 128, (3, 2, 64, KEYS), dtype=torch.int8)

    memo, first, second = {}, cache(), cache()
    built = cache_descriptors(*first, memo)
    assert cache_descriptors(*first, memo) is built
    assert cache_descriptors(*second, memo) is not built and len(memo) == 2
    assert cache_descriptors(*first, None) is not built
    assert built[0].block_shape == [KEYS, 64] and built[1].block_shape == [64, KEYS]


def test_gluon_metadata_carries_the_work_plan(gluon_on_cpu) -> None:
    """Prefill chunks get the causal plan of their q and kv lengths; decodes none."""
    backend = SageAttentionBackend(*_backend(SageOptions(impl="gluon")))
    step = [(0, 200), (64, 7), (130, 1), (0, 333)]  # (prefix, new tokens)
    slices, page = [], 1
    for prefix, n in step:
        pages = -(-(prefix + n) // KEYS)
        slices.append(SequenceSlice(tuple(range(page, page + pages)), prefix, n))
        page += pages
    batch = build_forward_batch(slices, [[1] * n for _, n in step], [], KEYS, torch.device("cpu"))
    pre = backend.build_metadata(batch).kernel.prefill
    expected = work_plan([200, 7, 333], [200, 71, 333], 4, causal=True)
    assert pre.plan is not None and pre.plan.dtype == torch.int32
    assert np.array_equal(pre.plan.numpy(), expected)
    triton = SageAttentionBackend(*_backend(SageOptions(impl="triton")))
    assert triton.build_metadata(batch).kernel.prefill.plan is None


def test_cli_offers_gluon() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--attention-backend", "sage_attn", "--sage-impl", "gluon"])
    assert engine_config_from_args(args).attention_flags() == SageOptions(impl="gluon")


def test_barrier_protocols_hold_under_random_interleavings() -> None:
    """lab's self-check: the served kernel's barrier protocol (3 and 4 stages, key blocks of
    one page or two, with and without the widener) and the planned two-ring one for fp16 P·V
    at 128 keys, simulated op for op under random interleavings; no deadlock, no stale read.
    A child process from the repository root, where `lab` imports."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "lab/gluon_ws_prefill_probe.py", "--selfcheck"],
                         cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no deadlock, no stale stage" in res.stdout
    assert "with 1 slot it deadlocks, as it must" in res.stdout


# ------------------------------------------------------------------ sm_90 compile (no GPU)

_BUILDS = [
    dict(pv="fp16", head_dim=128, rotate=True, causal=True),  # the served numerics, Llama 8B
    dict(pv="fp16", head_dim=64, rotate=True, causal=True),  # SmolLM2
    dict(pv="fp8", head_dim=128, rotate=False, causal=False),
    dict(pv="fp8", head_dim=128, rotate=True, causal=True, block_keys=128),
    dict(pv="fp16", head_dim=64, rotate=True, causal=True, block_keys=128),
    # Q codes from `quantize_q`: the fp16 P·V build at head_dim 128 then fits 128 keys.
    dict(
        pv="fp16",
        head_dim=128,
        rotate=True,
        causal=True,
        block_keys=128,
        stages=3,
        prequantize=True,
    ),
    dict(pv="fp16", head_dim=128, rotate=True, causal=True, prequantize=True),
]


def test_128_key_blocks_are_refused_where_the_stages_do_not_fit() -> None:
    """fp16 P·V at head_dim 128 takes 128-key blocks only with its widened V in a ring of
    its own and Q quantized beforehand (no room for the in-kernel rotation): refused
    otherwise, naming what runs; every other build takes both sizes with one ring."""
    assert "prequantize" in block_keys_refusal(False, 128, 128, prequantize=False)
    assert block_keys_refusal(False, 128, 128, prequantize=True) is None
    assert v16_slots(False, 128, 128) == 2
    assert "one of (64, 128)" in block_keys_refusal(True, 128, 96, prequantize=True)
    for pv_fp8, dim, keys in [(True, 128, 128), (True, 64, 128), (False, 64, 128),
                              (False, 128, 64)]:  # fmt: skip
        assert block_keys_refusal(pv_fp8, dim, keys, prequantize=False) is None
        assert v16_slots(pv_fp8, dim, keys) == 0
    for pv_fp8, dim in [(True, 64), (False, 64), (True, 128), (False, 128)]:
        assert block_keys_refusal(pv_fp8, dim, default_block_keys(dim), False) is None
    assert (default_block_keys(64), default_block_keys(128)) == (128, 64)


def _build_reports(builds: list[dict]) -> list[dict]:
    """`offline.build_report` of each build. ptxas runs without a GPU; the compile needs the
    package imported outside Triton's interpreter, so it runs in a child process."""
    script = (
        "import json, sys\n"
        "from sageserve.attention.sage_attn.kernels.gluon.offline import Build, build_report\n"
        "print(json.dumps([build_report(Build(**b)) for b in json.loads(sys.argv[1])]))\n"
    )
    env = os.environ | {"TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", script, json.dumps(builds)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_the_register_rotation_frees_the_shared_matrix() -> None:
    """`rotate_in_registers` builds (lab, not served) compile for sm_90 and hold less shared
    memory than the served wgmma rotation (whose ±1 matrix stays allocated), no more than
    the unrotated build. Their ptxas spills (a few dozen per work item, none in the key
    loop at the time of writing) are recorded in lab/KERNEL_NOTES.md, not asserted.

    The served rotation holds the ±1 matrix (D × D bf16) and nothing more: Q is loaded
    straight into the wgmma's A layout, so no layout-conversion scratch (16 KB at D 128,
    what a blocked load converted there had cost) stays allocated beside it."""
    builds = [dict(pv=pv, head_dim=128, rotate=rotate, causal=True, rotate_in_registers=reg)
              for pv in ("fp16", "fp8") for rotate, reg in ((True, False), (True, True),
                                                            (False, False))]  # fmt: skip
    reports = _build_reports(builds)
    for i in (0, 3):  # fp16, fp8: served rotation, register rotation, none
        served, registers, plain = (reports[i + j]["shared"] for j in range(3))
        assert registers < served and registers <= plain, (served, registers, plain)
        assert served - plain <= 128 * 128 * 2, (served, plain)
        assert "bf16.bf16" not in " ".join(reports[i + 1]["wgmma"])  # the rotation left wgmma


def test_every_build_compiles_for_sm90_without_spills() -> None:
    """Every served build, compiled for sm_90 (`_build_reports`): no spills, no ptxas
    warnings, within the shared memory, the wgmma shapes of its P·V."""
    for build, report in zip(_BUILDS, _build_reports(_BUILDS), strict=True):
        assert report["spill_bytes"] == 0 and report["registers"] <= 168, (build, report)
        assert not report["warnings"], (build, report)  # e.g. C7512: wgmma serialized
        assert report["shared"] <= 227 * 1024, (build, report)
        pv = "f16.f16" if build["pv"] == "fp16" else "e4m3.e4m3"
        assert f"m64n{build['head_dim']}k" in " ".join(report["wgmma"]), report
        assert any(kind.endswith(pv) for kind in report["wgmma"]), report


def test_the_lazy_rescale_compiles_behind_a_branch() -> None:
    """`lazy_rescale` (fp16 P·V): the accumulator's rescale sits behind a branch in every
    key loop (the unmasked and the masked one), and the head_dim 128 build keeps the
    registers of the build without it, with no spill. Left to the default (None), the
    served builds have it at head_dim 128 with fp16 P·V only."""
    builds = [dict(pv="fp16", head_dim=128, rotate=True, causal=causal, lazy_rescale=lazy)
              for causal in (True, False) for lazy in (True, False)]  # fmt: skip
    shapes = (("fp16", 128, 64), ("fp8", 128, 64), ("fp16", 64, 128))
    served = [dict(pv=pv, head_dim=dim, rotate=True, causal=True, block_keys=keys)
              for pv, dim, keys in shapes]  # fmt: skip
    reports = _build_reports(builds + served)
    for build, report in zip(served, reports[len(builds) :], strict=True):
        lazy_by_default = build["pv"] == "fp16" and build["head_dim"] == 128
        assert (report["rescale_branches"] >= 2) == lazy_by_default, (build, report)
    for build, report in zip(builds, reports[: len(builds)], strict=True):
        if build["lazy_rescale"]:
            assert report["rescale_branches"] >= 2, (build, report)
            # Each product reads a factor, not the accumulator register it writes.
            assert report["rescale_squares"] == 0, (build, report)
            assert report["spill_bytes"] == 0 and not report["warnings"], (build, report)
            assert report["registers"] <= 168, (build, report)
        else:
            assert report["rescale_branches"] == 0, (build, report)


def _accumulator_register_bases(head_dim: int) -> list[list[int]]:
    """Triton's register order of a consumer's [64, D] wgmma accumulator: the linear
    layout's register bases ([row, column] per bit of a thread's register index)."""
    from triton._C.libtriton import gluon_ir, ir

    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)
    layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                       instr_shape=[16, head_dim, 16])  # fmt: skip
    return builder.to_linear_layout(layout._to_ir(builder), [64, head_dim]).reg_bases


def test_the_rescale_asm_tests_both_rows_of_a_thread() -> None:
    """`_rescale_where_grown`'s PTX branches over a thread's products when the factors of
    the registers it tests are 1. Triton's register order of the consumers' accumulator
    must put those registers on both of the thread's two rows, or a row that grew would go
    unrescaled."""
    from sageserve.attention.sage_attn.kernels.gluon.consumer_steps import _rescale_asm

    for dim in (64, 128):
        bases = _accumulator_register_bases(dim)
        per_thread = 2 ** len(bases)
        assert per_thread == dim // 2, (dim, bases)
        rows = [_register_row(bases, r) for r in range(per_thread)]
        asm = _rescale_asm(per_thread)
        # Operands: outputs, the tied accumulator values, then the factors (from 2n).
        tested = [int(t) - 2 * per_thread
                  for t in re.findall(r"setp\.neu\.f32 \w, \$(\d+)", asm)]  # fmt: skip
        assert all(0 <= r < per_thread for r in tested), (dim, tested)
        assert len(set(rows)) == 2 and {rows[r] for r in tested} == set(rows), (dim, bases)


def _register_row(bases: list[list[int]], reg: int) -> int:
    """The row (within the thread's warp tile) of register `reg` under a linear layout's
    register bases ([row, column] per bit of the register index)."""
    return sum(base[0] for bit, base in enumerate(bases) if reg >> bit & 1)


def test_the_lazy_rescale_is_refused_with_fp8_pv() -> None:
    """FP8 P·V rescales every block by its own unit: `lazy_rescale` names what it needs."""
    from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

    q = torch.randn(64, 4, 128).bfloat16()
    k_cache = torch.zeros(2, 2, KEYS, 128, dtype=torch.int8)
    v_cache = torch.zeros(2, 2, 128, KEYS).to(torch.float8_e4m3fn)
    scales = torch.ones(2, 2, KEYS, dtype=torch.float16)
    ints = torch.zeros(1, dtype=torch.int32)
    plan = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="fp16 P·V"):
        sage_attention_ws(q, k_cache, scales, v_cache, scales, ints[None], ints, ints + 64,
                          ints + 64, plan, torch.empty_like(q), 0.1, lazy_rescale=True)  # fmt: skip


# ------------------------------------------------------------------ on an H100/H200


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="the Gluon prefill runs on sm_90 only")

# (prefix, new tokens): decodes (not in the plan: their rows must stay untouched), chunks of
# odd lengths with and without a cached prefix, a partial last tile, an idle second consumer.
GPU_STEP = [(0, 1), (0, 7), (0, 200), (0, 333), (120, 80), (64, 128), (511, 1000), (3000, 7),
            (332, 1), (100, 65)]  # fmt: skip


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
           causal: bool = True) -> torch.Tensor:  # fmt: skip
    """fp64 attention, bottom-right causal or not. q: [n, Hq, D]; k, v: [kv_len, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    rows = torch.arange(prefix, prefix + q.shape[0], device=q.device)
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= rows[:, None]
    if not causal:
        allowed = torch.ones_like(allowed)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -torch.inf).softmax(-1), v)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0)


def _two_backends(pv: str, head_dim: int, rotate: bool, gen: torch.Generator):
    """The triton and gluon impls with the same numerics (the tensor-core rotation, the
    Gluon kernel's) and calibration; bf16 on the GPU."""
    triton = SageOptions(pv=pv, rotate_qk=rotate, impl="triton",
                         rotation_kernel="tensor_core" if rotate else "butterfly")  # fmt: skip
    shape = tiny_llama_config(8, 2, head_dim, max_position_embeddings=8192).attention_shape()
    k_mean = torch.randn(shape.num_layers, 2, head_dim, generator=gen)
    backends = []
    for sage in (triton, SageOptions(**(vars(triton) | {"impl": "gluon"}))):
        options = BackendOptions("auto", torch.bfloat16, torch.device("cuda"), sage)
        backend = SageAttentionBackend(shape, options)
        backend.set_calibration(k_mean, None)
        backends.append(backend)
    return backends


def _page_tables(spans: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Each sequence's pages, in order after the null page."""
    tables, page = [], 1
    for prefix, n in spans:
        pages = -(-(prefix + n) // KEYS)
        tables.append(tuple(range(page, page + pages)))
        page += pages
    return tables


def _step(backend, cache, seqs: list[int], spans, tables, keys, values, gen):
    """Store keys [prefix, prefix + n) of the sequences `seqs` (span (prefix, n) each) and
    attend with `backend`; returns (q, out, batch)."""
    dev = torch.device("cuda")
    slices = [SequenceSlice(tables[i], p, n) for i, (p, n) in zip(seqs, spans, strict=True)]
    batch = build_forward_batch(slices, [[1] * n for _, n in spans], [], KEYS, dev)
    k = torch.cat([keys[i][p : p + n] for i, (p, n) in zip(seqs, spans, strict=True)]).to(dev)
    v = torch.cat([values[i][p : p + n] for i, (p, n) in zip(seqs, spans, strict=True)]).to(dev)
    q = torch.randn(k.shape[0], 8, k.shape[2], generator=gen).bfloat16().to(dev)
    return q, backend.forward(0, q, k, v, cache, backend.build_metadata(batch)), batch


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("q_path", ["kernel", "prequantize", "registers"])
@pytest.mark.parametrize("block_keys", BLOCK_KEYS)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_gluon_prefill_matches_triton_on_gpu(pv, head_dim, rotate, persistent, block_keys,
                                             q_path) -> None:  # fmt: skip
    """Over one cache: the prefixes stored first, then the mixed step. The Gluon kernel
    writes every prefill row (NaN-poisoned output) and nothing else; it agrees with the
    Triton prefill to cosine 0.9999 (the e4m3 scale of P in diagonal blocks and the order
    of the rotation's fp32 additions differ, lab/KERNEL_NOTES.md "v3, round 3/4"), and with
    fp64 attention within the backend's 8-bit bounds. Key blocks of one page and of two;
    a build whose stages do not fit is refused before launch. Q quantized in the kernel or
    beforehand (`quantize_q`, the same numerics), or rotated in the kernel by mma.sync over
    the ±1 matrix made in registers (`rotate_in_registers`). FP8 P·V over 128-key blocks
    scales P by the largest V scale of 128 keys, the Triton kernel's of 64: other roundings
    of P, ~0.9996 apart, each as far from exact (lab/KERNEL_NOTES.md, "v3, round 5")."""
    from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

    if q_path == "registers" and not rotate:
        pytest.skip("the register operand is a way to rotate: without rotation, 'kernel'")
    prequantize = q_path == "prequantize"
    gen = torch.Generator().manual_seed(head_dim + 2 * rotate + (pv == "fp8"))
    triton, gluon = _two_backends(pv, head_dim, rotate, gen)
    bias = 3 * torch.randn(1, 2, head_dim, generator=gen)
    keys = [(torch.randn(p + n, 2, head_dim, generator=gen) + bias).bfloat16() for p, n in GPU_STEP]
    values = [torch.randn(p + n, 2, head_dim, generator=gen).bfloat16() for p, n in GPU_STEP]
    tables = _page_tables(GPU_STEP)
    cache = triton.allocate(tables[-1][-1] + 1, KEYS)
    cached = [i for i, (prefix, _) in enumerate(GPU_STEP) if prefix]
    spans = [(0, GPU_STEP[i][0]) for i in cached]
    _step(triton, cache, cached, spans, tables, keys, values, gen)
    everyone = list(range(len(GPU_STEP)))
    q, expected, batch = _step(triton, cache, everyone, GPU_STEP, tables, keys, values, gen)
    pre = gluon.build_metadata(batch).kernel.prefill
    out = torch.full_like(q, float("nan"))
    caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])
    launch = functools.partial(
        sage_attention_ws, q, *caches, pre.page_table, pre.q_start, pre.q_len, pre.kv_len,
        pre.plan, out, gluon.layer_constants(0).sm_scale, rotate=rotate, persistent=persistent,
        block_keys=block_keys, prequantize=prequantize,
        rotate_in_registers=q_path == "registers",
    )  # fmt: skip
    if block_keys_refusal(pv == "fp8", head_dim, block_keys, prequantize):
        with pytest.raises(ValueError, match="shared memory"):
            launch()
        assert out.isnan().all()
        return
    launch()
    min_cosine = 0.999 if pv == "fp8" and block_keys == 128 else 0.9999
    start = 0
    for (prefix, n), k, v in zip(GPU_STEP, keys, values, strict=True):
        rows, start = slice(start, start + n), start + n
        if n == 1:
            assert out[rows].isnan().all(), "a decode row was written"
            continue
        assert torch.isfinite(out[rows]).all(), (prefix, n)
        assert _cosine(out[rows], expected[rows]) >= min_cosine, (prefix, n)
        ref = _dense(q[rows].float(), k.cuda(), v.cuda(), prefix)
        rel_l1 = ((out[rows].double() - ref).abs().sum() / ref.abs().sum()).item()
        assert _cosine(out[rows], ref) >= 0.998 and rel_l1 <= 0.05, (prefix, n, rel_l1)


@pytest.mark.gpu
@needs_sm90
def test_engine_with_the_gluon_prefill_follows_triton_on_gpu(smollm2_gguf) -> None:
    """SmolLM2 (head_dim 64) in bf16: greedy outputs with the Gluon prefill against the
    Triton prefill's, for a first prompt, then a prefix-cache hit whose rest is prefilled in
    chunks over the cached prefix, beside a fresh prompt; up to a near-tie (int8_flips.py)."""
    from int8_flips import assert_outputs_match

    from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from sageserve.engine.llm import LLM
    from sageserve.engine.sampling_params import SamplingParams
    from sageserve.models.loader import load_model

    loaded = load_model(str(smollm2_gguf), dtype="bfloat16", device="cuda")
    gen = torch.Generator().manual_seed(5)
    shared, tail_a, tail_b, other = (
        torch.randint(100, 49152, (n,), generator=gen).tolist() for n in (333, 7, 200, 129)
    )
    params = SamplingParams(temperature=0, max_new_tokens=12, logprobs=3, ignore_eos=True)
    outputs = {}
    for impl in ("triton", "gluon"):
        config = EngineConfig(
            dtype="bfloat16", device="cuda", attention_backend="sage_attn",
            attention_options=(SageOptions(impl=impl),),
            cache=CacheConfig(page_size=KEYS, max_total_tokens=8192),
            scheduler=SchedulerConfig(chunked_prefill_size=96),
        )  # fmt: skip
        llm = LLM.from_engine_config(config, loaded)
        first = llm.generate([shared + tail_a], params)
        hit = llm.generate([shared + tail_b, other], params)
        assert hit[0].num_cached_tokens == 320  # the 5 full pages of the shared prompt
        outputs[impl] = first + hit
        llm.engine.close()
    for a, b in zip(outputs["gluon"], outputs["triton"], strict=True):
        assert_outputs_match(a, b, exact=False, top_n=3)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("growth", ["flat", "rising"])
def test_lazy_rescale_matches_the_plain_kernel_on_gpu(growth, head_dim, causal) -> None:
    """`lazy_rescale` against the served build on the same cache (fp16 P·V, rotated): the
    same attention up to P's fp16 rounding against another max (cosine 0.99999), and as
    close to fp64. "rising" keys grow along the sequence, so that rows' maxima keep growing
    past the threshold and the rescale branch is taken as well as skipped."""
    from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

    gen = torch.Generator().manual_seed(head_dim + causal)
    triton, gluon = _two_backends("fp16", head_dim, True, gen)
    spans = [(0, 333), (511, 1000), (3000, 200), (64, 7)]
    ramp = (lambda n: torch.linspace(1.0, 6.0, n)[:, None, None]) if growth == "rising" else (
        lambda n: torch.ones(n, 1, 1))  # fmt: skip
    keys = [(torch.randn(p + n, 2, head_dim, generator=gen) * ramp(p + n)).bfloat16()
            for p, n in spans]  # fmt: skip
    values = [torch.randn(p + n, 2, head_dim, generator=gen).bfloat16() for p, n in spans]
    tables = _page_tables(spans)
    cache = triton.allocate(tables[-1][-1] + 1, KEYS)
    cached = [i for i, (prefix, _) in enumerate(spans) if prefix]
    _step(triton, cache, cached, [(0, spans[i][0]) for i in cached], tables, keys, values, gen)
    q, _, batch = _step(triton, cache, [0, 1, 2, 3], spans, tables, keys, values, gen)
    pre = gluon.build_metadata(batch).kernel.prefill
    plan = torch.from_numpy(work_plan([n for _, n in spans], [p + n for p, n in spans], 8,
                                      causal)).cuda()  # fmt: skip
    caches = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0])
    outs = []
    for lazy in (False, True):
        out = torch.full_like(q, float("nan"))
        sage_attention_ws(q, *caches, pre.page_table, pre.q_start, pre.q_len, pre.kv_len, plan,
                          out, gluon.layer_constants(0).sm_scale, causal=causal, rotate=True,
                          lazy_rescale=lazy)  # fmt: skip
        outs.append(out)
    plain, lazy = outs
    assert torch.isfinite(lazy).all()
    start = 0
    for (prefix, n), k, v in zip(spans, keys, values, strict=True):
        rows, start = slice(start, start + n), start + n
        assert _cosine(lazy[rows], plain[rows]) >= 0.99999, (prefix, n)
        ref = _dense(q[rows].float(), k.cuda(), v.cuda(), prefix, causal)
        err = [((o[rows].double() - ref).abs().sum() / ref.abs().sum()).item() for o in outs]
        assert err[1] <= err[0] * 1.05 + 1e-4, (prefix, n, err)
