"""Section 5 against running servers: the local grid, timed from the client over HTTP.

Each case sends `concurrency` streamed greedy requests at once (EOS ignored) and times each
from send to its first token (TTFT) and to its end; servers are alternated over rounds
(A, B, A, B, ...). SGLang's /generate stream is used where a server has it, OpenAI's
/v1/completions stream (one token per event) otherwise. Servers that share one machine
share its compute: run them one at a time, or read the figures as a comparison under
shared load.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

import httpx
from tqdm.auto import tqdm

from sageserve.bench.serving import RequestRecord, stream_generate
from sageserve.validate import throughput
from sageserve.validate.config import ValidateConfig
from sageserve.validate.remote_client import RemoteServer
from sageserve.validate.runner import LocalResults
from sageserve.validate.workload import TextSource


def alternate(
    cfg: ValidateConfig, servers: list[RemoteServer], text: TextSource, res: LocalResults
) -> None:
    """Every case for every server, rounds alternating the servers; into res.throughput."""
    s = cfg.sizes
    grid = throughput.cases(
        s.throughput_input_lens, s.throughput_output_lens, s.throughput_concurrency
    )
    total = s.throughput_repeats * len(servers) * len(grid)
    with tqdm(total=total, desc="validate throughput", file=sys.stderr) as bar:
        for r in range(s.throughput_repeats):
            for server in servers:
                for i, case in enumerate(grid):
                    bar.set_postfix_str(f"{server.label} {case.key}")
                    prompts = [
                        text.cycled((r * 31 + i) * 4099 + j * case.input_len, case.input_len)
                        for j in range(case.concurrency)
                    ]
                    run = asyncio.run(_time_case(server, prompts, case.output_len))
                    res.throughput.setdefault(server.label, {}).setdefault(case.key, []).append(run)
                    bar.update(1)


async def _time_case(
    server: RemoteServer, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    """The local section's figures for one case, measured by the client."""
    records = [RequestRecord() for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(
        base_url=server.label, headers=dict(server.http.headers), limits=limits, timeout=1800.0
    ) as http:
        start = time.perf_counter()
        pairs = zip(prompts, records, strict=True)
        await asyncio.gather(*(_one(server, http, p, new_tokens, rec) for p, rec in pairs))
        wall = time.perf_counter() - start
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{server.label}: {len(failed)} throughput requests failed: {failed[0]}")
    return _figures(records, wall, sum(len(p) for p in prompts))


async def _one(
    server: RemoteServer,
    http: httpx.AsyncClient,
    prompt: list[int],
    new_tokens: int,
    record: RequestRecord,
) -> None:
    if server.caps.generate:
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        body = {"input_ids": prompt, "sampling_params": params, "stream": True}
        await stream_generate(http, body, record)
    else:
        body = server.completion_body(prompt, new_tokens) | {"stream": True}
        await _stream_completion(http, body, record)


async def _stream_completion(
    http: httpx.AsyncClient, body: dict[str, Any], record: RequestRecord
) -> None:
    """Stream /v1/completions into `record`; each event with text is one token."""
    record.start = time.perf_counter()
    done = False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                elif line.startswith("data: ") and json.loads(data)["choices"]:
                    _on_token(record)
    except (httpx.HTTPError, ValueError, KeyError) as err:
        record.error = f"{type(err).__name__}: {err}"
        return
    finally:
        record.end = time.perf_counter()
    record.ok = done
    record.error = None if done else "the stream ended without [DONE]"


def _on_token(record: RequestRecord) -> None:
    now = time.perf_counter()
    if record.ttft is None:
        record.ttft = now - record.start
    record.output_tokens += 1


def _figures(records: list[RequestRecord], wall: float, prompt_tokens: int) -> dict[str, float]:
    out_tokens = sum(r.output_tokens for r in records)
    rates = [
        (r.output_tokens - 1) / (r.end - r.start - r.ttft)
        for r in records
        if r.ttft is not None and r.output_tokens > 1 and r.end - r.start > r.ttft
    ]
    return {
        "ttft_s": statistics.fmean(r.ttft or 0.0 for r in records),
        "decode_tok_s_per_request": statistics.fmean(rates) if rates else float("nan"),
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + prompt_tokens) / wall,
        "wall_s": wall,
    }
