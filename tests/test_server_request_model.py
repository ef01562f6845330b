"""Request models without a server: unknown fields ignored and logged, recognised ones that
ask for the unsupported refused, chat messages as templates read them."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError

from sageserve.server.chat_messages import ChatMessage
from sageserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
)
from sageserve.server.request_model import UNSUPPORTED_FIELDS, UNSUPPORTED_VALUE

CHAT = [{"role": "user", "content": "Hi"}]


def _unsupported(model: type, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    first = caught.value.errors()[0]
    assert first["type"] == UNSUPPORTED_VALUE, first
    return first


def test_unknown_fields_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sageserve.server.request_model")
    body = {"prompt": "x", "metadata": {"k": "v"}, "service_tier": "auto", "lora_path": None}
    request = CompletionRequest.model_validate(body)
    assert request.prompt == "x"
    assert "lora_path, metadata, service_tier" in caplog.text


@pytest.mark.parametrize(
    ("field", "harmless", "refused"),
    [
        ("best_of", 1, 2),
        ("tools", [], [{"type": "function"}]),
        ("tool_choice", "none", "required"),
        ("response_format", {"type": "text"}, {"type": "json_object"}),
        ("return_routed_experts", False, True),
        ("regex", None, "[a-z]+"),
        ("suffix", "", "end"),
    ],
)
def test_recognised_fields_are_refused_only_when_set(
    field: str, harmless: Any, refused: Any
) -> None:
    ChatCompletionRequest.model_validate({"messages": CHAT, field: harmless})
    error = _unsupported(ChatCompletionRequest, {"messages": CHAT, field: refused})
    assert error["ctx"]["field"] == field and UNSUPPORTED_FIELDS[field].supported in error["msg"]


def test_true_is_not_one() -> None:
    _unsupported(CompletionRequest, {"prompt": "x", "best_of": True})


def test_nested_sampling_params_are_checked() -> None:
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1, "json_schema": "{}"}}
    error = _unsupported(GenerateRequest, body)
    assert error["loc"][0] == "sampling_params" and error["ctx"]["field"] == "json_schema"
    harmless = {"text": "x", "sampling_params": {"json_schema": None, "stop_regex": None}}
    GenerateRequest.model_validate(harmless)


def test_declared_fields_stay_strict() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": "5"})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "echo": 1})


def test_chat_messages_for_the_template() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert ChatMessage.model_validate({"role": "user", "content": parts}).for_template() == {
        "role": "user",
        "content": "a\nb",
    }
    developer = ChatMessage.model_validate({"role": "developer", "content": "be brief"})
    assert developer.for_template() == {"role": "system", "content": "be brief"}
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assistant = ChatMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": calls}
    )
    assert assistant.for_template() == {"role": "assistant", "content": "", "tool_calls": calls}


@pytest.mark.parametrize(
    ("message", "phrase"),
    [
        ({"role": "user", "content": None}, "needs content"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "text-only"),
        ({"role": "user", "content": ["plain string part"]}, "None"),
        ({"role": "robot", "content": "x"}, "role"),
    ],
)
def test_bad_chat_messages(message: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatMessage.model_validate(message)
    assert phrase in str(caught.value)
