"""/tokenize, /detokenize and /tokenizer_info, in the shapes SGLang and vLLM answer with.

lm-eval's remote tokenizer (used when no local one is given) reads /tokenizer_info's special
tokens and chat template, then tokenizes through /tokenize and decodes through /detokenize.

/tokenize takes SGLang's `prompt` (a string or a list of them) or vLLM's chat `messages`;
the answer has `tokens`, `count` and `max_model_len` (both servers), plus vLLM's `token_strs`
when `return_token_strs` is set. /detokenize answers with SGLang's `text` and vLLM's `prompt`
(the same string; a list of them for a list of id lists).
"""

from __future__ import annotations

from typing import Any, Self

from fastapi import APIRouter
from pydantic import Field, model_validator

from sageserve.server.chat_messages import ChatMessage
from sageserve.server.chat_template import render_chat
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.protocol import bad_request
from sageserve.server.request_model import RequestModel


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for a chat
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = False  # vLLM's default: the text the ids stand for, whole


def build_router(engine_loop: EngineLoop) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt (or each prompt of a list), or of a templated chat."""
        texts = await _texts(body, engine_loop)
        special = body.add_special_tokens
        if special is None:
            special = body.messages is None  # a chat template writes its own BOS
        ids = await engine_loop.with_tokenizer(
            lambda tok: [list(tok.encode(t, add_special_tokens=special)) for t in texts]
        )
        one = not isinstance(body.prompt, list)
        answer: dict[str, Any] = {
            "tokens": ids[0] if one else ids,
            "count": len(ids[0]) if one else [len(i) for i in ids],
            "max_model_len": engine_loop.info.context_length,
        }
        if body.return_token_strs:
            strs = [[engine_loop.token_text(t) for t in row] for row in ids]
            answer["token_strs"] = strs[0] if one else strs
        return answer

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """The text of a list of ids (or of each list of a list)."""
        rows = body.tokens if body.tokens and isinstance(body.tokens[0], list) else [body.tokens]
        _check_ids(rows, engine_loop.info.vocab_size)  # type: ignore[arg-type]
        skip = body.skip_special_tokens
        texts = await engine_loop.with_tokenizer(
            lambda tok: [tok.decode(row, skip_special_tokens=skip) for row in rows]
        )
        text = texts[0] if rows is not body.tokens else texts
        return {"text": text, "prompt": text}

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's class, special tokens, chat template and length limit."""
        tokenizer = engine_loop.tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: it takes token ids only")
        special = {f"{name}_token": getattr(tokenizer, f"{name}_token", None) for name in _SPECIAL}
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **special,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": engine_loop.info.context_length,
        }

    return router


_SPECIAL = ("bos", "eos", "pad", "unk")


async def _texts(body: TokenizeRequest, engine_loop: EngineLoop) -> list[str]:
    """The texts to tokenize, within the character limit: the prompts, or the chat templated."""
    if body.prompt is not None:
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        engine_loop.limits.check_chars(texts)
        return texts
    return [await render_chat(engine_loop, body.messages or [], body.add_generation_prompt)]


def _check_ids(rows: list[list[int]], vocab_size: int) -> None:
    bad = [t for row in rows for t in row if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "tokens"
        )
