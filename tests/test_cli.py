"""`sageserve generate` and its user errors (exit code 2, a message naming valid choices)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sageserve.cli import main


def test_generate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--json",
            "--max-new-tokens",
            "12",
            "--logprobs",
            "2",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "The capital of France is Paris."
    assert out["finish_reason"] == "stop" and out["stop_reason"] == 2
    assert len(out["token_ids"]) == len(out["logprobs"]) == out["usage"]["completion_tokens"]
    for token, entry in zip(out["token_ids"], out["logprobs"], strict=True):
        assert str(token) in entry and all(v <= 0 for v in entry.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attention-backend", "flash9"], "invalid choice: 'flash9'"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--kv-cache-dtype", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-path", "/no/such/model"], "does not exist"),
        (["--temperature", "-1"], "temperature"),
        (["--page-size", "0"], "page_size must be >= 1"),
        (["--sage-pv", "fp8"], "options of --attention-backend sage_attn were given"),
    ],
)
def test_bad_values_exit_2(argv: list[str], message: str, capsys) -> None:
    assert main(["generate", "--prompt", "hi", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_validate_writes_an_untracked_folder_per_run(monkeypatch, tmp_path, capsys) -> None:
    """Without --out, validate writes under sageserve-reports/ (ignored by git), one new
    folder per run, never into the committed reports/."""
    from datetime import UTC, datetime

    from sageserve.output_dir import default_out_dir
    from sageserve.validate import pipeline

    written = []

    def fake_run(cfg, base, out):
        written.append(out)
        return {"passed": False}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run_validation", fake_run)
    assert main(["validate", "quick", "--backends", "torch"]) == 1
    (out,) = written
    assert out.parts[0] == "sageserve-reports" and out.name.endswith("-quick")
    assert f"FAIL: {out / 'report.md'}" in capsys.readouterr().out
    assert "/sageserve-reports/" in (Path(__file__).parents[1] / ".gitignore").read_text()
    noon = datetime(2026, 12, 3, 12, 0, 5, tzinfo=UTC)
    assert str(default_out_dir("full", noon)) == "sageserve-reports/2026-12-03-120005-full"


def test_python_m_sageserve_is_the_sageserve_command() -> None:
    """`python -m sageserve` parses and fails as the console script does (exit 2, message)."""
    bad = ["generate", "--prompt", "hi", "--attention-backend", "flash9"]
    run = subprocess.run([sys.executable, "-m", "sageserve", *bad], capture_output=True, text=True)
    assert run.returncode == 2
    assert "invalid choice: 'flash9'" in run.stderr
    assert all(name in run.stderr.split("choose from")[1] for name in ("sage_attn", "torch"))
    helped = subprocess.run(
        [sys.executable, "-m", "sageserve", "generate", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0
    assert "--sage-pv" in helped.stdout and "sage_attn = 8-bit attention" in helped.stdout
