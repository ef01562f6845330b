from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sageserve.engine.detokenizer import IncrementalDetokenizer
from sageserve.engine.stop import StopChecker

MULTIBYTE_TEXT = "héllo 😀👍🏽 世界, ナノ. Ünïcödé — ∑ x² 🇫🇷 done"


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def _stream(tok: PreTrainedTokenizerBase, prompt: list[int], ids: list[int], skip: bool) -> str:
    """Append ids one by one; check every delta keeps ``text`` a prefix of the full decode."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(d.append(t))
        assert tok.decode(ids[: i + 1], skip_special_tokens=skip).startswith(d.text), i
    deltas.append(d.flush())
    assert "".join(deltas) == d.text
    return d.text


def _multibyte_pieces(tok: PreTrainedTokenizerBase) -> list[int]:
    """Ids that hold fragments of multi-byte characters, to shuffle into broken sequences."""
    return sorted(set(tok.encode(MULTIBYTE_TEXT)))


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_full_decode(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    rng = random.Random(0)
    pieces = _multibyte_pieces(tokenizer)
    specials = tokenizer.all_special_ids
    prompt = tokenizer.encode("Tell me a story:")
    for _ in range(20):
        ids = [
            rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
            for _ in range(500)
        ]
        ids[rng.randrange(500)] = rng.choice(specials)
        assert _stream(tokenizer, prompt, ids, skip) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_multibyte_text_never_emits_partial_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT * 3)
    d = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"))
    deltas = [d.append(t) for t in ids]
    assert "" in deltas  # the text really does split characters across tokens
    assert all("\ufffd" not in delta for delta in deltas)
    assert d.text == MULTIBYTE_TEXT * 3 == tokenizer.decode(ids)
    assert d.flush() == ""


def test_incomplete_tail_withheld_until_flush(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("ok 😀")
    d = IncrementalDetokenizer(tokenizer, [])
    for t in ids[:-1]:
        d.append(t)
    assert d.text == "ok"  # the emoji's first bytes wait
    assert d.flush() == tokenizer.decode(ids[:-1])[2:]
    assert d.text == tokenizer.decode(ids[:-1])


def test_prompt_ending_mid_character(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("a😀 b 😀 c")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    out = ids[split:]
    assert _stream(tokenizer, ids[:split], out, True) == tokenizer.decode(out)


def test_special_tokens_skipped_or_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert _stream(tokenizer, [], ids, True) == "assistant\nHi there"
    assert _stream(tokenizer, [], ids, False) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_window_stays_small_on_long_output(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 200)
    d = IncrementalDetokenizer(tokenizer, [])
    longest = 0
    for t in ids:
        d.append(t)
        longest = max(longest, len(d._ids))
    assert d.text == tokenizer.decode(ids)
    assert longest <= 4  # O(1) work per token: the decoded window never grows with the output


# --- stop strings ---------------------------------------------------------------------------


def test_stop_spanning_tokens() -> None:
    sc = StopChecker(["\n\n", "STOP"])
    text = ""
    hits = []
    for piece in ["Hello", " ST", "O", "P and more"]:
        text += piece
        hits.append(sc.check(text, len(piece)))
    assert hits == [None, None, None, 6]
    assert text[: hits[-1]] == "Hello "


def test_earliest_stop_wins_and_old_matches_are_ignored() -> None:
    assert StopChecker(["world", "o", "lo w"]).check("hello world", 11) == 3
    assert StopChecker(["world", "o w"]).check("hello world", 1) == 6  # "o w" ended earlier
    sc = StopChecker(["ab"])
    assert sc.check("ab xx", 2) is None  # the "ab" ended before the new text
    assert sc.check("xab", 1) == 1  # ends in the new char, starts in the old text
    assert sc.check("abab", 2) == 2  # first occurrence ending in the new part
    assert sc.check("ab", 0) is None
    assert StopChecker([]).check("anything", 8) is None


def test_find_reports_the_matched_stop_string() -> None:
    sc = StopChecker(["ab", "abc", "x"])
    assert sc.find("zabc", 1) == (1, "abc")  # "ab" ended before the new "c"
    assert sc.find("zab", 1) == (1, "ab")
    assert sc.find("abcx", 1) == (3, "x")
    assert sc.find("abcx", 4) == (0, "abc")  # same start: the longer one
    assert sc.find("zz", 2) is None


def test_holdback() -> None:
    sc = StopChecker(["<|end|>", "\n\n"])
    assert sc.holdback("Hello <|en") == 4
    assert sc.holdback("Hello\n") == 1
    assert sc.holdback("Hello <") == 1
    assert sc.holdback("Hello") == 0
    assert sc.holdback("<|end") == 5
    assert sc.holdback("") == 0
    assert StopChecker([]).holdback("abc") == 0
    assert StopChecker(["aab"]).holdback("xaa") == 2  # longest prefix that is a suffix


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])
