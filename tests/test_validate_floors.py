"""validate's dtype floors: a bf16 backend judged by what it adds to exact attention in bf16
when the reference is fp32 (validate/floors.py)."""

from __future__ import annotations

import json

import pytest
import torch
from validate_run import validate_on_one_thread

from sageserve.validate.config import Thresholds
from sageserve.validate.data import MMLUQuestion
from sageserve.validate.floors import NO_FLOORS, excess_stats, find_floors
from sageserve.validate.metrics import TokenComparison
from sageserve.validate.mmlu import mmlu_results
from sageserve.validate.perplexity import perplexity_results
from sageserve.validate.profiles import ProfileChoice
from sageserve.validate.verdicts import agreement_verdict, mmlu_verdict, perplexity_verdict

BF16_RUN = {"torch@float32": "float32", "torch": "bfloat16", "sage_attn": "bfloat16"}
BACKENDS = {"torch@float32": "torch", "torch": "torch", "sage_attn": "sage_attn",
            "triton": "triton", "torch#2": "torch"}  # fmt: skip


def test_the_floor_is_the_first_exact_entry_of_a_lower_dtype() -> None:
    floors = find_floors(BF16_RUN, BACKENDS, "torch@float32")
    assert floors.of == {"sage_attn": "torch"} and floors.floors == {"torch"}
    # A second exact bf16 entry and a 16-bit one are judged against the first.
    more = BF16_RUN | {"torch#2": "bfloat16", "triton": "bfloat16"}
    floors = find_floors(more, BACKENDS, "torch@float32")
    assert floors.of == {"sage_attn": "torch", "triton": "torch"}
    assert floors.floors == {"torch", "torch#2"}
    # One dtype throughout, no exact entry in the lower dtype, or no dtypes (remote): none.
    assert find_floors(dict.fromkeys(BF16_RUN, "bfloat16"), BACKENDS, "torch@float32").of == {}
    no_exact = {"torch@float32": "float32", "sage_attn": "bfloat16"}
    assert find_floors(no_exact, BACKENDS, "torch@float32") == NO_FLOORS
    assert find_floors({}, BACKENDS, "torch@float32") == NO_FLOORS
    # A reference less precise than the entries: they have no floor (nothing to subtract).
    upward = {"torch": "bfloat16", "torch@float32": "float32", "sage_attn": "float32"}
    assert find_floors(upward, BACKENDS, "torch") == NO_FLOORS
    # bf16 (8 mantissa bits) under an fp16 reference (11): a floor.
    half_ref = {"torch@float32": "float16", "torch": "bfloat16", "sage_attn": "bfloat16"}
    assert find_floors(half_ref, BACKENDS, "torch@float32").of == {"sage_attn": "torch"}


def _comparison(kl: torch.Tensor, lp: torch.Tensor, top1: torch.Tensor) -> TokenComparison:
    return TokenComparison(kl.double(), torch.zeros_like(lp).double(), lp.double(), top1)


def _pair(n: int, added_kl: float, lost: int, seed: int) -> tuple[TokenComparison, ...]:
    """(floor, test) on n tokens: test = floor's KL + added_kl (jittered), its logprobs
    moved by 0.01, and top-1 lost on `lost` tokens where the floor agreed."""
    gen = torch.Generator().manual_seed(seed)
    floor_kl = torch.rand(n, generator=gen, dtype=torch.float64) * 2e-3
    lp = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    floor_top1 = torch.rand(n, generator=gen) > 0.04
    test_top1 = floor_top1.clone()
    test_top1[torch.nonzero(floor_top1).flatten()[:lost]] = False
    jitter = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * added_kl
    floor = _comparison(floor_kl, lp, floor_top1)
    return floor, _comparison(floor_kl + added_kl + jitter, lp + 0.01, test_top1)


def test_excess_stats_measure_what_the_backend_adds() -> None:
    floor, test = _pair(2000, added_kl=3e-4, lost=20, seed=1)
    stats = excess_stats(test, floor, logprob_delta=0.05, confidence=0.95)
    assert stats["excess_mean_kl"] == pytest.approx(3e-4, rel=0.05)
    low, high = stats["excess_mean_kl_ci"]
    assert low < stats["excess_mean_kl"] < high
    assert stats["top1_vs_floor"] == pytest.approx(1 - 20 / 2000)
    assert stats["top1_vs_floor_ci"][0] < stats["top1_vs_floor"] < stats["top1_vs_floor_ci"][1]
    assert stats["frac_within_vs_floor"] == 1.0
    with pytest.raises(ValueError, match="different tokens"):
        excess_stats(test, _pair(7, 0.0, 0, seed=2)[0], 0.05, 0.95)


def _profiles() -> dict[str, ProfileChoice]:
    return {
        "torch": ProfileChoice("16bit", "16bit", "torch", False),
        "sage_attn": ProfileChoice("8bit", "8bit", "sage_attn", False),
    }


def _agreement(added_kl: float, lost: int) -> dict[str, dict[str, dict]]:
    """The agreement section's per_backend stats as sections.py builds them: the floor's
    own KL is bf16-sized (1e-3 mean) and its per-token share fails SGLang's rule."""
    floor, test = _pair(4000, added_kl, lost, seed=3)
    floor_row = {"mean_kl": 1.9e-3, "frac_within_logprob_delta": 0.77}
    test_row = {"mean_kl_ci": [2.0e-3, 2.3e-3], "top1_ci": [0.95, 0.97],
                "frac_within_logprob_delta": 0.74, "floor": "torch"}  # fmt: skip
    test_row |= excess_stats(test, floor, 0.05, 0.95)
    return {"torch": {"short": floor_row}, "sage_attn": {"short": test_row}}


def test_a_backend_over_its_floor_is_judged_by_what_it_adds() -> None:
    """Against fp32 the 8-bit row's own KL and top-1 fail the bars (bf16's rounding is in
    them); over its floor it passes, and fails once it adds too much. The floor's checks
    are shown, never judged."""
    floors = find_floors(BF16_RUN, BACKENDS, "torch@float32")
    th = Thresholds()
    verdict = agreement_verdict(_agreement(3e-4, lost=20), th, _profiles(), floors)
    assert verdict.status == "pass", verdict
    shown = [c for c in verdict.checks if c.name.startswith("torch ")]
    assert shown and all(c.passed is None and "not judged" in c.limit for c in shown)
    judged = {c.name.split(": ")[1].split(" [")[0]: c for c in verdict.checks if c.passed}
    assert set(judged) == {"excess mean KL over the floor, upper CI",
                           "top-1 against the floor, upper CI"}  # fmt: skip
    assert all("against its dtype floor torch" in c.name for c in judged.values())
    assert agreement_verdict(_agreement(3e-3, 20), th, _profiles(), floors).status == "fail"
    assert agreement_verdict(_agreement(3e-4, 200), th, _profiles(), floors).status == "fail"
    # The same figures without floors: judged against the reference, and failing.
    without = {"sage_attn": _agreement(3e-4, 20)["sage_attn"]}
    without["sage_attn"]["short"].pop("floor")
    assert agreement_verdict(without, th, _profiles()).status == "fail"


def test_perplexity_over_the_floor() -> None:
    gen = torch.Generator().manual_seed(4)
    ref = -torch.rand(3000, generator=gen, dtype=torch.float64) * 4
    floor = ref - 0.004  # bf16's own cost: +0.4% perplexity
    sage = floor - 0.001 + 0.002 * torch.rand(3000, generator=gen, dtype=torch.float64)
    target_lp = {"torch@float32": {"w": ref}, "torch": {"w": floor}, "sage_attn": {"w": sage}}
    floors = find_floors(BF16_RUN, BACKENDS, "torch@float32")
    rows = perplexity_results(target_lp, ["w"], "torch@float32", 0.95, 0, floors.of)
    sage = rows["sage_attn"]
    assert sage["floor"] == "torch" and abs(sage["delta_rel_vs_floor"]) < 2e-4
    assert sage["delta_rel"] == pytest.approx(0.004, abs=5e-4)
    assert "floor" not in rows["torch"]
    th = Thresholds(ppl_delta_rel=0.002)  # the bf16 cost alone breaks this bar
    verdict = perplexity_verdict(rows, th, _profiles(), floors)
    assert verdict.status == "pass"
    floor_check = next(c for c in verdict.checks if c.name.startswith("torch:"))
    assert floor_check.passed is None and floor_check.value > th.ppl_delta_rel
    assert perplexity_verdict(rows, th, _profiles()).status == "fail"


def test_mmlu_flips_over_the_floor() -> None:
    """The bf16 floor loses 30 of 300 answers the fp32 reference got right; sage_attn
    answers as the floor does but for 2 questions: McNemar against the reference is
    significant, against its floor it is not; the floor's own checks are not judged."""
    gen = torch.Generator().manual_seed(5)
    n = 300
    answers = torch.randint(0, 4, (n,), generator=gen)
    questions = [MMLUQuestion("q", ("a", "b", "c", "d"), int(a), "s") for a in answers]
    ref = torch.randn(n, 4, generator=gen)
    ref[torch.arange(n), answers] += 10  # the reference answers every question right
    floor = ref.clone()
    floor[:30, :] = 0
    floor[torch.arange(30), (answers[:30] + 1) % 4] = 10  # 30 wrong answers in bf16
    sage = floor.clone()
    sage[30:32, :] = 0
    sage[torch.arange(30, 32), (answers[30:32] + 2) % 4] = 10  # 2 more wrong ones
    scores = {"torch@float32": ref, "torch": floor, "sage_attn": sage}
    floors = find_floors(BF16_RUN, BACKENDS, "torch@float32")
    rows = mmlu_results(scores, questions, "torch@float32", 0.95, floors.of)
    assert rows["sage_attn"]["floor"] == "torch" and rows["sage_attn"]["vs_floor"]["flips"] == 2
    assert rows["sage_attn"]["mcnemar_p"] < 0.05 < rows["sage_attn"]["vs_floor"]["mcnemar_p"]
    verdict = mmlu_verdict(rows, Thresholds(), _profiles(), floors)
    assert verdict.status == "pass"
    assert all(c.passed is None for c in verdict.checks if c.name.startswith("torch:"))
    plain = mmlu_results(scores, questions, "torch@float32", 0.95)  # no floors: vs fp32
    assert mmlu_verdict(plain, Thresholds(), _profiles()).status == "fail"


def test_validate_judges_a_bf16_run_over_its_floor(tmp_path) -> None:
    """End to end on CPU: `torch@float32,torch,sage_attn --dtype bfloat16`: sage_attn's
    rows carry its floor and what it adds, torch's checks are shown, not judged."""
    argv = [
        "validate", "quick", "--backends", "torch@float32,torch,sage_attn",
        "--out", str(tmp_path), "--sections", "agreement,perplexity", "--short-len", "64",
        "--short-windows", "1", "--medium-windows", "0", "--prefix-len", "32",
        "--suffix-len", "8", "--device", "cpu", "--dtype", "bfloat16",
        "--max-total-tokens", "512", "--ppl-group", "short",
    ]  # fmt: skip
    validate_on_one_thread(argv)
    report = json.loads((tmp_path / "report.json").read_text())
    agreement = report["sections"]["agreement"]
    sage = agreement["results"]["backends"]["sage_attn"]["short"]
    assert sage["floor"] == "torch" and sage["excess_mean_kl"] < sage["mean_kl"]
    checks = agreement["verdict"]["checks"]
    assert all(c["passed"] is None for c in checks if c["name"].startswith("torch "))
    assert any("dtype floor torch" in c["name"] for c in checks if c["passed"] is not None)
    ppl = report["sections"]["perplexity"]["results"]["backends"]["sage_attn"]
    assert ppl["floor"] == "torch" and "delta_rel_vs_floor_ci" in ppl
