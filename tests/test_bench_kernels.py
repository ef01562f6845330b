"""`sageserve bench kernels` in-process at tiny shapes (CPU: Triton's interpreter; with a
GPU: compiled), its JSON and Markdown, and its refusal of bad flags (exit 2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sageserve.bench.kernels import add_kernels_args, config_from_args
from sageserve.bench.kernels_common import reference_attention
from sageserve.cli import main as cli_main

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = ["--seq-lens", "64", "--total-tokens", "128"]
# Tiny shapes: 2 sequences of 64 tokens, GQA 32/2 heads (the 8-bit store kernel runs one
# interpreted program per token and KV head), 2 decodes over 100 cached tokens (7 pages).
SMOKE = [
    "bench", "kernels", "--device", DEVICE, "--variants", "sage_fp16pv,triton16,torch_sdpa",
    "--head-dims", "64", "--seq-lens", "64", "--total-tokens", "128", "--kv-heads", "2",
    "--decode-batches", "2", "--decode-contexts", "100", "--repeats", "1", "--warmup", "0",
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


def check_markdown(markdown: str) -> None:
    assert "### Prefill, head_dim 64, causal" in markdown
    assert "| triton16 | n/s |" in markdown
    assert "### Decode" in markdown and "2 × 100" in markdown
    assert "Problems: 0" in markdown


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variants", "sage_fp16pv,flash3"], "sageattn_1_0_6"),
        (["--head-dims", "96"], "64,128"),
        (["--seq-lens", "0"], "positive integers"),
        (["--decode-variants", "sdpa_flash"], "triton16"),
        (["--kv-heads", "5"], "must divide 32"),
        (["--device", "cpu", "--variants", "sdpa_flash", "--skip-decode", *TINY], "--variants"),
        (["--device", "cpu"], "--seq-lens 32768"),  # the GPU grid, refused on CPU
        (["--device", "cpu", "--skip-prefill", "--decode-contexts", "2000"], "contexts 2000"),
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
