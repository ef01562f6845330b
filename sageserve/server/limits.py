"""Bounds on what one HTTP request may ask for, checked before any costly work.

Tokenizing is linear in the prompt's characters and runs before the token count is known,
so the characters are bounded first: by default `CHARS_PER_TOKEN_BOUND` characters per token
of context. Llama-family tokenizers average about 4 characters per token on English text;
the bound leaves 8x room for text that tokenizes poorly, and a prompt past it could not fit
the context anyway unless it is mostly long runs of whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sageserve.server.errors import InvalidRequestError

CHARS_PER_TOKEN_BOUND = 32
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
DEFAULT_MAX_BATCH_SIZE = 1024


@dataclass(frozen=True)
class RequestLimits:
    """max_prompt_chars: characters of one text prompt (or of a chat's messages together).

    max_batch_size: engine requests one HTTP request may create (prompts x `n`).
    """

    max_prompt_chars: int
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    @classmethod
    def for_context(cls, context_length: int, **overrides: int | None) -> RequestLimits:
        """Limits for a server with this context length; None overrides keep the default."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{"max_prompt_chars": context_length * CHARS_PER_TOKEN_BOUND, **given})

    def check_batch(self, size: int) -> None:
        if size > self.max_batch_size:
            raise InvalidRequestError(
                f"the request asks for {size} sequences (prompts x n); this server takes at "
                f"most {self.max_batch_size} per request (--max-batch-size)"
            )

    def check_chars(self, texts: Sequence[str], what: str = "the prompt") -> None:
        chars = sum(len(t) for t in texts)
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{what} has {chars} characters; this server takes at most "
                f"{self.max_prompt_chars} (--max-prompt-chars) before tokenizing"
            )
