"""Section 1 against a running server: top-5 logprobs through /generate and /v1 alike.

Per prompt (token ids), greedy:
- /generate with prompt logprobs from position 0 and output logprobs: every position's
  shape and values (`logprob_check.check_entry`), the greedy token is the top-1; then the
  prompt + output scored again as a prompt: prompt positions must agree within the
  consistency tolerance, output positions (computed by decode) within the |Δ logprob| one;
- /v1/completions (logprobs=5): the same text as /generate, the same chosen-token logprobs;
- /v1/chat/completions (logprobs, top_logprobs=5) on the prompt's text: shape and order.
A server without /generate gets the two /v1 checks only (the report says so).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from sageserve.validate.logprob_check import TOP_N, LogprobFindings, check_entry
from sageserve.validate.remote_client import RemoteError, RemoteServer, _top_dict


def check_prompt_remote(
    server: RemoteServer, prompt: list[int], new_tokens: int, tols: tuple[float, float]
) -> LogprobFindings:
    """Every check of the module docstring for one prompt; tols: (consistency, |Δ logprob|)."""
    found = LogprobFindings()
    expected: dict[str, Any] | None = None
    if server.caps.generate:
        expected = _check_generate(server, prompt, new_tokens, tols, found)
    _check_completions(server, prompt, new_tokens, expected, tols[0], found)
    return found


def _check_generate(
    server: RemoteServer,
    prompt: list[int],
    n: int,
    tols: tuple[float, float],
    found: LogprobFindings,
) -> dict[str, Any]:
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": TOP_N,
    }
    answer = server.post("/generate", body)
    meta, out_ids = answer["meta_info"], list(answer["output_ids"])
    prompt_entries = _entries(meta["input_token_logprobs"], meta.get("input_top_logprobs"))
    out_entries = _entries(meta["output_token_logprobs"], meta.get("output_top_logprobs"))
    _check_positions(prompt_entries, prompt, "/generate prompt", found, skip_first=True)
    _check_positions(out_entries, out_ids, "/generate output", found, greedy=True)
    rescored = server.score(prompt + out_ids, TOP_N, start=1)
    chosen = [e and e[t] for e, t in zip(prompt_entries, prompt, strict=False)][1:]
    gap = _max_gap(chosen, rescored.target_lp[: len(prompt) - 1], "prompt", tols[0], found)
    found.max_prompt_vs_teacher_forced = max(found.max_prompt_vs_teacher_forced, gap)
    out_lp = [e and e[t] for e, t in zip(out_entries, out_ids, strict=False)]
    gap = _max_gap(out_lp, rescored.target_lp[len(prompt) - 1 :], "output", tols[1], found)
    found.max_output_vs_teacher_forced = max(found.max_output_vs_teacher_forced, gap)
    return {"text": answer["text"], "logprobs": out_lp}


def _entries(
    chosen: list[list[Any]], tops: list[list[list[Any]] | None] | None
) -> list[dict[int, float] | None]:
    """Per position the top-N {id: logprob} plus the chosen token (as the engine returns)."""
    tops = tops or [None] * len(chosen)
    out: list[dict[int, float] | None] = []
    for (lp, token, *_), top in zip(chosen, tops, strict=True):
        if lp is None:
            out.append(None)
            continue
        entry = _top_dict(top)
        entry.setdefault(int(token), lp)
        out.append(entry)
    return out


def _check_positions(
    entries: list[dict[int, float] | None],
    tokens: list[int],
    where: str,
    found: LogprobFindings,
    skip_first: bool = False,
    greedy: bool = False,
) -> None:
    if len(entries) != len(tokens):
        found.fail(f"{where}: {len(entries)} logprob positions for {len(tokens)} tokens")
        return
    for i, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        if skip_first and i == 0:
            if entry is not None:
                found.fail(f"{where} position 0 has a logprob (nothing precedes it)")
            continue
        check_entry(entry, token, TOP_N, f"{where} position {i}", found)
        if greedy and entry and entry.get(token, -math.inf) < max(entry.values()):
            found.fail(f"{where} position {i}: greedy token {token} is not the top-1")
        if skip_first:
            found.prompt_positions += 1
        else:
            found.output_positions += 1


def _max_gap(
    values: list[float | None], again: list[float], what: str, tol: float, found: LogprobFindings
) -> float:
    """Largest |value - rescored value|; a failure per position beyond `tol`."""
    gap = 0.0
    for i, (a, b) in enumerate(zip(values, again, strict=True)):
        d = abs(a - b) if a is not None and b is not None else math.inf
        if d > tol:
            found.fail(f"/generate {what} position {i}: rescoring differs by {d:.2e} (> {tol:.0e})")
        gap = max(gap, d)
    return gap


def _check_completions(
    server: RemoteServer,
    prompt: list[int],
    n: int,
    expected: dict[str, Any] | None,
    tol: float,
    found: LogprobFindings,
) -> None:
    body = server.completion_body(prompt, n) | {"logprobs": TOP_N}
    choice = server.post("/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    tokens, values, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or []
    if not len(tokens) == len(values) == len(tops) == n:
        found.fail(f"/v1/completions: {len(tokens)}/{len(values)}/{len(tops)} entries, want {n}")
        return
    for i, (value, top) in enumerate(zip(values, tops, strict=True)):
        _check_named_top(value, list(top.values()), f"/v1/completions position {i}", found)
    if expected is None:
        return
    if choice["text"] != expected["text"]:
        found.fail("/v1/completions: greedy text differs from /generate's")
    gaps = [abs(a - b) for a, b in zip(values, expected["logprobs"], strict=False) if b is not None]
    if gaps and max(gaps) > tol:
        found.fail(f"/v1/completions: logprobs differ from /generate's by {max(gaps):.2e}")


def _check_named_top(value: float, top: list[float], where: str, found: LogprobFindings) -> None:
    """An OpenAI-style position: <= TOP_N alternatives (texts may merge), sorted, greedy."""
    if not 1 <= len(top) <= TOP_N:
        found.fail(f"{where}: {len(top)} top logprobs, expected 1..{TOP_N}")
    if any(a < b for a, b in itertools.pairwise(top)):
        found.fail(f"{where}: top logprobs not sorted descending")
    if not all(math.isfinite(v) and v <= 0 for v in [value, *top]):
        found.fail(f"{where}: a logprob is not finite or > 0")
    elif top and value < max(top) - 1e-6:
        found.fail(f"{where}: the greedy token's logprob {value:.4g} < top-1 {max(top):.4g}")
    found.output_positions += 1


def check_chat(server: RemoteServer, message: str, n: int, found: LogprobFindings) -> str:
    """/v1/chat/completions with top-5 logprobs; returns a note ('' when checked)."""
    body = {
        "model": server.caps.model_name,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": n,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": TOP_N,
    }
    try:
        answer = server.post("/v1/chat/completions", body)
    except RemoteError as err:
        if "chat template" in str(err):
            return "chat: skipped, the model has no chat template"
        raise
    content = answer["choices"][0]["logprobs"]["content"]
    if len(content) != answer["usage"]["completion_tokens"]:
        found.fail(f"/v1/chat: {len(content)} logprob entries for {answer['usage']} tokens")
    for i, c in enumerate(content):
        top = [t["logprob"] for t in c["top_logprobs"]]
        _check_named_top(c["logprob"], top, f"/v1/chat position {i}", found)
    return ""
