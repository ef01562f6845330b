"""The server's input guards on their own: JSON text checks, limits, their flags."""

from __future__ import annotations

import json

import pytest

from sageserve.launch_server import main as launch_main
from sageserve.server.errors import InvalidRequestError
from sageserve.server.json_text import json_body_problem
from sageserve.server.limits import CHARS_PER_TOKEN_BOUND, RequestLimits


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"text": "a\\ud800b"}', "body.text contains a lone UTF-16 surrogate"),
        ('{"text": "\\udfff"}', "body.text contains"),
        ('{"a": [1, {"b": ["ok", "\\uDBFF"]}]}', "body.a[1].b[1] contains"),
        ('{"\\ud800": 1}', "body: a key"),
        ("[" * 3000 + "]" * 3000, "nested too deeply"),
        ("[" * 400 + '"\\ud800"' + "]" * 400, "nested too deeply"),
    ],
)
def test_json_bodies_that_must_be_refused(body: str, problem: str) -> None:
    found = json_body_problem(body.encode())
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "body",
    [
        '{"text": "smile \\ud83d\\ude00"}',  # a surrogate pair is one character
        '{"text": "a\\\\ud800"}',  # an escaped backslash, then plain letters
        '{"text": "caf\u00e9"}',
        "[" * 200 + "]" * 200,
        '{"text": "a\\ud800',  # malformed JSON: the route's parser names that error
        json.dumps({"input_ids": [[1, 2]] * 1000}),
    ],
)
def test_json_bodies_that_pass(body: str) -> None:
    assert json_body_problem(body.encode()) is None


def test_prompt_characters_are_bounded_by_the_context() -> None:
    limits = RequestLimits.for_context(100)
    assert limits.max_prompt_chars == 100 * CHARS_PER_TOKEN_BOUND
    limits.check_chars(["x" * limits.max_prompt_chars])
    with pytest.raises(InvalidRequestError, match="--max-prompt-chars"):
        limits.check_chars(["x" * (limits.max_prompt_chars + 1)])
    with pytest.raises(InvalidRequestError, match="the chat has 3201 characters"):
        limits.check_chars(["x" * 3000, "y" * 201], "the chat")


def test_limit_overrides_and_batch_size() -> None:
    limits = RequestLimits.for_context(100, max_prompt_chars=7, max_batch_size=None)
    assert limits.max_prompt_chars == 7 and limits.max_batch_size == 1024
    RequestLimits.for_context(100, max_batch_size=3).check_batch(3)
    with pytest.raises(InvalidRequestError, match="at most 3 per request"):
        RequestLimits.for_context(100, max_batch_size=3).check_batch(4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-body-bytes", "0"], "max_body_bytes must be >= 1"),
        (["--max-prompt-chars", "-5"], "max_prompt_chars must be >= 1"),
        (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
        (["--header-timeout", "0"], "header_timeout must be > 0"),
        (["--shutdown-timeout", "-1"], "shutdown_timeout must be > 0"),
    ],
)
def test_bad_limit_flags_exit_2_before_loading(argv: list[str], message: str, capsys) -> None:
    assert launch_main(["--model-path", "/no/such/model", *argv]) == 2
    assert message in capsys.readouterr().err
