"""Section 4: MMLU, zero-shot, scored by the logprob of the answer letters.

Each question becomes the standard zero-shot prompt ending in "Answer:"; the model's choice
is the letter among " A" .. " D" with the highest next-token logprob. The letters' logprobs
are read as prompt logprobs of prompt + letter (one request per letter, nothing generated),
in batches through the engine; the three later letters of a question reuse the first one's
prompt through the prefix cache.

For a 135M model MMLU sits near chance, so what matters is agreement with the reference
(the answer-flip rate and the KL between the 4-way option distributions), not accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.validate.data import MMLUQuestion
from sageserve.validate.metrics import kl_divergence, mcnemar_p, proportion_ci
from sageserve.validate.workload import drain

LETTERS = "ABCD"
BATCH_QUESTIONS = 16


def format_prompt(q: MMLUQuestion) -> str:
    """The standard zero-shot MMLU prompt (as in the original paper's evaluation code)."""
    subject = q.subject.replace("_", " ")
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", ""]
    lines.append(q.question)
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)]
    lines.append("Answer:")
    return "\n".join(lines)


def letter_token_ids(engine: Engine) -> list[int]:
    """The ids of " A" .. " D"; ValueError when the tokenizer splits a letter."""
    if engine.tokenizer is None:
        raise ValueError("MMLU needs a tokenizer; this model has none")
    ids = [engine.tokenizer.encode(f" {c}", add_special_tokens=False) for c in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the answer letters are not single tokens: {ids}")
    return [i[0] for i in ids]


def score_questions(
    engine: Engine, questions: list[MMLUQuestion], progress: Any = None
) -> torch.Tensor:
    """[len(questions), 4] logprob of each answer letter after each question's prompt."""
    letters = letter_token_ids(engine)
    scores = torch.empty(len(questions), 4, dtype=torch.float64)
    for start in range(0, len(questions), BATCH_QUESTIONS):
        batch = questions[start : start + BATCH_QUESTIONS]
        prompts = [engine.tokenize(format_prompt(q)) for q in batch]
        # The first letter alone warms the prefix cache; the other three then hit it.
        for group in ([0], [1, 2, 3]):
            _score_letters(engine, prompts, letters, group, scores[start : start + len(batch)])
        if progress is not None:
            progress.update(len(batch))
    return scores


def _score_letters(
    engine: Engine,
    prompts: list[list[int]],
    letters: list[int],
    which: list[int],
    out: torch.Tensor,
) -> None:
    ids, where = [], []
    for qi, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=0, logprob_start_len=len(prompt))
        for li in which:
            ids.append(engine.add_request([*prompt, letters[li]], params, stream=False))
            where.append((qi, li, len(prompt)))
    for (qi, li, n), res in zip(where, drain(engine, ids), strict=True):
        out[qi, li] = res.prompt_logprobs[n][letters[li]]


def mmlu_results(
    scores: dict[str, torch.Tensor],
    questions: list[MMLUQuestion],
    reference: str,
    confidence: float,
    floor_of: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per backend: accuracy (Wilson CI); against the reference: flip rate, option KL, and
    McNemar's exact test on the questions only one of the two answered correctly; the same
    against its dtype floor ("vs_floor") for a label in `floor_of` (floors.py)."""
    answers = torch.tensor([q.answer for q in questions])
    n = len(questions)
    out: dict[str, dict[str, Any]] = {}
    for label, s in scores.items():
        correct = int((s.argmax(dim=1) == answers).sum())
        row: dict[str, Any] = {
            "questions": n,
            "accuracy": correct / n,
            "accuracy_ci": list(proportion_ci(correct, n, confidence)),
        }
        if label != reference:
            row |= _against(scores[reference], s, answers, confidence)
        if floor := (floor_of or {}).get(label):
            row |= {"floor": floor, "vs_floor": _against(scores[floor], s, answers, confidence)}
        out[label] = row
    return out


def _against(
    base: torch.Tensor, test: torch.Tensor, answers: torch.Tensor, confidence: float
) -> dict[str, Any]:
    """test's answers against base's: base, test: [n, 4] option scores; answers: [n]."""
    base_pred, pred, n = base.argmax(dim=1), test.argmax(dim=1), len(answers)
    flips = int((pred != base_pred).sum())
    base_only = int(((base_pred == answers) & (pred != answers)).sum())
    test_only = int(((base_pred != answers) & (pred == answers)).sum())
    return {
        "flips": flips,
        "flip_rate": flips / n,
        "flip_rate_ci": list(proportion_ci(flips, n, confidence)),
        "mean_option_kl": kl_divergence(base.log_softmax(dim=1), test.log_softmax(dim=1))
        .mean()
        .item(),
        "reference_only_correct": base_only,
        "only_correct_here": test_only,
        "mcnemar_p": mcnemar_p(base_only, test_only),
    }
