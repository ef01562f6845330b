"""The raw bytes of one token, for OpenAI's logprobs ``bytes`` field.

``tokenizer.decode([id]).encode()`` is wrong for a token that holds part of a multi-byte
character: decoding alone turns the partial character into U+FFFD, whose bytes (ef bf bd) say
nothing about the token. ``TokenBytes`` reads the token's own bytes from its vocabulary
string instead, so the bytes of a text's tokens join into the text's UTF-8.

Two vocabulary schemes, told apart once per tokenizer (see ``is_byte_level``):

* byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): every byte of the text is stored as one
  printable character of GPT-2's ``bytes_to_unicode`` table; the inverse table gives it back.
* SentencePiece-style (Llama 2, Mistral, Gemma): ``<0xAB>`` byte-fallback tokens are that
  byte, '▁' is a space, any other text is its UTF-8.

Special and added tokens (``<|im_end|>``, ``<s>``) are stored as their own text in both
schemes: their bytes are its UTF-8.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

# SentencePiece's byte-fallback tokens: one per byte, written with two upper-case hex digits.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")
_SPIECE_SPACE = "\u2581"  # '▁', SentencePiece's stand-in for a space


def byte_level_table() -> dict[int, str]:
    """GPT-2's ``bytes_to_unicode``: byte -> the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0,
    0xAD) take the characters from U+0100 on, in byte order. Written here rather than imported
    because transformers keeps it in a private module that has moved between releases.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(table.items()))


_CHAR_TO_BYTE = {char: byte for byte, char in byte_level_table().items()}


def is_byte_level(tokenizer: PreTrainedTokenizerBase, regular_tokens: Iterable[str]) -> bool:
    """Whether ``tokenizer``'s regular (not added) token strings are byte-level BPE.

    The rule: a fast tokenizer whose decoder is, or chains, a ``ByteLevel`` decoder is
    byte-level, any other decoder is not (the decoder is what turns these very strings into
    text, so it is authoritative). Without a decoder (slow tokenizers), the vocabulary decides:
    byte-level when every regular token is made only of the table's 256 characters. A
    SentencePiece vocabulary fails that on its '▁' tokens, which the table never produces.
    """
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None:
        return "ByteLevel" in _decoder_types(json.loads(decoder.__getstate__()))
    return all(char in _CHAR_TO_BYTE for token in regular_tokens for char in token)


def _decoder_types(state: dict[str, Any]) -> set[str]:
    """Type names of a serialised decoder and of every decoder a ``Sequence`` chains."""
    types = {state.get("type", "")}
    for inner in state.get("decoders") or ():
        types |= _decoder_types(inner)
    return types


class TokenBytes:
    """Token id -> the raw bytes it stands for; results cached (one entry per id seen).

    ``token_bytes(i)`` for the tokens of a text encoded without special tokens join into the
    text's UTF-8 (SentencePiece-style vocabularies: with the leading space their '▁' prefix
    adds). An id the tokenizer has no token for (a model's padded vocabulary rows) gives b"".
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._size = len(tokenizer)
        self._added_ids = frozenset(tokenizer.added_tokens_decoder) | frozenset(
            tokenizer.all_special_ids
        )
        vocab = tokenizer.get_vocab()
        regular = (token for token, i in vocab.items() if i not in self._added_ids)
        self.byte_level = is_byte_level(tokenizer, regular)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        """The raw bytes of ``token_id`` (>= 0)."""
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative")
        if token_id >= self._size:
            return b""  # not cached: the cache stays bounded by the vocabulary
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if token_id in self._added_ids:
            return token.encode()
        if self.byte_level:
            try:
                return bytes(_CHAR_TO_BYTE[char] for char in token)
            except KeyError:  # a stray token outside the table: read it as tokenizers does
                return token.encode()
        byte = _BYTE_TOKEN.fullmatch(token)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode()
