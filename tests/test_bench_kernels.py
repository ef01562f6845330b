"""`sageserve bench kernels` in-process at tiny shapes (CPU: Triton's interpreter; with a
GPU: compiled), its JSON and Markdown, and its refusal of bad flags (exit 2)."""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.bench.kernels import add_kernels_args, config_from_args
from sageserve.bench.kernels_common import reference_attention
from sageserve.bench.kernels_store import (
    StepInputs,
    StoreShape,
    StoreVariant,
    build_variant,
    check_variant,
    make_inputs,
)
from sageserve.bench.kernels_timing import Timed, Timer, balanced_order
from sageserve.cli import main as cli_main

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = ["--seq-lens", "64", "--total-tokens", "128"]
_PREFILL_ONLY = ["--skip-decode", "--skip-store", *TINY]
# Tiny shapes: 2 sequences of 64 tokens, GQA 32/2 heads (the 8-bit store kernel runs one
# interpreted program per token and KV head), 2 decodes over 100 cached tokens (2 pages), a
# decode step's store of 16 tokens x 2 KV heads.
SMOKE = [
    "bench", "kernels", "--device", DEVICE, "--variants", "sage_fp16pv,triton16,torch_sdpa",
    "--head-dims", "64", "--seq-lens", "64", "--total-tokens", "128", "--kv-heads", "2",
    "--decode-batches", "2", "--decode-contexts", "100", "--store-variants",
    "sage_fp16pv,triton16", "--store-tokens", "16", "--store-kv-heads", "2", "--repeats", "1",
    "--warmup", "0",
]  # fmt: skip


@pytest.mark.slow
def test_smoke_run(tmp_path: Path, capsys) -> None:
    """One run (about 30 s on a 2-core CPU), checked part by part."""
    out = tmp_path / "kernels.json"
    code = cli_main([*SMOKE, "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result["problems"]
    check_header(result)
    check_prefill_rows(result["prefill"])
    check_decode_rows(result["decode"])
    check_store_rows(result["store"], result["copy_bandwidth"]["gb_per_s"])
    markdown = out.with_suffix(".md").read_text()
    check_markdown(markdown)
    assert markdown in capsys.readouterr().out


def check_header(result: dict) -> None:
    assert result["complete"] and result["problems"] == []
    assert result["command"].startswith("sageserve bench kernels --device")
    assert {"torch", "triton", "cuda", "sageattention"} <= set(result["software"])
    assert result["device"]["name"] and result["date"]
    assert result["copy_bandwidth"]["gb_per_s"] > 0
    assert set(result["method"]["prefill_included"]) == {"sage_fp16pv", "triton16", "torch_sdpa"}
    assert set(result["method"]["store_included"]) == {"sage_fp16pv", "triton16"}


def check_prefill_rows(prefill: list[dict]) -> None:
    rows = {(r["variant"], r["causal"]): r for r in prefill}
    assert len(rows) == 6
    # The 16-bit paged prefill is causal only: said so, with no figure.
    unsupported = rows.pop(("triton16", False))
    assert unsupported["status"] == "not supported" and "non-causal" in unsupported["reason"]
    assert "tops" not in unsupported
    for (variant, _), row in rows.items():
        assert row["status"] == "ok", row
        assert row["tops"] > 0 and row["ms"] > 0 and row["samples_ms"]
        assert row["accuracy"]["cosine"] > 0.99 and row["accuracy"]["rel_l1"] < 0.05
        assert all(row["checks"].values()), row["checks"]
        assert (row["batch"], row["seq_len"], row["kv_heads"]) == (2, 64, 2)
        if variant != "torch_sdpa":  # ours: store timed apart
            assert row["store_ms"] > 0
    assert rows[("sage_fp16pv", True)]["checks"]["matches_backend_forward"]
    assert rows[("triton16", True)]["checks"]["poisoned_output_all_written"]


def check_decode_rows(decode: list[dict]) -> None:
    rows = {r["variant"]: r for r in decode}
    assert set(rows) == {"sage_fp16pv", "triton16"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["us"] > 0 and row["gb_per_s"] > 0 and row["copy_bandwidth_fraction"] > 0
        assert row["accuracy"]["cosine"] > 0.99
        assert row["checks"] == {"finite": True, "matches_backend_forward": True, "cosine_ok": True}
    # 2 pages of 64 tokens, 2 sequences: 8-bit 8 heads x (2 x 128 codes + 2 scales x 2 bytes).
    assert rows["sage_fp16pv"]["kv_bytes_read"] == 2 * 128 * 8 * (2 * 128 + 4)
    assert rows["sage_fp16pv"]["speedup_vs_triton16"] > 0


def check_store_rows(store: list[dict], copy_gb_per_s: float) -> None:
    rows = {r["variant"]: r for r in store}
    assert set(rows) == {"sage_fp16pv", "triton16"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert (row["tokens"], row["kv_heads"], row["layout"]) == (16, 2, "decode")
        assert row["checks"] == {"matches_reference": True, "matches_backend_forward": True}
        assert row["us"] > 0 and row["samples_us"]
        # The bound: the same bytes at the copy bandwidth, and the fraction of it reached.
        assert row["gb_per_s"] == pytest.approx(row["bytes_moved"] / row["us"] / 1e3)
        assert row["bound_us"] == pytest.approx(row["bytes_moved"] / copy_gb_per_s / 1e3)
        assert row["copy_bandwidth_fraction"] == pytest.approx(row["bound_us"] / row["us"])
    # 16 tokens x 2 KV heads x 128: K/V in (fp32 on CPU, bf16 on GPU), then per variant the
    # cache entries out and the slot indices (8-bit: also the fp32 mean and balance).
    kv_in = 2 * 16 * 2 * 128 * (4 if DEVICE == "cpu" else 2)
    sage_out = 16 * 2 * 2 * (128 + 2) + 2 * 16 * 8 + 2 * 2 * 128 * 4
    assert rows["sage_fp16pv"]["bytes_moved"] == kv_in + sage_out
    assert rows["triton16"]["bytes_moved"] == 2 * kv_in + 16 * 8


def check_markdown(markdown: str) -> None:
    assert "### Prefill, head_dim 64, causal" in markdown
    assert "| triton16 | n/s |" in markdown
    assert "### Decode" in markdown and "2 × 100" in markdown
    assert "### KV store, head_dim 128" in markdown and "| 16 × 2 | decode |" in markdown
    assert "Problems: 0" in markdown


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variants", "sage_fp16pv,flash3"], "sageattn_1_0_6"),
        (["--head-dims", "96"], "64,128"),
        (["--seq-lens", "0"], "positive integers"),
        (["--decode-variants", "sdpa_flash"], "triton16"),
        (["--store-variants", "torch_sdpa"], "sage_fp8pv"),
        (["--store-tokens", "16,-1"], "positive integers"),
        (["--kv-heads", "5"], "must divide 32"),
        (
            ["--device", "cpu", "--variants", "sdpa_flash", "--skip-decode", "--skip-store", *TINY],
            "--variants",
        ),
        (["--device", "cpu"], "--seq-lens 32768"),  # the GPU grid, refused on CPU
        (["--device", "cpu", "--skip-prefill", "--decode-contexts", "2000"], "contexts 2000"),
        (["--device", "cpu", "--skip-prefill", "--skip-decode"], "--store-tokens 16384"),
        (["--skip-prefill", "--skip-decode", "--skip-store"], "leave nothing to run"),
        (["--decode-variants", "sage_fp16pv_gluon"], "sage_fp16pv_tcrot"),  # prefill only
        (["--device", "cpu", "--variants", "sage_fp16pv_gluon", *_PREFILL_ONLY], "sm_90"),
    ],
)
def test_bad_values_exit_2_naming_the_choices(flags, message, capsys) -> None:
    assert cli_main(["bench", "kernels", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cpu_refusal_suggests_a_run_it_accepts(capsys) -> None:
    assert cli_main(["bench", "kernels", "--device", "cpu"]) == 2
    suggested = capsys.readouterr().err.split("to smoke-test on CPU: ")[1].split()
    assert suggested[:3] == ["sageserve", "bench", "kernels"]
    parser = argparse.ArgumentParser()
    add_kernels_args(parser)
    assert config_from_args(parser.parse_args(suggested[3:])).device == "cpu"


def test_bad_choice_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "kernels", "--causal", "sideways"])
    assert exc.value.code == 2


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_matches_sdpa(causal: bool) -> None:
    """The fp64 reference (chunked, GQA without expanding K/V) against torch's SDPA."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(37, 8, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(37, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal,
        enable_gqa=True,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(reference_attention(q, k, v, causal), ref)


def test_store_bytes_are_the_kernel_notes_figure() -> None:
    """16k tokens x 32 KV heads in bf16: the 8-bit store moves the 405 MB of KERNEL_NOTES
    ("sage_store v2": K/V read, codes and fp16 scales written, int64 pages and offsets read)
    plus its fp32 key mean and balance; the 16-bit store writes K/V back in bf16."""
    shape = StoreShape(16384, 32, page_size=64, dtype=torch.bfloat16, seed=0)
    values = 16384 * 32 * 128
    sage = 2 * values * 2 + 2 * values + 2 * 16384 * 32 * 2 + 2 * 16384 * 8 + 2 * 32 * 128 * 4
    assert shape.bytes_moved("sage_fp16pv") == shape.bytes_moved("sage_fp8pv") == sage
    assert round(sage / 1e6) == 405
    assert shape.bytes_moved("triton16") == 4 * values * 2 + 16384 * 8


def test_store_steps_decode_and_prefill() -> None:
    """A decode step: one token per sequence, each on its own page at some offset; a prefill
    step: sequences of up to 1024 tokens from a page boundary. Sets use disjoint pages; the
    inputs are random normal (not zeros), v a strided view of a fused QKV output."""
    decode = make_inputs(
        StoreShape(16, 2, page_size=64, dtype=torch.float32, seed=1), 2, torch.device("cpu")
    )
    for step in decode.steps:
        assert [s.query_len for s in step.seqs] == [1] * 16
        assert all(len(s.page_table) == 1 and 0 <= s.prefix_len < 64 for s in step.seqs)
    pages = [{s.page_table[0] for s in step.seqs} for step in decode.steps]
    assert len(pages[0]) == len(pages[1]) == 16 and not pages[0] & pages[1]
    assert decode.num_pages == 33 and 0 not in pages[0] | pages[1]
    assert len({s.prefix_len for s in decode.steps[0].seqs}) > 1
    prefill = make_inputs(
        StoreShape(2500, 2, page_size=64, dtype=torch.float32, seed=1), 1, torch.device("cpu")
    )
    (step,) = prefill.steps
    assert [(s.prefix_len, s.query_len) for s in step.seqs] == [(0, 1024), (0, 1024), (0, 452)]
    tables = [p for s in step.seqs for p in s.page_table]
    assert sorted(tables) == list(range(1, 41)) and tables != sorted(tables)
    assert prefill.num_pages == 41
    assert step.k.shape == step.v.shape == (2500, 2, 128) and step.q.shape == (2500, 8, 128)
    assert step.k.is_contiguous() and not step.v.is_contiguous()
    assert all(float((t != 0).float().mean()) > 0.999 for t in (step.q, step.k, step.v))


def _misplaced_store(variant: StoreVariant, step: StepInputs):
    """The variant's store with every token written to the next token's slot."""
    meta, caches = variant.metas[0], variant.layer_tensors()
    if variant.eight_bit:
        from sageserve.attention.sage_attn.kernels.store import store_kv

        backend = variant.backend
        c = backend.layer_constants(0)
        pages, offsets = meta.store_pages.roll(1), meta.store_offsets.roll(1)
        return lambda: store_kv(step.k, step.v, c.k_mean, c.balance, pages, offsets, *caches,
                                rotation=backend.rotation)  # fmt: skip
    from sageserve.attention.triton_attn.kernels.store import store_kv

    return lambda: store_kv(step.k, step.v, meta.slot_mapping.roll(1), *caches)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["triton16", "sage_fp16pv", "sage_fp16pv_tcrot"])
def test_store_checks_catch_a_misplaced_store(variant: str) -> None:
    """The store's checks (against the reference, against the backend's forward) pass for
    the backend's own call and fail for one that writes the right values to wrong slots
    (the tensor-core rotation's check allows code flips, not misplaced rows)."""
    device = torch.device(DEVICE)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    if variant.endswith("_tcrot") and DEVICE == "cpu":
        dtype = torch.float16  # the interpreter multiplies fp16 tiles only
    shape = StoreShape(8, 1, page_size=16, dtype=dtype, seed=2)
    inputs = make_inputs(shape, 1, device)
    built = build_variant(variant, shape, inputs, device)
    timer = Timer(device, warmup=0, repeats=1, sample_ms=1.0)
    checks = check_variant(built, inputs.steps[0], timer)
    assert checks == {"matches_reference": True, "matches_backend_forward": True}
    built.calls[0] = _misplaced_store(built, inputs.steps[0])
    checks = check_variant(built, inputs.steps[0], timer)
    assert checks == {"matches_reference": False, "matches_backend_forward": False}


def test_no_rotation_variants_price_the_rotation() -> None:
    """`_norot` variants build the same sage kernels with the Q/K rotation off, `_tcrot` ones
    with the tensor-core rotation; all are accepted in every part and say so in the method
    they record."""
    from sageserve.bench import kernels_decode, kernels_prefill, kernels_store
    from sageserve.bench.kernels import DECODE_CHOICES, PREFILL_CHOICES, STORE_CHOICES
    from sageserve.bench.kernels_common import make_backend, model_config

    cfg = model_config(4, 2, 64)
    for pv in ("fp16", "fp8"):
        rotated = make_backend(f"sage_{pv}pv", cfg, torch.float32, torch.device("cpu"))
        plain = make_backend(f"sage_{pv}pv_norot", cfg, torch.float32, torch.device("cpu"))
        assert rotated.sage.rotate_qk and not plain.sage.rotate_qk
        assert rotated.sage.pv == plain.sage.pv == pv
        variant = f"sage_{pv}pv_norot"
        accepted = set(PREFILL_CHOICES) & set(DECODE_CHOICES) & set(STORE_CHOICES)
        assert {variant, f"sage_{pv}pv_tcrot", f"sage_{pv}pv_bfly"} <= accepted
        # The plain variant is the served default: the query pass at head_dim 128 only.
        wide = model_config(4, 2, 128)
        served = make_backend(f"sage_{pv}pv", wide, torch.float32, torch.device("cpu"))
        in_kernel = make_backend(f"sage_{pv}pv_bfly", wide, torch.float32, torch.device("cpu"))
        assert (served.sage.rotation_kernel, rotated.sage.rotation_kernel) == (
            "prepass",
            "butterfly",
        )
        assert in_kernel.sage.rotation_kernel == "butterfly"
        assert "no Q/K rotation" in kernels_prefill.INCLUDED[variant]
        assert "Hadamard matrix" in kernels_prefill.INCLUDED[f"sage_{pv}pv"]
        product = make_backend(f"sage_{pv}pv_tcrot", cfg, torch.float16, torch.device("cpu"))
        assert product.rotation == HadamardKernel.TENSOR_CORE
        assert rotated.rotation == HadamardKernel.BUTTERFLY
        assert plain.rotation == HadamardKernel.OFF
        assert "tensor-core" in kernels_prefill.INCLUDED[f"sage_{pv}pv_tcrot"]
    for part in (kernels_decode, kernels_store):
        assert "_norot" in part.INCLUDED["sage"] and "_tcrot" in part.INCLUDED["sage"]
    parser = argparse.ArgumentParser()
    add_kernels_args(parser)
    norot = "sage_fp16pv_norot"
    args = [*SMOKE[2:], "--variants", norot, "--decode-variants", norot, "--store-variants", norot]
    config = config_from_args(parser.parse_args(args))
    assert config.variants == config.decode_variants == config.store_variants == (norot,)


def test_gluon_variants_run_the_warp_specialized_prefill() -> None:
    """`_gluon` variants: the sage kernels with --sage-impl gluon, prefill only, and the
    method they record names the Gluon kernel."""
    from sageserve.bench import kernels_prefill
    from sageserve.bench.kernels import DECODE_CHOICES, PREFILL_CHOICES, STORE_CHOICES
    from sageserve.bench.kernels_common import _flags

    for pv in ("fp16", "fp8"):
        variant = f"sage_{pv}pv_gluon"
        assert variant in PREFILL_CHOICES
        assert variant not in set(DECODE_CHOICES) | set(STORE_CHOICES)
        flags = _flags(variant)
        assert (flags.impl, flags.pv, flags.rotate_qk) == ("gluon", pv, True)
        assert "warp-specialized Hopper prefill" in kernels_prefill.INCLUDED[variant]
        assert "Hadamard matrix" in kernels_prefill.INCLUDED[variant]
        plain = f"{variant}_norot"
        assert plain in PREFILL_CHOICES and plain not in set(DECODE_CHOICES)
        assert (_flags(plain).impl, _flags(plain).rotate_qk) == ("gluon", False)
        assert "Hadamard" not in kernels_prefill.INCLUDED[plain]
        assert "no Q/K rotation" in kernels_prefill.INCLUDED[plain]
    assert "widened to fp16" in kernels_prefill.INCLUDED["sage_fp16pv_gluon"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_balanced_order_puts_every_variant_everywhere_and_after_every_other(count) -> None:
    """Over a full cycle of rounds each key is sampled in each position equally often and
    right after each other key equally often (a fixed order would always put the first key
    after the last one)."""
    keys = [f"v{i}" for i in range(count)]
    rounds = [balanced_order(keys, r) for r in range(count if count % 2 == 0 else 2 * count)]
    assert all(sorted(order) == keys for order in rounds)
    positions = Counter((key, i) for order in rounds for i, key in enumerate(order))
    follows = Counter(pair for order in rounds for pair in itertools.pairwise(order))
    assert len(positions) == count * count and len(set(positions.values())) == 1
    assert len(follows) == count * (count - 1) and len(set(follows.values())) <= 1


def test_round_robin_samples_in_balanced_order() -> None:
    calls: list[str] = []
    entries = {key: Timed(call=lambda key=key: calls.append(key)) for key in "abcd"}
    timer = Timer(torch.device("cpu"), warmup=0, repeats=4, sample_ms=1.0)
    assert timer.round_robin(entries) == {}
    expected = [key for r in range(4) for key in balanced_order(list("abcd"), r)]
    assert calls == expected
    assert all(len(timed.samples_ms) == 4 for timed in entries.values())
