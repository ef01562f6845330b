"""`sageserve validate quick`, reduced, end to end on SmolLM2: outputs and their consistency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM
from validate_run import validate_on_one_thread

from sageserve.models.gguf_tokenizer import tokenizer_from_gguf
from sageserve.validate.data import britannica_text

# Small enough for CI on 2 cores; every section still runs. The prompt for the cache case
# spans more than one 16-token page, so the second run really hits the prefix cache.
TINY = [
    "--short-len", "64", "--short-windows", "2", "--medium-windows", "0",
    "--ppl-group", "short", "--prefix-len", "48", "--suffix-len", "16",
    "--mmlu-subjects", "2", "--logprob-prompts", "1", "--logprob-prompt-len", "16",
    "--logprob-new-tokens", "4", "--throughput-input-lens", "8,32",
    "--throughput-output-lens", "4", "--throughput-concurrency", "2",
    "--throughput-repeats", "1", "--determinism-runs", "2", "--determinism-prompt-len", "40",
    "--determinism-new-tokens", "4", "--determinism-batch", "2",
    "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "2048",
]  # fmt: skip


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick")
    code = validate_on_one_thread(
        ["validate", "quick", "--backends", "torch,sage_attn,torch", "--out", str(out), *TINY]
    )
    assert code in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["passed"] else 1)
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def _writes_every_output(report_dir, report) -> None:
    md = (report_dir / "report.md").read_text()
    assert md.startswith("# sageserve validate (quick)")
    for name in ("kl_histogram", "logprob_delta_by_position", "throughput_vs_input", "memory"):
        assert (report_dir / f"{name}.png").stat().st_size > 1000
        assert f"![{name}.png]" in md
    assert list(report["sections"]) == [
        "logprobs", "agreement", "perplexity", "mmlu", "throughput", "memory", "determinism",
    ]  # fmt: skip
    for section in report["sections"].values():
        assert section["verdict"]["status"] in ("pass", "fail", "info")


def _a_backend_against_itself_agrees_exactly(report) -> None:
    agree = report["sections"]["agreement"]["results"]["backends"]["torch#2"]
    for group in ("short", "prefix_cache_hit"):
        assert agree[group]["mean_kl"] == pytest.approx(0, abs=1e-9)
        assert agree[group]["top1_agreement"] == 1.0
    assert agree["prefix_cache_hit"]["cached_prefix_tokens"] >= 32
    ppl = report["sections"]["perplexity"]["results"]["backends"]["torch#2"]
    assert ppl["delta_rel"] == pytest.approx(0, abs=1e-6)
    assert report["sections"]["mmlu"]["results"]["backends"]["torch#2"]["flips"] == 0
    assert report["sections"]["logprobs"]["results"]["backends"]["torch"]["num_failures"] == 0


def _sage_numbers_are_measured(report) -> None:
    s = report["sections"]
    sage = s["agreement"]["results"]["backends"]["sage_attn"]["short"]
    assert 0 < sage["mean_kl"] < 0.05 and sage["n_tokens"] == 2 * 63
    mem = s["memory"]["results"]["backends"]
    assert mem["sage_attn"]["kv_bytes_per_token"] < mem["torch"]["kv_bytes_per_token"]
    assert mem["torch"]["peak"]["peak_bytes"] > mem["torch"]["weights_bytes"]
    det = s["determinism"]["results"]["backends"]["sage_attn"]
    assert det["cache_miss_vs_hit"]["cached_tokens"][1] == 32


def _each_backend_is_judged_by_its_precision(report_dir, report) -> None:
    profiles = report["settings"]["verdict_profiles"]
    assert {k: v["profile"] for k, v in profiles.items()} == {
        "torch": "16bit", "sage_attn": "8bit", "torch#2": "16bit"
    }  # fmt: skip
    checks = report["sections"]["agreement"]["verdict"]["checks"]
    sage_share = [c for c in checks if c["name"].startswith("sage_attn short: share")]
    assert sage_share[0]["passed"] is None  # shown, not judged
    assert any(c["name"] == "sage_attn short: mean KL, upper CI" for c in checks)
    md = (report_dir / "report.md").read_text()
    assert "| sage_attn | sage_attn | 8bit | its own |" in md


def _torch_perplexity_matches_transformers(report, smollm2_gguf) -> None:
    res = report["sections"]["perplexity"]["results"]
    tok = tokenizer_from_gguf(GGUFReader(smollm2_gguf))
    ids = tok.encode(britannica_text(), add_special_tokens=False)
    n = res["window_tokens"]
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    nll = []
    with torch.inference_mode():
        for offset in res["token_offsets"]:
            window = torch.tensor([ids[offset : offset + n]])
            lp = hf(window).logits[0, :-1].log_softmax(-1)
            nll.append(-lp.gather(1, window[0, 1:, None]).squeeze(1))
    expected = torch.cat(nll).double().mean().exp().item()
    assert res["backends"]["torch"]["perplexity"] == pytest.approx(expected, rel=1e-3)


# NOTE: one test, so that pytest-xdist runs the (slow) validate fixture in one worker only.
def test_validate_quick_end_to_end(report_dir, report, smollm2_gguf) -> None:
    _writes_every_output(report_dir, report)
    _a_backend_against_itself_agrees_exactly(report)
    _sage_numbers_are_measured(report)
    _each_backend_is_judged_by_its_precision(report_dir, report)
    _torch_perplexity_matches_transformers(report, smollm2_gguf)
