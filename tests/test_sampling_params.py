from __future__ import annotations

import pytest

from sageserve.engine.sampling_params import SamplingParams, max_top_logprobs


def test_defaults_follow_sglang() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128 and p.temperature == 1.0 and p.top_k == -1
    assert not p.greedy and not p.has_penalties and not p.top_k_enabled
    assert p.stop == () and p.stop_token_ids == ()


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("temperature", float("inf"), ">= 0"),
        ("temperature", "1", ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, ">= 1"),
        ("top_k", 2.0, ">= 1"),
        ("top_k", True, ">= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("seed", 1.5, "integer"),
        ("seed", 2**64, "integer"),
        ("max_new_tokens", -1, ">= 0"),
        ("min_new_tokens", -1, "[0, 128]"),
        ("min_new_tokens", 129, "[0, 128]"),
        ("stop", [""], "non-empty"),
        ("stop", [1], "non-empty"),
        ("stop", 5, "string"),
        ("stop_token_ids", [-1], ">= 0"),
        ("stop_token_ids", 3, "token ids"),
        ("ignore_eos", 1, "bool"),
        ("skip_special_tokens", None, "bool"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("frequency_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -2.01, "[-2, 2]"),
        ("presence_penalty", 3, "[-2, 2]"),
        ("logprobs", -1, f"[0, {max_top_logprobs}]"),
        ("logprobs", max_top_logprobs + 1, f"[0, {max_top_logprobs}]"),
        ("prompt_logprobs", 21, f"[0, {max_top_logprobs}]"),
        ("prompt_logprobs", 1.0, f"[0, {max_top_logprobs}]"),
        ("logprob_start_len", -1, ">= 0"),
    ],
)
def test_invalid_values_name_field_value_and_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    bad = value[0] if isinstance(value, list) else value  # lists are reported by bad entry
    assert field in msg and repr(bad) in msg and allowed in msg, msg


@pytest.mark.parametrize("stop", ["###", ["###"], ("###",)])
def test_stop_normalised_to_tuple(stop: object) -> None:
    assert SamplingParams(stop=stop).stop == ("###",)


def test_none_sequences_normalised() -> None:
    p = SamplingParams(stop=None, stop_token_ids=None)  # type: ignore[arg-type]
    assert p.stop == () and p.stop_token_ids == ()
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)


def test_boundaries_accepted() -> None:
    p = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=0,
        min_p=1,
        seed=-(2**63),
        max_new_tokens=0,
        repetition_penalty=0.5,
        frequency_penalty=-2,
        presence_penalty=2,
        logprobs=0,
        prompt_logprobs=max_top_logprobs,
        logprob_start_len=3,
    )
    assert p.greedy and not p.top_k_enabled and p.has_penalties
    assert isinstance(p.temperature, float) and isinstance(p.presence_penalty, float)
    assert SamplingParams(top_k=1).top_k_enabled


def test_tiny_temperature_is_greedy_and_params_are_frozen() -> None:
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]
