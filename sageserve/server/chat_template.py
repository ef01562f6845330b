"""A chat as the text its model's template makes of it, rendered off the event loop.

One place for /v1/chat/completions and /tokenize: the template must exist, every string of
the messages counts against the prompt-character limit before rendering, and a template that
rejects the messages (raise_exception, a missing variable) is the client's 400.
"""

from __future__ import annotations

from typing import Any

import jinja2

from sageserve.server.chat_messages import ChatMessage
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.protocol import bad_request


async def render_chat(
    loop: EngineLoop,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The templated text of `messages` (special tokens written by the template)."""
    if not getattr(loop.tokenizer, "chat_template", None):
        message = "this model has no chat template; send a prompt, not messages"
        raise bad_request(message, "messages")
    dicts = [m.for_template() for m in messages]
    loop.limits.check_chars(_strings(dicts), "the chat")
    kwargs = template_kwargs or {}
    try:
        return await loop.with_tokenizer(
            lambda tok: tok.apply_chat_template(
                dicts, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
        )
    except (jinja2.TemplateError, TypeError) as err:
        raise bad_request(f"the chat template rejected the messages: {err}", "messages") from err


def _strings(messages: list[dict[str, Any]]) -> list[str]:
    """Every string in the messages (contents, names, tool calls), for the character limit."""
    texts: list[str] = []
    stack: list[Any] = list(messages)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return texts
