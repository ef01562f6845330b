"""`sageserve validate --url A,B`: the report's sections measured on running servers.

The first URL is the reference. Every server gets the same token ids (cut from the
Britannica text with the tokenizer of --model-path, which must be the servers' model: the
vocabulary size is checked against /get_model_info where a server has it). What differs
from the local run, and the report says so per section:
- KL comes from the top-N logprobs a server returns (`metrics.top_n_kl`, approximate);
  |Δ logprob| of the actual token, perplexity and top-1 agreement are exact;
- prompt logprobs (agreement, perplexity, MMLU) need SGLang's /generate: an OpenAI-only
  server gets the logprobs (/v1 part), determinism and throughput sections only;
- cold runs need /flush_cache; without it, later runs may hit the server's prefix cache;
- memory: what /get_server_info reports (peak memory is not visible over HTTP).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from sageserve.validate import determinism, mmlu, remote_logprobs, remote_throughput
from sageserve.validate.agreement import PREFIX_GROUP, BackendScores, Window
from sageserve.validate.config import ValidateConfig
from sageserve.validate.logprob_check import merge
from sageserve.validate.metrics import compare_top_n
from sageserve.validate.profiles import ProfileChoice
from sageserve.validate.remote_client import RemoteServer, Scored
from sageserve.validate.runner import LocalResults, Plan

NEEDS_GENERATE = ("agreement", "perplexity", "mmlu")


class RemoteRun:
    """Measures every selected section on `servers` into a LocalResults-shaped record."""

    def __init__(
        self,
        cfg: ValidateConfig,
        servers: list[RemoteServer],
        tokenizer: Any,
        profiles: dict[str, ProfileChoice],
    ) -> None:
        self.cfg, self.servers, self.tokenizer = cfg, servers, tokenizer
        self.profiles = profiles
        self.ref_scores: dict[str, Scored] = {}
        self.unsupported: dict[str, str] = {}

    def run(self, plan: Plan, text: Any) -> LocalResults:
        names = {f"{s.caps.model_name} at {s.label}" for s in self.servers}
        res = LocalResults(plan, model_source="; ".join(sorted(names)))
        self._note_unsupported()
        for server in self.servers:
            self._server_phase(server, res)
        if self.cfg.runs("throughput"):
            remote_throughput.alternate(self.cfg, self.servers, text, res)
        return res

    def _note_unsupported(self) -> None:
        no_generate = [s.label for s in self.servers if not s.caps.generate]
        if no_generate:
            for section in NEEDS_GENERATE:
                self.unsupported[section] = (
                    f"needs prompt logprobs through SGLang's /generate; {', '.join(no_generate)} "
                    "answer OpenAI's /v1 only"
                )

    def _server_phase(self, server: RemoteServer, res: LocalResults) -> None:
        cfg, plan = self.cfg, res.plan
        is_ref = server is self.servers[0]
        units = len(plan.logprob_prompts) + len(plan.windows) + len(plan.questions) + 2
        with tqdm(total=units, desc=f"validate {server.label}", file=sys.stderr) as bar:
            if cfg.runs("logprobs"):
                res.logprobs[server.label] = self._logprobs(server, plan, bar)
            if "agreement" not in self.unsupported:
                scores = res.scores.setdefault(server.label, BackendScores())
                for w in plan.windows:
                    self._score_window(server, w, is_ref, scores)
                    bar.update(1)
                if cfg.runs("agreement") and plan.prefix:
                    self._score_prefix(server, plan, is_ref, scores)
            bar.update(1)
            if plan.questions and "mmlu" not in self.unsupported:
                res.mmlu[server.label] = _mmlu_scores(server, self.tokenizer, plan, bar)
            if cfg.runs("determinism") and cfg.sizes.determinism_runs:
                res.determinism[server.label] = _determinism(server, cfg, plan)
            bar.update(1)
        res.memory[server.label] = _memory(server)

    def _logprobs(self, server: RemoteServer, plan: Plan, bar: Any) -> dict[str, Any]:
        s = self.cfg.sizes
        tols = self.cfg.thresholds.logprob_tols(self.profiles[server.label].profile)
        parts = []
        for p in plan.logprob_prompts:
            parts.append(remote_logprobs.check_prompt_remote(server, p, s.logprob_new_tokens, tols))
            bar.update(1)
        found = merge(parts)
        message = self.tokenizer.decode(plan.logprob_prompts[0]) if plan.logprob_prompts else "Hi"
        note = remote_logprobs.check_chat(server, message, s.logprob_new_tokens, found)
        apis = ["/generate", "/v1/completions"] if server.caps.generate else ["/v1/completions"]
        apis += [] if note else ["/v1/chat/completions"]
        return found.to_dict() | {"apis": apis, "notes": [note] if note else []}

    def _score_window(
        self, server: RemoteServer, w: Window, is_ref: bool, out: BackendScores
    ) -> None:
        scored = server.score(w.token_ids, self.cfg.sizes.remote_top_n, start=1)
        out.target_lp[w.key] = torch.tensor(scored.target_lp, dtype=torch.float32)
        self._compare(w.group, w.key, scored, is_ref, out)

    def _compare(
        self, group: str, key: str, scored: Scored, is_ref: bool, out: BackendScores
    ) -> None:
        if is_ref:
            self.ref_scores[key] = scored
        ref = self.ref_scores[key]
        cmp = compare_top_n(ref.top, scored.top, ref.target_lp, scored.target_lp)
        out.comparisons.setdefault(group, []).append(cmp)

    def _score_prefix(
        self, server: RemoteServer, plan: Plan, is_ref: bool, out: BackendScores
    ) -> None:
        """The suffix scored after its prefix was served once, against the reference's
        scoring of prefix + suffix from scratch (cold when the server can flush)."""
        top_n, ids, n = self.cfg.sizes.remote_top_n, plan.prefix + plan.suffix, len(plan.prefix)
        if is_ref:
            server.flush_cache()
            scratch = server.score(ids, top_n, start=1)
            self.ref_scores[PREFIX_GROUP] = Scored(
                scratch.target_lp[n - 1 :], scratch.top[n - 1 :], scratch.cached_tokens
            )
        server.flush_cache()
        server.greedy([plan.prefix], 1)
        hit = server.score(ids, top_n, start=n)
        self._compare(PREFIX_GROUP, PREFIX_GROUP, hit, False, out)
        out.cached_tokens = hit.cached_tokens


def _mmlu_scores(server: RemoteServer, tokenizer: Any, plan: Plan, bar: Any) -> torch.Tensor:
    """[questions, 4] logprob of ' A'..' D' as prompt logprobs of prompt + letter."""
    letters = [tokenizer.encode(f" {c}", add_special_tokens=False) for c in mmlu.LETTERS]
    if any(len(ids) != 1 for ids in letters):
        raise ValueError(f"the answer letters are not single tokens: {letters}")
    scores = torch.empty(len(plan.questions), 4, dtype=torch.float64)
    for qi, q in enumerate(plan.questions):
        prompt = tokenizer.encode(mmlu.format_prompt(q), add_special_tokens=False)
        for li, (letter,) in enumerate(letters):
            scored = server.score([*prompt, letter], 0, start=len(prompt))
            scores[qi, li] = scored.target_lp[0]
        bar.update(1)
    return scores


def _determinism(server: RemoteServer, cfg: ValidateConfig, plan: Plan) -> dict[str, Any]:
    """The local section's three comparisons over HTTP (cold = after /flush_cache)."""
    s = cfg.sizes

    def cold(prompts: list[list[int]]) -> list[Any]:
        server.flush_cache()
        return server.greedy(prompts, s.determinism_new_tokens)

    first = cold([plan.det_prompt])[0]
    repeats = [
        determinism.compare_outputs(first, cold([plan.det_prompt])[0])
        for _ in range(s.determinism_runs - 1)
    ]
    batched = cold([plan.det_prompt, *plan.det_others])[0]
    miss = cold([plan.det_prompt])[0]
    hit = server.greedy([plan.det_prompt], s.determinism_new_tokens)[0]
    n, batch = s.determinism_new_tokens, 1 + len(plan.det_others)
    result = determinism.result_dict(repeats, first, batched, miss, hit, n, batch)
    return result | {"cold_runs_flushed": server.caps.flush_cache}


def _memory(server: RemoteServer) -> dict[str, Any]:
    """What the server reports: ours gives weights/KV figures; SGLang its pool size."""
    info = server.caps.server_info or {}
    mem = dict(info.get("memory") or {})
    if not mem and "max_total_num_tokens" in info:
        mem["pool_capacity_tokens"] = info["max_total_num_tokens"]
    mem["attention_backend"] = info.get("attention_backend")
    return mem
