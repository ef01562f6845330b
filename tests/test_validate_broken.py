"""A deliberately broken backend must fail the verdicts (and the exit code must say so)."""

from __future__ import annotations

import json

from validate_run import validate_on_one_thread

from sageserve.attention.batch import ForwardBatch
from sageserve.attention.registry import register_backend
from sageserve.attention.torch_native.backend import TorchNativeBackend, TorchNativeMetadata
from sageserve.attention.torch_native.options import TorchOptions
from sageserve.cli import main


class PeekingBackend(TorchNativeBackend):
    """The exact backend with its causal mask shifted: each query also sees the next key."""

    name = "torch_peek"

    def build_metadata(self, batch: ForwardBatch) -> TorchNativeMetadata:
        meta = super().build_metadata(batch)
        for seq in meta.prefills:
            shifted = seq.mask.clone()
            shifted[:, 1:] |= seq.mask[:, :-1]
            seq.mask = shifted
        return meta


def test_broken_backend_fails_the_report(tmp_path) -> None:
    register_backend("torch_peek", f"{__name__}:PeekingBackend")(TorchOptions)
    argv = [
        "validate", "quick", "--backends", "torch,torch_peek", "--out", str(tmp_path),
        "--sections", "agreement,perplexity", "--short-len", "48", "--short-windows", "1",
        "--medium-windows", "0", "--ppl-group", "short", "--prefix-len", "32",
        "--suffix-len", "8", "--device", "cpu", "--dtype", "float32",
        "--max-total-tokens", "512",
    ]  # fmt: skip
    assert validate_on_one_thread(argv) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["passed"]
    assert report["sections"]["agreement"]["verdict"]["status"] == "fail"
    assert report["sections"]["perplexity"]["verdict"]["status"] == "fail"
    assert report["sections"]["mmlu"]["verdict"]["status"] == "not_run"


def test_user_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["validate", "quick", "--backends", "torch,flash9", "--out", str(tmp_path)]) == 2
    assert "valid backends" in capsys.readouterr().err
    code = main(["validate", "quick", "--attention-backend", "torch", "--out", str(tmp_path)])
    assert code == 2
    assert "--backends" in capsys.readouterr().err


def test_determinism_prompt_that_caches_no_page_exits_2(tmp_path, capsys) -> None:
    """At page size 32, a 32-token prompt caches nothing (its last token is recomputed): the
    cache-hit comparison would be empty, so validate refuses before measuring."""
    argv = [
        "validate", "quick", "--backends", "torch", "--sections", "determinism",
        "--determinism-prompt-len", "32", "--page-size", "32", "--device", "cpu",
        "--dtype", "float32", "--max-total-tokens", "512", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--determinism-prompt-len 32" in err and "at least 33" in err
    assert not (tmp_path / "report.json").exists()
