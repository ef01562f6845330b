"""A running server as `sageserve validate --url` sees it: SGLang's /generate or OpenAI's /v1.

`RemoteServer.probe` finds out which APIs a server speaks: SGLang's native `/generate`
(prompt logprobs, token ids: every section), `/flush_cache` (cold runs), `/get_server_info`
(pool figures), and OpenAI's `/v1/completions` (always needed). Prompts go as token ids
everywhere, so every server sees exactly the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

API_CHOICES = ("auto", "sglang", "openai")


class RemoteError(RuntimeError):
    """A request to a remote server failed (transport error or a non-200 answer)."""


@dataclass
class Scored:
    """Teacher-forced scoring of token_ids[start:] by a server.

    target_lp: [k] log p of each scored token given the tokens before it (exact, as served);
    top: per scored position, the top-N {token_id: logprob}, best first; cached_tokens: the
    prompt tokens the server took from its prefix cache (None if it does not say).
    """

    target_lp: list[float]
    top: list[dict[int, float]]
    cached_tokens: int | None


@dataclass
class Greedy:
    """A greedy continuation: its tokens (ids, or texts from /v1) and their logprobs.

    `token_ids`, `logprobs` (one {token: logprob} per position) and `num_cached_tokens` are
    named as in RequestOutput so `determinism.compare_outputs` takes either.
    """

    token_ids: list[int] | list[str]
    logprobs: list[dict[Any, float]]
    num_cached_tokens: int


@dataclass
class Capabilities:
    generate: bool = False
    flush_cache: bool = False
    server_info: dict[str, Any] | None = None
    model_info: dict[str, Any] | None = None
    model_name: str | None = None


class RemoteServer:
    """One server under validation; `label` is its URL."""

    def __init__(self, url: str, api: str = "auto", api_key: str | None = None) -> None:
        if api not in API_CHOICES:
            raise ValueError(f"unknown --remote-api {api!r}; choose one of: {API_CHOICES}")
        self.label = url.rstrip("/")
        self.api = api
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(1800.0, connect=30.0)
        self.http = httpx.Client(base_url=self.label, headers=headers, timeout=timeout)
        self.caps = Capabilities()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ transport

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """The JSON answer; RemoteError naming the server, path and status otherwise."""
        try:
            r = self.http.post(path, json=body)
        except httpx.HTTPError as err:
            raise RemoteError(f"{self.label}{path}: {type(err).__name__}: {err}") from err
        if r.status_code != 200:
            raise RemoteError(f"{self.label}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _get_json(self, path: str) -> dict[str, Any] | None:
        try:
            r = self.http.get(path)
        except httpx.HTTPError as err:
            raise RemoteError(f"{self.label}{path}: {type(err).__name__}: {err}") from err
        return r.json() if r.status_code == 200 else None

    # --------------------------------------------------------------------- probing

    def probe(self) -> Capabilities:
        """Which APIs answer; ValueError when the server is unreachable or has no /v1."""
        try:
            models = self._get_json("/v1/models")
        except RemoteError as err:
            raise ValueError(f"cannot reach {self.label}: {err}") from None
        if not models or not models.get("data"):
            raise ValueError(f"{self.label} has no OpenAI-compatible /v1/models")
        caps = self.caps
        caps.model_name = models["data"][0]["id"]
        caps.generate = self.api != "openai" and self._answers_generate()
        if self.api == "sglang" and not caps.generate:
            raise ValueError(f"{self.label} does not answer SGLang's /generate")
        if caps.generate:
            caps.server_info = self._get_json("/get_server_info")
            caps.model_info = self._get_json("/get_model_info")
            caps.flush_cache = self._flush_answers()
        return caps

    def _answers_generate(self) -> bool:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
        try:
            self.post("/generate", body)
        except RemoteError:
            return False
        return True

    def _flush_answers(self) -> bool:
        try:
            r = self.http.post("/flush_cache")
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def flush_cache(self) -> bool:
        """Empty the server's prefix cache; False when it has no /flush_cache."""
        if not self.caps.flush_cache:
            return False
        self.post("/flush_cache", {})
        return True

    # -------------------------------------------------------------------- requests

    def score(self, token_ids: list[int], top_n: int, start: int = 1) -> Scored:
        """Prompt logprobs of token_ids[start:] (start >= 1) through /generate."""
        if not self.caps.generate:
            raise RemoteError(f"{self.label}: scoring prompt tokens needs SGLang's /generate")
        body = {
            "input_ids": token_ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
            "top_logprobs_num": top_n,
        }
        meta = self.post("/generate", body)["meta_info"]
        lps = [e[0] for e in meta["input_token_logprobs"]]
        tops = [_top_dict(entries) for entries in meta.get("input_top_logprobs") or []]
        if len(lps) != len(token_ids) - start or (top_n and len(tops) != len(lps)):
            raise RemoteError(
                f"{self.label}: asked for {len(token_ids) - start} prompt logprobs, got "
                f"{len(lps)} values and {len(tops)} top lists"
            )
        return Scored(lps, tops, meta.get("cached_tokens"))

    def greedy(self, prompts: list[list[int]], new_tokens: int, top_n: int = 1) -> list[Greedy]:
        """Greedy continuations of several prompts sent as one batch, EOS ignored."""
        if self.caps.generate:
            return self._greedy_generate(prompts, new_tokens, top_n)
        return self._greedy_completions(prompts, new_tokens, top_n)

    def _greedy_generate(self, prompts: list[list[int]], n: int, top_n: int) -> list[Greedy]:
        body = {
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
            "return_logprob": True,
            "top_logprobs_num": top_n,
        }
        outs = []
        for answer in self.post("/generate", body):
            meta = answer["meta_info"]
            ids = list(answer["output_ids"])
            chosen = [{e[1]: e[0]} for e in meta["output_token_logprobs"]]
            outs.append(Greedy(ids, chosen, meta.get("cached_tokens") or 0))
        return outs

    def _greedy_completions(self, prompts: list[list[int]], n: int, top_n: int) -> list[Greedy]:
        body = self.completion_body(prompts, n) | {"logprobs": max(top_n, 1)}
        choices = sorted(self.post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        outs = []
        for c in choices:
            lp = c["logprobs"]
            chosen = [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"], strict=True)]
            outs.append(Greedy(list(lp["tokens"]), chosen, 0))
        return outs

    def completion_body(self, prompts: list[list[int]] | list[int], n: int) -> dict[str, Any]:
        """A greedy /v1/completions body over token-id prompts, EOS ignored."""
        return {
            "model": self.caps.model_name,
            "prompt": prompts,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,  # vLLM's and SGLang's extension, as ours
        }


def _top_dict(entries: list[list[Any]] | None) -> dict[int, float]:
    """SGLang's [[logprob, token_id, text], ...] -> {token_id: logprob}, best first."""
    if entries is None:
        return {}
    return {int(e[1]): (e[0] if e[0] is not None else -math.inf) for e in entries}
