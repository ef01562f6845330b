"""Incremental detokenization: text deltas for a growing list of output token ids.

Decoding the whole output every step is O(n) per token. Instead (the scheme of vLLM, SGLang
and TGI) we decode a small window of recent ids twice and emit the difference:

    ids:   ... | prefix window | pending ids      |
               ^prefix_offset  ^read_offset       ^len(ids)
    prefix_text = decode(ids[prefix_offset:read_offset])   (already emitted; cached)
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

The prefix window gives the tokenizer context (a SentencePiece word-start "▁" decodes to a
space only after other text), and it is taken from the prompt's tail for the first tokens,
as in vLLM and SGLang. When ``new_text`` ends with U+FFFD the last ids hold an incomplete
UTF-8 character, so the delta is withheld until the next ids complete it; ``flush()`` releases
whatever is still withheld when the request ends.

For byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, ...) ``text`` after ``flush()``
equals ``tokenizer.decode(output_ids, skip_special_tokens=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt ids used as context before the first output id (vLLM and SGLang use 5).
_INITIAL_CONTEXT_IDS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text, one id at a time."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._init_context(prompt_token_ids)

    def _init_context(self, prompt_token_ids: Sequence[int]) -> None:
        context = list(prompt_token_ids[-_INITIAL_CONTEXT_IDS:])
        prefix_text = self._decode(context)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a UTF-8 character: the output's first bytes would merge
            # with it, and the merged character belongs to neither. Decode the output alone.
            context, prefix_text = [], ""
        # The window: prefix ids (already emitted, or prompt context), then pending ids. Ids
        # before the window are dropped, so prefix_offset is always 0 in ``_ids``.
        self._ids = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text

    def append(self, token_id: int) -> str:
        """Add one output id; return the newly decoded text (possibly "")."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        if new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # wait: the next ids may complete the character
        return self._emit(new_text)

    def flush(self) -> str:
        """Release withheld text (with U+FFFD for a character that never completed)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text) :]
        if not delta:
            return ""  # e.g. a skipped special token: keep it pending, nothing to slide
        # Slide the window: the ids just emitted become the next prefix. Ids before them are
        # dropped, so memory and decode cost stay bounded by the window, not the output.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
