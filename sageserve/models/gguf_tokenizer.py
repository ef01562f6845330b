"""A transformers tokenizer built from a GGUF file's tokenizer metadata."""

from __future__ import annotations

from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# tokenizer.ggml.pre -> pre-tokenizers applied before byte-level BPE. SmolLM splits every digit
# on its own (its HF tokenizer.json does), plain gpt2 does not.
_PRE_TOKENIZERS = {
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True)],
    "gpt2": list,
}
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)
# transformers' special-token attribute -> GGUF metadata key holding its id.
_SPECIAL_ROLES = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader: GGUFReader) -> PreTrainedTokenizerFast:
    """BPE tokenizer + chat template from `tokenizer.*` metadata.

    Supports tokenizer.ggml.model "gpt2" (byte-level BPE) with pre "smollm" or "gpt2";
    anything else raises ValueError naming the supported choices.
    """
    _check_supported(reader)
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    pre = _PRE_TOKENIZERS[_field(reader, "tokenizer.ggml.pre", "gpt2")]()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*pre, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    token_types = _field(reader, "tokenizer.ggml.token_type")
    special = _added_tokens(tokens, token_types, _SPECIAL_TYPES, special=True)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(_added_tokens(tokens, token_types, (TokenType.USER_DEFINED,), False))
    return _wrap(tokenizer, tokens, [t.content for t in special], reader)


def _check_supported(reader: GGUFReader) -> None:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r}; supported: 'gpt2' (byte-level BPE)"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(_PRE_TOKENIZERS)}"
        )


def _added_tokens(
    tokens: list[str], token_types: list[int], kinds: tuple[int, ...], special: bool
) -> list[AddedToken]:
    """Tokens of the given GGUF types, matched whole (never split by BPE).

    Control/unknown tokens are special (skippable on decode); user-defined ones are not.
    """
    return [
        AddedToken(tok, special=special, normalized=False)
        for tok, kind in zip(tokens, token_types, strict=True)
        if kind in kinds
    ]


def _wrap(
    tokenizer: Tokenizer, tokens: list[str], special: list[str], reader: GGUFReader
) -> PreTrainedTokenizerFast:
    """Name bos/eos/unk/pad from metadata ids, add BOS if asked, attach the chat template.

    The other special tokens are listed too, so transformers knows them (all_special_ids).
    """
    ids = {
        role: token_id
        for role, key in _SPECIAL_ROLES.items()
        if (token_id := _field(reader, f"tokenizer.ggml.{key}")) is not None
    }
    named = {role: tokens[token_id] for role, token_id in ids.items()}
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos_token" not in named:
        raise ValueError("GGUF asks to add a BOS token but names no tokenizer.ggml.bos_token_id")
    bos = (named["bos_token"], ids["bos_token"]) if add_bos else None
    tokenizer.post_processor = _post_processor(bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=add_bos,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=[t for t in special if t not in named.values()],
        **named,
    )


def _post_processor(bos: tuple[str, int] | None) -> processors.PostProcessor:
    """Prepend `bos` (token, id) to every sequence when given; otherwise add nothing."""
    if bos is None:
        return processors.ByteLevel(trim_offsets=False)
    token = bos[0]
    return processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[bos]
    )
