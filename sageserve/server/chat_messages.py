"""Chat messages as OpenAI's clients send them, and as a chat template wants them.

Accepted: content as a string or a list of text parts (joined with newlines, as vLLM does),
the role `developer` (given to the template as `system`: templates know no other), `tool`
messages with their `tool_call_id`, and assistant messages with `content: null` (e.g. ones
that made tool calls, which are passed on to the template). Parts other than text are a 400:
the server serves text-only models.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import field_validator, model_validator

from sageserve.server.request_model import RequestModel

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # Checked before the union is tried: its per-member errors would hide the reason.
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(
                    f"content parts of type {kind!r} are not supported: this server serves "
                    "text-only models; send parts of type 'text'"
                )
        return content

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> Self:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (only assistant's may be null)")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines; null as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as HF chat templates read it: role, content string, optional fields."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        for name in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        return message
