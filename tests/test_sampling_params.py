from __future__ import annotations

import random

import pytest

from sageserve.engine.sampling_params import (
    MAX_LOGIT_BIAS_ENTRIES,
    SamplingParams,
    max_top_logprobs,
)


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


# --- logit_bias -----------------------------------------------------------------------------


def test_logit_bias_normalised_to_sorted_float_pairs() -> None:
    rng = random.Random(0)
    bias = {rng.randrange(100_000): rng.uniform(-100, 100) for _ in range(50)}
    bias[rng.randrange(100_000, 200_000)] = rng.choice([-100, 100])  # an int bias
    expected = tuple(sorted((t, float(b)) for t, b in bias.items()))
    as_str = SamplingParams(logit_bias={str(t): b for t, b in bias.items()})
    as_int = SamplingParams(logit_bias=bias)
    as_pairs = SamplingParams(
        logit_bias=[list(p) for p in rng.sample(list(bias.items()), len(bias))]
    )
    assert as_str == as_int == as_pairs and as_int.logit_bias == expected
    assert all(type(b) is float for _, b in as_int.logit_bias)
    assert SamplingParams(logit_bias=None).logit_bias == SamplingParams().logit_bias == ()
    hash(as_int)  # still a value: usable as a key


@pytest.mark.parametrize(
    ("bias", "bad", "allowed"),
    [
        ({-1: 1.0}, (-1, 1.0), "integers >= 0"),
        ({True: 1.0}, (True, 1.0), "integers >= 0"),
        ([(2.0, 1.0)], (2.0, 1.0), "integers >= 0"),
        ({"12a": 1.0}, "12a", "strings of decimal digits"),
        ({"": 1.0}, "", "strings of decimal digits"),
        ({"1" * 30: 1.0}, "1" * 30, "strings of decimal digits"),
        ({"-5": 1.0}, (-5, 1.0), "integers >= 0"),
        ({5: 101}, (5, 101), "[-100, 100]"),
        ({5: -100.5}, (5, -100.5), "[-100, 100]"),
        ({5: float("nan")}, (5, float("nan")), "[-100, 100]"),
        ({5: float("inf")}, (5, float("inf")), "[-100, 100]"),
        ({5: "1"}, (5, "1"), "[-100, 100]"),
        ({5: True}, (5, True), "[-100, 100]"),
        ({5: 1.0, "5": 2.0}, 5, "once"),
        ([(1, 2, 3)], (1, 2, 3), "pairs"),
        (7, 7, "dict"),
    ],
)
def test_invalid_logit_bias_names_entry_and_range(bias: object, bad: object, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(logit_bias=bias)
    msg = str(info.value)
    assert "logit_bias" in msg and repr(bad) in msg and allowed in msg, msg


def test_logit_bias_entry_count_is_bounded() -> None:
    at_limit = {i: 1.0 for i in range(MAX_LOGIT_BIAS_ENTRIES)}
    assert len(SamplingParams(logit_bias=at_limit).logit_bias) == MAX_LOGIT_BIAS_ENTRIES
    with pytest.raises(ValueError, match=f"at most {MAX_LOGIT_BIAS_ENTRIES} entries"):
        SamplingParams(logit_bias={**at_limit, MAX_LOGIT_BIAS_ENTRIES: 1.0})


def test_logit_bias_boundaries_accepted() -> None:
    p = SamplingParams(logit_bias={0: -100, "50256": 100.0, 7: 0})
    assert p.logit_bias == ((0, -100.0), (7, 0.0), (50256, 100.0))
