from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sageserve.engine.token_bytes import TokenBytes, byte_level_table, is_byte_level
from sageserve.models.loader import load_tokenizer

REPLACEMENT = "\ufffd".encode()  # what decode-then-encode gives for a partial character

# Code point ranges random texts draw from: 1-, 2-, 3- and 4-byte UTF-8 (accented Latin,
# Greek, Cyrillic, CJK, kana, Hangul, emoji), so tokens split characters at every offset.
RANGES = [
    (0x20, 0x7E),
    (0xC0, 0x24F),
    (0x370, 0x4FF),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
]


def _random_text(rng: random.Random, length: int) -> str:
    """Random words of code points from RANGES, joined by spaces and the odd newline."""
    words = []
    for _ in range(length):
        lo, hi = rng.choice(RANGES)
        words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
    return "".join(w + rng.choice([" ", " ", " ", "\n", ""]) for w in words)


# --- byte-level BPE: the default model's tokenizer --------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(smollm2_gguf))[0]  # the tokenizer the server uses


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    return TokenBytes(smollm2_tokenizer)


def test_table_is_gpt2_bytes_to_unicode() -> None:
    table = byte_level_table()
    assert list(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert table[0] == "Ā" and table[0xAD] == chr(0x143)  # the 68 others, in byte order


def test_token_bytes_of_random_texts_join_into_their_utf8(
    smollm2_tokenizer: PreTrainedTokenizerBase, smollm2_bytes: TokenBytes
) -> None:
    assert smollm2_bytes.byte_level
    rng = random.Random(1)
    partial = 0
    for _ in range(40):
        text = _random_text(rng, rng.randint(1, 60))
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        pieces = [smollm2_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8")
        for i, piece in zip(ids, pieces, strict=True):
            if "\ufffd" in smollm2_tokenizer.decode([i]):  # part of a multi-byte character
                partial += 1
                assert piece != REPLACEMENT and REPLACEMENT not in piece
                with pytest.raises(UnicodeDecodeError):
                    piece.decode("utf-8")
    assert partial > 100  # the texts really did split characters across tokens


def test_random_ids_match_the_tokenizers_decoding(
    smollm2_tokenizer: PreTrainedTokenizerBase, smollm2_bytes: TokenBytes
) -> None:
    # decode() reads the same bytes and replaces what is not UTF-8: the bytes must agree
    # with it wherever it is lossless, one id at a time and for a whole sequence.
    rng = random.Random(2)
    ids = [rng.randrange(len(smollm2_tokenizer)) for _ in range(3000)]
    for i in ids:
        assert smollm2_bytes(i).decode("utf-8", "replace") == smollm2_tokenizer.decode([i])
    joined = b"".join(smollm2_bytes(i) for i in ids).decode("utf-8", "replace")
    assert joined == smollm2_tokenizer.decode(ids)


def test_special_tokens_give_their_text_and_unknown_ids_nothing(
    smollm2_tokenizer: PreTrainedTokenizerBase, smollm2_bytes: TokenBytes
) -> None:
    specials = smollm2_tokenizer.all_special_ids
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in specials
    for i in specials:
        text = smollm2_tokenizer.convert_ids_to_tokens(i)
        assert smollm2_bytes(i) == text.encode() == smollm2_tokenizer.decode([i]).encode()
    assert smollm2_bytes(len(smollm2_tokenizer)) == b""  # a padded vocabulary row
    with pytest.raises(ValueError, match="negative"):
        smollm2_bytes(-1)


def test_results_are_cached(smollm2_bytes: TokenBytes) -> None:
    i = random.Random(3).randrange(1000, 40_000)
    assert smollm2_bytes(i) is smollm2_bytes(i)


# --- SentencePiece-style: a tiny byte-fallback BPE built here -------------------------------

SP_CHARS = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "é"]
SP_MERGES = [("▁", "h"), ("l", "l"), ("▁h", "e"), ("e", "ll"), ("a", "b")]


@pytest.fixture(scope="module")
def sp_tokenizer() -> PreTrainedTokenizerBase:
    """Llama 2's tokenizer.json recipe: '▁' for spaces (and prepended), byte fallback for any
    character not in the vocabulary, and the decoder that undoes both."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for token in SP_CHARS + ["".join(pair) for pair in SP_MERGES]:
        vocab[token] = len(vocab)
    model = models.BPE(vocab, SP_MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_tokens_join_into_the_texts_utf8(
    sp_tokenizer: PreTrainedTokenizerBase,
) -> None:
    token_bytes = TokenBytes(sp_tokenizer)
    assert not token_bytes.byte_level
    rng = random.Random(4)
    alphabet = ["a", "b", "c", "d", "e", "h", "l", "o", "é", "ü", "世", "界", "😀", "ナ", " "]
    kinds = set()
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = sp_tokenizer.encode(text, add_special_tokens=False)
        pieces = [token_bytes(i) for i in ids]
        # The normaliser prepends '▁': the first token carries a space the decoder strips.
        assert b"".join(pieces) == b" " + text.encode("utf-8")
        assert sp_tokenizer.decode(ids) == text
        kinds |= {sp_tokenizer.convert_ids_to_tokens(i)[:3] for i in ids}
    assert "<0x" in kinds and "▁he" in kinds  # byte fallback and '▁' merges were exercised


def test_sentencepiece_token_kinds(sp_tokenizer: PreTrainedTokenizerBase) -> None:
    token_bytes = TokenBytes(sp_tokenizer)
    rng = random.Random(5)
    for b in rng.sample(range(256), 20):
        byte_id = sp_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert token_bytes(byte_id) == bytes([b])
    assert token_bytes(sp_tokenizer.convert_tokens_to_ids("▁he")) == b" he"
    assert token_bytes(sp_tokenizer.convert_tokens_to_ids("é")) == "é".encode()
    for special in ("<s>", "</s>", "<unk>"):
        assert token_bytes(sp_tokenizer.convert_tokens_to_ids(special)) == special.encode()
    # '世' is not in the vocabulary: three byte tokens, none of them U+FFFD.
    ids = sp_tokenizer.encode("世", add_special_tokens=False)[1:]
    assert [token_bytes(i) for i in ids] == [b"\xe4", b"\xb8", b"\x96"]


def test_vocabulary_rule_without_a_decoder(
    smollm2_tokenizer: PreTrainedTokenizerBase, sp_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Slow tokenizers have no backend decoder: the regular tokens' characters decide."""
    slow = SimpleNamespace()  # no backend_tokenizer
    for tokenizer, byte_level in ((smollm2_tokenizer, True), (sp_tokenizer, False)):
        added = set(tokenizer.added_tokens_decoder)
        regular = [t for t, i in tokenizer.get_vocab().items() if i not in added]
        assert is_byte_level(slow, regular) is byte_level  # type: ignore[arg-type]
        assert is_byte_level(tokenizer, regular) is byte_level
