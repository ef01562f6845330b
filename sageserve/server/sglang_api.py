"""SGLang's native routes.

/generate, /abort_request, /flush_cache (also as vLLM's /reset_prefix_cache), /model_info and
/server_info (also under their older names /get_model_info and /get_server_info).
"""

from __future__ import annotations

import platform
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sageserve import __version__
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.server.args import ServerArgs
from sageserve.server.disconnect import CLIENT_CLOSED_REQUEST, finals_unless_disconnected
from sageserve.server.engine_loop import EngineLoop, OutputStream, streamable_text
from sageserve.server.model_files import ModelFiles
from sageserve.server.protocol import (
    SSE_DONE,
    AbortRequest,
    APIError,
    EventStreamResponse,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    GenerateSamplingParams,
    LogprobEntry,
    MetaInfo,
    bad_request,
    make_sampling_params,
    sse,
)


def build_router(
    engine_loop: EngineLoop, server_args: ServerArgs, model_files: ModelFiles
) -> APIRouter:
    """The SGLang-compatible routes over `engine_loop`."""
    router = APIRouter()

    @router.post(
        "/generate",
        response_model=GenerateResponse | list[GenerateResponse],
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """SGLang's /generate: one prompt or a batch, `n` samples each, optionally streamed.

        A batch, or n > 1, answers with a list: prompt i's samples at i * n ... i * n + n - 1.
        """
        prompts = body.prompts()
        params, n = _sampling_params(body, len(prompts))
        prompts = [p for p in prompts for _ in range(n)]
        stream = await engine_loop.submit(prompts, params, _request_ids(body, len(prompts), n))
        formatter = _Formatter(engine_loop, body, params)
        listed = body.is_batch or n > 1
        if body.stream:
            return EventStreamResponse(_events(stream, formatter, listed))
        finals = await finals_unless_disconnected(stream, request)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        responses = [formatter.response(i, out) for i, out in enumerate(finals)]
        return responses if listed else responses[0]

    @router.post("/abort_request")
    async def abort_request(body: AbortRequest) -> dict[str, Any]:
        """Abort a request by its rid; its own call ends with finish_reason "abort"."""
        if not engine_loop.abort(body.rid):
            raise APIError(404, f"no request with rid {body.rid!r} is in flight", "not_found_error")
        return {"rid": body.rid, "aborted": True}

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    @router.post("/reset_prefix_cache")  # vLLM's name
    async def flush_cache() -> dict[str, Any]:
        """Empty the prefix cache; 400 while requests are in flight (as SGLang)."""
        await engine_loop.flush_cache()
        return {"flushed": True}

    @router.get("/model_info")
    @router.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        """The model: a path `--model-path` loads, a tokenizer directory, its sizes."""
        info = engine_loop.info
        return {
            "model_path": model_files.model_path,
            "tokenizer_path": model_files.tokenizer_path(),
            "model_source": info.model_source,
            "served_model_name": server_args.served_model_name,
            "is_generation": True,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "context_length": info.context_length,
            "vocab_size": info.vocab_size,
            "dtype": info.dtype,
        }

    @router.get("/server_info")
    @router.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        """Engine settings (backend, KV dtype, pool), live counters and versions."""
        server = {k: v for k, v in asdict(server_args).items() if k != "api_key"}
        return {
            **server,
            **asdict(engine_loop.info),
            **asdict(engine_loop.stats),
            "version": __version__,
            "versions": _versions(),
        }

    return router


def _sampling_params(body: GenerateRequest, num_prompts: int) -> tuple[list[SamplingParams], int]:
    """Engine params for every sample (n per prompt; with a seed, sample j uses seed + j)."""
    if num_prompts == 0:
        raise bad_request("the batch is empty: give at least one prompt", "text")
    given = body.sampling_params
    if isinstance(given, list) and len(given) != num_prompts:
        raise bad_request(
            f"got {len(given)} sampling_params for {num_prompts} prompts", "sampling_params"
        )
    per_prompt = given if isinstance(given, list) else [given] * num_prompts
    n = _one_n(per_prompt)
    logprobs = _logprob_fields(body)
    params = []
    for sp in per_prompt:
        fields = sp.engine_fields()
        seed = fields.pop("seed", None)
        for j in range(n):
            fields["seed"] = None if seed is None else seed + j
            params.append(make_sampling_params("sampling_params", **fields, **logprobs))
    return params, n


def _one_n(per_prompt: list[GenerateSamplingParams]) -> int:
    ns = {sp.n or 1 for sp in per_prompt}
    if len(ns) > 1:
        raise bad_request("every prompt of a batch must ask for the same n", "sampling_params")
    return ns.pop()


def _logprob_fields(body: GenerateRequest) -> dict[str, Any]:
    """return_logprob / logprob_start_len / top_logprobs_num as SamplingParams fields."""
    if not body.return_logprob:
        return {}
    start = body.logprob_start_len
    if start < -1:
        raise bad_request(
            f"logprob_start_len={start} is invalid: -1 (output tokens only) or >= 0",
            "logprob_start_len",
        )
    fields: dict[str, Any] = {"logprobs": body.top_logprobs_num}
    if start >= 0:
        fields.update(prompt_logprobs=body.top_logprobs_num, logprob_start_len=start)
    return fields


def _request_ids(body: GenerateRequest, num_samples: int, n: int) -> list[str | None]:
    rid = body.rid
    if rid is None:
        return [None] * num_samples
    if n > 1:
        raise bad_request("rid cannot be combined with n > 1: each sample needs its own id", "rid")
    if body.is_batch != isinstance(rid, list) or (
        isinstance(rid, list) and len(rid) != num_samples
    ):
        raise bad_request("rid must be one string per prompt: a list for a batch", "rid")
    return list(rid) if isinstance(rid, list) else [rid]


async def _events(stream: OutputStream, formatter: _Formatter, listed: bool) -> AsyncIterator[str]:
    """SGLang's stream: cumulative text and meta_info per update, then [DONE]; the chunks of
    a batch (or of n > 1) carry the index of their sample."""
    with closing(stream):
        async for index, out in stream:
            chunk = formatter.response(index, out)
            if listed:
                chunk.index = index
            yield sse(chunk)
    yield SSE_DONE


class _Formatter:
    """RequestOutput -> SGLang's response (text, output_ids, meta_info)."""

    def __init__(
        self, engine_loop: EngineLoop, body: GenerateRequest, params: list[SamplingParams]
    ) -> None:
        self.loop = engine_loop
        self.body = body
        self.params = params

    def response(self, index: int, out: RequestOutput) -> GenerateResponse:
        """The response for prompt `index`; its text withholds a possible stop-string start."""
        return GenerateResponse(
            text=streamable_text(out, self.params[index].stop),
            output_ids=out.token_ids,
            meta_info=self.meta_info(out),
        )

    def meta_info(self, out: RequestOutput) -> MetaInfo:
        meta = MetaInfo(
            id=out.request_id,
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_completion_tokens,
            cached_tokens=out.num_cached_tokens,
            finish_reason=_finish_reason(out),
            e2e_latency=out.metrics.latency,
        )
        if self.body.return_logprob:
            self._add_logprobs(meta, out)
        return meta

    def _add_logprobs(self, meta: MetaInfo, out: RequestOutput) -> None:
        top_n = self.body.top_logprobs_num
        outputs = list(zip(out.token_ids, out.logprobs or [], strict=False))
        meta.output_token_logprobs = [self._entry(d[t], t) for t, d in outputs]
        start = self.body.logprob_start_len
        prompt = list(enumerate(out.prompt_token_ids))[start:] if start >= 0 else []
        pl = out.prompt_logprobs or [None] * out.num_prompt_tokens
        meta.input_token_logprobs = [self._entry(pl[j] and pl[j][t], t) for j, t in prompt]
        if top_n > 0:
            meta.output_top_logprobs = [self._top(d, top_n) for _, d in outputs]
            meta.input_top_logprobs = [self._top(pl[j], top_n) for j, _ in prompt]

    def _entry(self, logprob: float | None, token_id: int) -> LogprobEntry:
        text = self.loop.token_text(token_id) if self.body.return_text_in_logprobs else None
        return (logprob, token_id, text)

    def _top(self, logprobs: dict[int, float] | None, n: int) -> list[LogprobEntry] | None:
        if logprobs is None:
            return None
        best = sorted(logprobs.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [self._entry(lp, t) for t, lp in best]


def _finish_reason(out: RequestOutput) -> FinishReason | None:
    if not out.finished:
        return None
    reason = FinishReason(type=out.finish_reason, message=out.finish_message)
    if out.stop_reason is not None:
        reason.matched = out.stop_reason
    return reason


def _versions() -> dict[str, str]:
    import fastapi
    import pydantic
    import torch
    import transformers

    return {
        "sageserve": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastapi": fastapi.__version__,
        "pydantic": pydantic.__version__,
    }
