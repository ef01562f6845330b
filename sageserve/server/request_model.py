"""Request models: strict about the fields they know, lenient about the ones they don't.

Clients of SGLang and vLLM send fields this server has no use for (`lora_path: null`,
`return_routed_experts: false`, `user`, `metadata`). As vLLM does, a request model accepts them,
ignores them and says so in the debug log. Some of those fields ask for something the server
cannot do once they hold a value (`best_of: 4`, `tools`, a `regex`): a request setting one gets a
400 that names the field and what is supported, never a silent ignore.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)

# The pydantic error type of a recognised field set to a value the server cannot honour; the
# app's validation handler reports it with the field's path and this module's message.
UNSUPPORTED_VALUE = "unsupported_value"


@dataclass(frozen=True)
class Unsupported:
    """A field the server recognises but honours only while it holds a harmless value."""

    harmless: Callable[[Any], bool]
    supported: str  # what the server offers instead, for the 400's message


def _off(value: Any) -> bool:
    """Absent in effect: null, false, an empty string, list or object."""
    return value is None or value is False or value in ("", [], {})


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    """Null or one of `allowed`, of the same JSON type (true is not 1)."""
    return lambda v: v is None or any(v == a and type(v) is type(a) for a in allowed)


def _text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


def _rule(names: str, harmless: Callable[[Any], bool], supported: str) -> dict[str, Unsupported]:
    return dict.fromkeys(names.split(), Unsupported(harmless, supported))


# By field name: a name means the same thing in every API that sends it. Fields a model
# declares never reach this table (`n`, `echo` on /v1/completions, ...).
UNSUPPORTED_FIELDS: dict[str, Unsupported] = {
    **_rule("best_of", _one_of(1), "only 1 (every sequence generated is returned; use n)"),
    **_rule("use_beam_search", _off, "false only: beam search is not implemented"),
    **_rule("length_penalty", _one_of(1, 1.0), "1 only: it applies to beam search"),
    **_rule("tools functions", _off, "none: tool calling is not implemented"),
    **_rule(
        "tool_choice function_call", _one_of("none", "auto"), "'none' or 'auto' (without tools)"
    ),
    **_rule(
        "response_format",
        _text_format,
        '{"type": "text"} only: structured output is not implemented',
    ),
    **_rule(
        "regex json_schema ebnf stop_regex structural_tag guided_json guided_regex "
        "guided_choice guided_grammar structured_outputs",
        _off,
        "none: constrained decoding is not implemented",
    ),
    **_rule("lora_path lora_id lora_request", _off, "none: LoRA adapters are not implemented"),
    **_rule(
        "image_data video_data audio_data input_embeds multi_modal_data audio",
        _off,
        "none: this server serves text-only models",
    ),
    **_rule("modalities", lambda v: v is None or v == ["text"], '["text"] only'),
    **_rule(
        "return_hidden_states return_routed_experts return_tokens_as_token_ids",
        _off,
        "false only: not implemented",
    ),
    **_rule("suffix", _off, "none: insertion (suffix) is not implemented"),
    **_rule(
        "include_stop_str_in_output no_stop_trim",
        _off,
        "false only: a matched stop string is always cut from the output",
    ),
    **_rule("echo", _off, "false only here; /v1/completions implements echo"),
    **_rule(
        "prompt_logprobs",
        lambda v: v is None,
        "null only here; /v1/completions and /generate (logprob_start_len) return prompt logprobs",
    ),
    **_rule("continue_final_message", _off, "false only: not implemented"),
    **_rule(
        "truncate_prompt_tokens", _off, "none: prompts are never truncated; shorten the prompt"
    ),
    **_rule("token_ids_logprob allowed_token_ids bad_words", _off, "none: not implemented"),
    **_rule("custom_logit_processor logits_processors", _off, "none: not implemented"),
}


class RequestModel(BaseModel):
    """Base of every request body: declared fields strict, unknown fields ignored (and
    logged), recognised-but-unsupported fields a 400 once set (see UNSUPPORTED_FIELDS)."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _check_extra_fields(self) -> Self:
        extra = self.model_extra or {}
        for name, value in extra.items():
            rule = UNSUPPORTED_FIELDS.get(name)
            if rule is not None and not rule.harmless(value):
                raise PydanticCustomError(
                    UNSUPPORTED_VALUE,
                    "{value} is not supported; supported: {supported}",
                    {"field": name, "value": _short(value), "supported": rule.supported},
                )
        if extra:
            logger.debug("%s: ignored fields %s", type(self).__name__, ", ".join(sorted(extra)))
        return self


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
