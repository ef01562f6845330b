"""Verdicts by precision: 16-bit backends by SGLang's per-token rule, 8-bit ones by bars fit
for quantized attention (sageserve/validate/profiles.py), and McNemar's exact test."""

from __future__ import annotations

import pytest

from sageserve.cli import main
from sageserve.validate.config import Thresholds
from sageserve.validate.metrics import mcnemar_p, proportion_ci
from sageserve.validate.profiles import choose_profiles
from sageserve.validate.verdicts import agreement_verdict, mmlu_verdict, perplexity_verdict

TH = Thresholds()


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 7) == mcnemar_p(7, 3) == pytest.approx(2 * 176 / 1024)
    assert mcnemar_p(6, 6) == 1.0  # capped
    # 200 discordant pairs split 120 / 80: a clear change (normal approximation ~0.0047)
    assert 0.003 < mcnemar_p(120, 80) < 0.006
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_each_backend_gets_its_own_profile_unless_forced() -> None:
    backends = {"torch": "torch", "sage_attn": "sage_attn", "far": "flashinfer"}
    auto = choose_profiles(backends, "auto")
    assert {k: c.profile for k, c in auto.items()} == {
        "torch": "16bit", "sage_attn": "8bit", "far": "16bit"
    }  # fmt: skip
    assert auto["torch"].note == "" and auto["sage_attn"].note == ""
    assert "unknown" in auto["far"].note
    forced = choose_profiles({"torch": "torch", "sage_attn": "sage_attn"}, "8bit")
    assert forced["torch"].note == " [8bit profile forced on a 16bit backend]"
    assert forced["sage_attn"].note == "" and forced["sage_attn"].forced
    with pytest.raises(ValueError, match="choose from auto, 16bit, 8bit"):
        choose_profiles({"torch": "torch"}, "4bit")


def agreement_stats(
    share: float, kl: float, kl_high: float, top1: float, top1_high: float | None = None
) -> dict:
    top1_high = top1 + 0.004 if top1_high is None else top1_high  # ~1000 tokens' interval
    return {"frac_within_logprob_delta": share, "mean_kl": kl, "mean_kl_ci": [0.0, kl_high],
            "top1_agreement": top1, "top1_ci": [top1 - 0.004, top1_high]}  # fmt: skip


def statuses(verdict) -> list[bool | None]:
    return [c.passed for c in verdict.checks]


def test_an_8bit_backend_is_judged_on_the_distribution_not_per_token() -> None:
    """SmolLM2's 8-bit figures (share 0.82, KL 9e-4) pass the 8-bit bars and fail SGLang's
    per-token rule; a KL whose interval reaches the bound fails, so does a low top-1."""
    own = choose_profiles({"sage_attn": "sage_attn"}, "auto")
    typical = {"sage_attn": {"short": agreement_stats(0.82, 9e-4, 1.1e-3, 0.985)}}
    verdict = agreement_verdict(typical, TH, own)
    assert verdict.status == "pass" and statuses(verdict) == [None, True, True]
    strict = choose_profiles({"sage_attn": "sage_attn"}, "16bit")
    verdict = agreement_verdict(typical, TH, strict)
    assert verdict.status == "fail" and statuses(verdict) == [False, True]
    assert all("forced on a 8bit backend" in c.name for c in verdict.checks)
    wide = {"sage_attn": {"short": agreement_stats(0.82, 1.5e-3, 2.1e-3, 0.985)}}
    assert agreement_verdict(wide, TH, own).status == "fail"
    flipped = {"sage_attn": {"short": agreement_stats(0.82, 9e-4, 1.1e-3, 0.975)}}
    assert agreement_verdict(flipped, TH, own).status == "fail"
    # 62 of 64 tokens (two near-tie flips): 96.9%, Wilson interval [0.89, 0.99]: not
    # significantly below 98%, so it passes; 56 of 64 (87.5%, [0.77, 0.94]) fails.
    low, high = proportion_ci(62, 64)
    short = {"sage_attn": {"hit": agreement_stats(0.9, 3e-4, 4e-4, 62 / 64, high)}}
    assert agreement_verdict(short, TH, own).status == "pass" and low < 0.9 < 0.98 < high
    low, high = proportion_ci(56, 64)
    worse = {"sage_attn": {"hit": agreement_stats(0.9, 3e-4, 4e-4, 56 / 64, high)}}
    assert agreement_verdict(worse, TH, own).status == "fail" and high < 0.98


def test_a_16bit_backend_keeps_the_per_token_rule() -> None:
    own = choose_profiles({"triton": "triton"}, "auto")
    close = {"triton": {"short": agreement_stats(0.995, 1e-5, 2e-5, 0.999)}}
    assert statuses(agreement_verdict(close, TH, own)) == [True, True]
    loose = {"triton": {"short": agreement_stats(0.90, 1e-4, 2e-4, 0.999)}}
    assert agreement_verdict(loose, TH, own).status == "fail"


def test_perplexity_8bit_needs_the_whole_interval_inside() -> None:
    own = choose_profiles({"torch": "torch", "sage_attn": "sage_attn"}, "auto")
    inside = {"torch": {}, "sage_attn": {"delta_rel": 0.001, "delta_rel_ci": [-0.004, 0.004]}}
    assert perplexity_verdict(inside, TH, own).status == "pass"
    reaching = {"torch": {}, "sage_attn": {"delta_rel": 0.001, "delta_rel_ci": [-0.001, 0.006]}}
    assert perplexity_verdict(reaching, TH, own).status == "fail"
    as_16bit = choose_profiles({"torch": "torch", "sage_attn": "sage_attn"}, "16bit")
    assert perplexity_verdict(reaching, TH, as_16bit).status == "pass"  # point estimate only


def test_mmlu_8bit_fails_on_a_significant_change_only() -> None:
    own = choose_profiles({"sage_attn": "sage_attn"}, "auto")

    def row(p: float) -> dict:
        return {"sage_attn": {"flip_rate": 0.05, "mcnemar_p": p}}

    assert mmlu_verdict(row(0.4), TH, own).status == "pass"
    assert mmlu_verdict(row(0.01), TH, own).status == "fail"
    as_16bit = choose_profiles({"sage_attn": "sage_attn"}, "16bit")
    assert mmlu_verdict(row(0.01), TH, as_16bit).status == "info"  # no flip limit set


def test_bad_profile_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "quick", "--verdict-profile", "4bit"])
    assert exit_info.value.code == 2
    assert "auto" in capsys.readouterr().err
    assert main(["validate", "quick", "--min-top1", "1.5"]) == 2
    assert "min_top1 must be in (0, 1)" in capsys.readouterr().err


def test_decoded_logprob_tolerance_follows_profile_and_model_dtype() -> None:
    """Decoded positions against teacher forcing: the 16-bit rule's 0.05 for an fp32 model,
    0.5 when the model itself runs in bf16/fp16 (its decode and prefill GEMMs round
    differently), the 8-bit tolerance for 8-bit attention in any dtype; prompt positions
    stay exact."""
    t = Thresholds()
    assert t.logprob_tols("16bit", "float32") == (1e-4, 0.05)
    assert t.logprob_tols("16bit", "bfloat16") == (1e-4, 0.5)
    assert t.logprob_tols("16bit", "float16") == (1e-4, 0.5)
    assert t.logprob_tols("8bit", "bfloat16") == (1e-4, 0.75)
    assert t.logprob_tols("8bit", "float32") == (1e-4, 0.75)
    assert Thresholds(cross_path_tol_16bit_model=0.2).logprob_tols("16bit", "bfloat16")[1] == 0.2
    with pytest.raises(ValueError, match="cross_path_tol_16bit_model must be > 0"):
        Thresholds(cross_path_tol_16bit_model=0.0)
    assert main(["validate", "quick", "--cross-path-tol-16bit-model", "0"]) == 2
