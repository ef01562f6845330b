"""validate's `name@dtype` entries: a backend over the model in its own dtype (backend_spec.py)."""

from __future__ import annotations

import json

import pytest
from validate_run import validate_on_one_thread

from sageserve.cli import main
from sageserve.validate import runner
from sageserve.validate.backend_spec import BackendSpec, parse_backend_spec


def test_a_spec_names_a_backend_and_optionally_its_dtype() -> None:
    assert parse_backend_spec("sage_attn") == BackendSpec("sage_attn", None)
    assert parse_backend_spec("torch@float32") == BackendSpec("torch", "float32")
    assert parse_backend_spec("torch@float32").model_dtype("bfloat16") == "float32"
    assert parse_backend_spec("torch").model_dtype("bfloat16") == "bfloat16"


@pytest.mark.parametrize(
    ("spec", "named"),
    [("torch@int4", "bfloat16"), ("torch@", "float32"), ("torch@auto", "float16"),
     ("flash9@float32", "valid backends")],
)  # fmt: skip
def test_a_bad_spec_names_the_valid_choices(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_backend_spec(spec)


def test_a_bad_spec_exits_2(tmp_path, capsys) -> None:
    argv = ["validate", "quick", "--backends", "torch@float32,torch@int4", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "float32, float16, bfloat16" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_each_entry_runs_in_its_own_dtype(tmp_path, monkeypatch) -> None:
    """torch@float32 as the reference of a bf16 run: the bf16 torch entry differs from it
    (bf16 rounding), a second torch@float32 entry matches it exactly; the model is loaded
    once per dtype (fp32 and bf16: two loads for three entries)."""
    loads = []
    real_load = runner.load
    monkeypatch.setattr(runner, "load", lambda config: loads.append(config.dtype) or
                        real_load(config))  # fmt: skip
    argv = [
        "validate", "quick", "--backends", "torch@float32,torch,torch@float32",
        "--out", str(tmp_path), "--sections", "agreement", "--short-len", "48",
        "--short-windows", "1", "--medium-windows", "0", "--prefix-len", "32",
        "--suffix-len", "8", "--device", "cpu", "--dtype", "bfloat16",
        "--max-total-tokens", "512",
    ]  # fmt: skip
    validate_on_one_thread(argv)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["reference"] == "torch@float32"
    scores = report["sections"]["agreement"]["results"]["backends"]
    assert scores["torch"]["short"]["mean_kl"] > 1e-5
    assert scores["torch@float32#2"]["short"]["mean_kl"] < 1e-9
    assert sorted(loads) == ["bfloat16", "float32"]
