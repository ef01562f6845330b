"""`sageserve validate --url`: two real server processes (torch, sage_attn) on loopback.

The remote report must agree with what the same measurements give locally: the reference
server's scored log-probs equal the local engine's teacher-forced ones, its perplexity
follows, the 8-bit server's KV bytes are the local backend's, and an OpenAI-only view of
the same servers marks the prompt-logprob sections unsupported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_process import ServerProcess, launched

from sageserve.cli import main as cli_main
from sageserve.validate.metrics import kl_divergence, top_n_kl

MODEL = "smollm2-135m-instruct"
FLAGS = ["--device", "cpu", "--dtype", "float32", "--context-length", "1024"]
SIZES = [
    *("--logprob-prompts", "1", "--logprob-prompt-len", "16", "--logprob-new-tokens", "4"),
    *("--short-len", "64", "--short-windows", "2", "--medium-windows", "0", "--long-windows", "0"),
    *("--prefix-len", "64", "--suffix-len", "16", "--ppl-group", "short"),
    *("--mmlu-per-subject", "1", "--mmlu-subjects", "2"),
    *("--throughput-input-lens", "16", "--throughput-output-lens", "4"),
    *("--throughput-concurrency", "1,2", "--throughput-repeats", "1"),
    *("--determinism-runs", "2", "--determinism-prompt-len", "40"),
    *("--determinism-new-tokens", "4", "--determinism-batch", "2"),
]


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    def failed() -> bool:
        return request.session.testsfailed > 0

    flags = [*FLAGS, "--max-total-tokens", "4096"]
    with (
        launched(MODEL, [*flags, "--attention-backend", "torch"], failed) as ref,
        launched(MODEL, [*flags, "--attention-backend", "sage_attn"], failed) as sage,
    ):
        yield ref, sage


def _validate(urls: str, out: Path, *extra: str) -> tuple[int, dict]:
    code = cli_main(["validate", "quick", "--url", urls, "--out", str(out), *SIZES, *extra])
    return code, json.loads((out / "report.json").read_text())


def test_remote_report_torch_vs_sage(servers, tmp_path: Path) -> None:
    ref, sage = servers
    code, rep = _validate(f"{ref.url},{sage.url}", tmp_path)
    assert code in (0, 1) and (tmp_path / "report.md").is_file()
    assert code == (0 if rep["passed"] else 1)
    sec = rep["sections"]
    assert {s["verdict"]["status"] for s in sec.values()} <= {"pass", "fail", "info"}
    logprobs = sec["logprobs"]["results"]["backends"]
    for url in (ref.url, sage.url):
        assert logprobs[url]["num_failures"] == 0, logprobs[url]["failures"]
        assert logprobs[url]["apis"] == ["/generate", "/v1/completions", "/v1/chat/completions"]
        assert logprobs[url]["prompt_positions"] == 15
    short = sec["agreement"]["results"]["backends"][sage.url]["short"]
    assert short["n_tokens"] == 2 * 63
    assert 0 < short["mean_kl"] < 2e-3 and short["top1_agreement"] > 0.9
    hit = sec["agreement"]["results"]["backends"][sage.url]["prefix_cache_hit"]
    assert 32 < hit["cached_prefix_tokens"] <= 64 and hit["n_tokens"] == 16
    # The reference compared with its own from-scratch scoring: the cache changes nothing.
    assert sec["agreement"]["results"]["backends"][ref.url]["prefix_cache_hit"]["max_kl"] < 1e-6
    mem = sec["memory"]["results"]["backends"]
    assert mem[sage.url]["kv_bytes_per_token"] < 0.3 * mem[ref.url]["kv_bytes_per_token"]
    det = sec["determinism"]["results"]["backends"]
    assert all(d["cold_runs_flushed"] for d in det.values())
    assert sec["determinism"]["results"]["all_identical"][ref.url]
    assert set(sec["throughput"]["results"]["backends"][sage.url]) == {
        "in16-out4-c1",
        "in16-out4-c2",
    }
    assert (tmp_path / "kl_histogram.png").is_file()


def test_remote_reference_scores_equal_local_engine(servers, tmp_path: Path) -> None:
    """The reference server's exact target log-probs are the local torch engine's."""
    from sageserve import LLM

    ref, _ = servers
    _, rep = _validate(f"{ref.url},{ref.url}", tmp_path, "--sections", "perplexity")
    window = rep["sections"]["perplexity"]["results"]
    llm = LLM(MODEL, dtype="float32", device="cpu", context_length=1024, max_total_tokens=2048)
    from sageserve.validate.data import britannica_text

    ids = llm.engine.tokenizer.encode(britannica_text(), add_special_tokens=False)
    lps = []
    for offset in window["token_offsets"]:
        tokens = ids[offset : offset + window["window_tokens"]]
        rows = llm.engine.teacher_forced_logprobs(tokens)
        lps.append(rows.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1).double())
    local_ppl = math.exp(-torch.cat(lps).mean().item())
    remote_ppl = window["backends"][ref.url]["perplexity"]
    assert remote_ppl == pytest.approx(local_ppl, rel=1e-4)


def test_openai_only_view_marks_sections_unsupported(servers, tmp_path: Path) -> None:
    ref, sage = servers
    sections = "logprobs,agreement,perplexity,mmlu,determinism"
    _, rep = _validate(
        f"{ref.url},{sage.url}", tmp_path, "--remote-api", "openai", "--sections", sections
    )
    sec = rep["sections"]
    for name in ("agreement", "perplexity", "mmlu"):
        assert sec[name]["verdict"]["status"] == "unsupported"
        assert "/generate" in sec[name]["verdict"]["reason"]
    logprobs = sec["logprobs"]["results"]["backends"][sage.url]
    assert logprobs["apis"] == ["/v1/completions", "/v1/chat/completions"]
    assert logprobs["num_failures"] == 0, logprobs["failures"]
    assert sec["determinism"]["verdict"]["status"] in ("pass", "fail")
    assert sec["throughput"]["verdict"]["status"] == "not_run"


def test_flush_cache_endpoint(servers) -> None:
    ref, _ = servers
    body = {"input_ids": list(range(500, 540)), "sampling_params": {"max_new_tokens": 1}}
    httpx.post(f"{ref.url}/generate", json=body, timeout=60).raise_for_status()
    again = httpx.post(f"{ref.url}/generate", json=body, timeout=60).json()
    assert again["meta_info"]["cached_tokens"] > 0
    assert httpx.post(f"{ref.url}/flush_cache", timeout=60).json() == {"flushed": True}
    cold = httpx.post(f"{ref.url}/generate", json=body, timeout=60).json()
    assert cold["meta_info"]["cached_tokens"] == 0


def test_unreachable_url_is_a_usage_error(tmp_path: Path, capsys) -> None:
    code = cli_main(["validate", "quick", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)])
    assert code == 2
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def test_top_n_kl_tracks_the_exact_kl_on_peaked_distributions() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(200, 3000, generator=gen, dtype=torch.float64) * 6
    ref = logits.log_softmax(-1)
    test = (logits + 0.05 * torch.randn(logits.shape, generator=gen)).log_softmax(-1)
    exact = kl_divergence(ref, test)
    approx = []
    for r, t in zip(ref, test, strict=True):
        (rv, ri), (tv, ti) = r.topk(20), t.topk(20)
        approx.append(
            top_n_kl(
                dict(zip(ri.tolist(), rv.tolist(), strict=True)),
                dict(zip(ti.tolist(), tv.tolist(), strict=True)),
            )
        )
    ratio = sum(approx) / exact.sum().item()
    assert 0.8 < ratio < 1.1, ratio
    assert top_n_kl({1: -0.1, 2: -2.4}, {1: -0.1, 2: -2.4}) == pytest.approx(0.0, abs=1e-12)
