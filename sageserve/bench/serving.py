"""`sageserve bench serving`: load a running server and measure it from the client's side.

N clients each stream one `/generate` request after another (random prompt token ids, EOS
ignored) until the duration or the request count is reached; requests in flight then run
to their end. Before the clock starts, each client's connection is opened with an untimed
GET /health (see `_warm_connections`). Per request::

    send ──── first token ──── token ── token ── ... ── [DONE]
         TTFT             ITL        ITL                e2e = send -> [DONE]

An event that brings k tokens at once counts its gap as k inter-token latencies of gap / k.
An error is a non-200 answer, a broken stream (no [DONE], a transport error, malformed
data) or a request that ended aborted. The exit code is 1 if any request failed.

Against a sageserve server the result also holds the server's own step timings over the run
(`server_steps`: /metrics scraped before and after), which tell whether the long gaps were
long steps and whether those waited for the device.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sageserve.bench import server_steps

PERCENTILES = (50, 90, 95, 99, 99.9)
# Prompt token ids are drawn from [ID_LOW, vocab_size - ID_LOW): clear of the special tokens
# tokenizers put at either end of the vocabulary.
ID_LOW = 100
IDLE_WAIT_S = 10.0
FIRST_TTFTS = 8


@dataclass(frozen=True)
class BenchConfig:
    """What one run does; validates itself."""

    url: str
    concurrency: int = 8
    duration_s: float | None = None
    num_requests: int | None = None
    input_len: int = 128
    output_len: int = 64
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("give --duration or --num-requests (or both)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """One request as the client saw it (seconds, time.perf_counter)."""

    ok: bool = False
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0


# ------------------------------------------------------------------------ one request


class _StreamState:
    """Progress of one streamed /generate response."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.tokens = 0
        self.last = record.start
        self.finish: str | None = None
        self.done = False

    def on_data(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise ValueError(f"error event: {chunk['error']}")
        tokens = len(chunk["output_ids"])
        reason = chunk["meta_info"].get("finish_reason")
        self.finish = reason["type"] if reason else None
        self._on_tokens(tokens - self.tokens, now)
        self.tokens = max(self.tokens, tokens)

    def _on_tokens(self, new: int, now: float) -> None:
        if new <= 0:
            return
        record = self.record
        if record.ttft is None:
            record.ttft = now - record.start
            new -= 1
        record.itls.extend([(now - self.last) / max(new, 1)] * new)
        self.last = now


async def stream_generate(
    client: httpx.AsyncClient, body: dict[str, Any], record: RequestRecord
) -> None:
    """Stream one /generate request into `record` (errors are recorded, not raised)."""
    record.start = time.perf_counter()
    state = _StreamState(record)
    try:
        async with client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    state.on_data(line.removeprefix("data: "), time.perf_counter())
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        record.error = f"{type(err).__name__}: {err}"
        return
    finally:
        record.end = time.perf_counter()
        record.output_tokens = state.tokens
    record.error = _stream_problem(state)
    record.ok = record.error is None


def _stream_problem(state: _StreamState) -> str | None:
    if not state.done:
        return "the stream ended without [DONE]"
    if state.finish is None or state.finish == "abort":
        return f"the request ended with finish_reason {state.finish!r}"
    return None


# --------------------------------------------------------------------------- the load


class _Load:
    """Hands out request bodies to the clients until the duration or count is reached."""

    def __init__(self, config: BenchConfig, vocab_size: int) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.high = max(vocab_size - ID_LOW, ID_LOW + 1)
        self.issued = 0
        self.deadline: float | None = None

    def start(self) -> None:
        if self.config.duration_s is not None:
            self.deadline = time.perf_counter() + self.config.duration_s

    def next_body(self) -> dict[str, Any] | None:
        """The next request, or None once the run is over."""
        limit = self.config.num_requests
        if limit is not None and self.issued >= limit:
            return None
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        self.issued += 1
        ids = [self.rng.randrange(ID_LOW, self.high) for _ in range(self.config.input_len)]
        params = {"temperature": 0, "max_new_tokens": self.config.output_len, "ignore_eos": True}
        return {"input_ids": ids, "sampling_params": params, "stream": True}


async def _client(http: httpx.AsyncClient, load: _Load, records: list[RequestRecord]) -> None:
    while (body := load.next_body()) is not None:
        record = RequestRecord()
        records.append(record)
        await stream_generate(http, body, record)


async def _run_load(
    config: BenchConfig, vocab_size: int, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[list[RequestRecord], float]:
    """Every request's record, and the seconds from the first send to the last answer.
    transport: None for the network (tests pass their own)."""
    limits = httpx.Limits(max_connections=config.concurrency + 4)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    records: list[RequestRecord] = []
    load = _Load(config, vocab_size)
    async with httpx.AsyncClient(
        base_url=config.url, headers=config.headers, limits=limits, timeout=timeout,
        transport=transport,
    ) as http:  # fmt: skip
        await _warm_connections(http, config.concurrency)
        start = time.perf_counter()
        load.start()
        await asyncio.gather(*(_client(http, load, records) for _ in range(config.concurrency)))
        elapsed = time.perf_counter() - start
    return records, elapsed


async def _warm_connections(http: httpx.AsyncClient, count: int) -> None:
    """Open the clients' connections with one untimed GET /health each, before the clock.

    A process's first request through httpx pays its own first use of the HTTP stack: on
    the GPU machine (H100, 2026-12-05) the first timed request of each bench process took
    102-146 ms where the server's own TTFT for it was ~30 ms (its /metrics). Timed cold, the
    first request's TTFT measured the client, not the server."""
    answers = await asyncio.gather(*(http.get("/health") for _ in range(count)))
    for answer in answers:
        await answer.aclose()


# ------------------------------------------------------------------------- the report


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _distribution(values: list[float]) -> dict[str, float | None]:
    stats: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    stats["max"] = max(values) if values else None
    stats["mean"] = sum(values) / len(values) if values else None
    return stats


def summarize(records: list[RequestRecord], elapsed_s: float) -> dict[str, Any]:
    """Throughputs, latency percentiles (seconds) and errors of a run."""
    done = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    tokens = sum(r.output_tokens for r in done)
    return {
        "elapsed_s": elapsed_s,
        "requests_completed": len(done),
        "errors": len(errors),
        "error_examples": sorted(set(e or "" for e in errors))[:5],
        "request_throughput_per_s": len(done) / elapsed_s if elapsed_s > 0 else 0.0,
        "generated_tokens": tokens,
        "output_token_throughput_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "ttft_s": _distribution([r.ttft for r in done if r.ttft is not None]),
        # the first requests sent, in sending order: do they wait for kernels to compile?
        "first_ttfts_s": [r.ttft for r in sorted(records, key=lambda r: r.start)[:FIRST_TTFTS]],
        "itl_s": _distribution([x for r in done for x in r.itls]),
        "e2e_latency_s": _distribution([r.end - r.start for r in done]),
    }


def _format_ms(stats: dict[str, float | None]) -> str:
    return "  ".join(
        f"{k}={v * 1000:.1f}ms" if v is not None else f"{k}=n/a" for k, v in stats.items()
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines."""
    return "\n".join(
        [
            f"requests: {summary['requests_completed']} completed, {summary['errors']} errors "
            f"in {summary['elapsed_s']:.1f} s",
            f"request throughput: {summary['request_throughput_per_s']:.2f} req/s",
            f"generated-token throughput: {summary['output_token_throughput_per_s']:.1f} tok/s",
            f"TTFT: {_format_ms(summary['ttft_s'])}",
            "first TTFTs: " + " ".join(f"{t * 1e3:.0f}ms" for t in summary["first_ttfts_s"] if t),
            f"ITL:  {_format_ms(summary['itl_s'])}",
            f"e2e:  {_format_ms(summary['e2e_latency_s'])}",
            *(f"error: {e}" for e in summary["error_examples"]),
        ]
    )


def _machine() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------ the server


def _server_info(config: BenchConfig) -> dict[str, Any]:
    response = httpx.get(f"{config.url}/get_server_info", headers=config.headers, timeout=30)
    if response.status_code != 200:
        raise ValueError(
            f"GET {config.url}/get_server_info answered {response.status_code}: "
            f"{response.text[:200]}"
        )
    return response.json()


def _pool_after(config: BenchConfig) -> dict[str, Any]:
    """The KV pool once the server is idle again (waits up to IDLE_WAIT_S seconds)."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        info = _server_info(config)
        idle = info["num_running"] == 0 and info["num_waiting"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    keys = ("num_running", "num_waiting", "num_free_pages", "num_usable_pages")
    pool = {k: info[k] for k in keys}
    pool["pages_leaked"] = info["num_usable_pages"] - info["num_free_pages"] if idle else None
    return pool


# ---------------------------------------------------------------------------- the CLI


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `sageserve bench serving`."""
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to send new requests for"
    )
    parser.add_argument("--num-requests", type=int, default=None, help="requests to send in all")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument(
        "--output-len", type=int, default=64, help="tokens generated per request (EOS ignored)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from the parsed flags; ValueError on bad values."""
    return BenchConfig(
        url=args.url.rstrip("/"),
        concurrency=args.concurrency,
        duration_s=args.duration,
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        api_key=args.api_key,
        timeout_s=args.timeout,
    )


def _command(config: BenchConfig) -> str:
    """The command line that repeats this run (the API key left out)."""
    flags = {
        "--url": config.url,
        "--concurrency": config.concurrency,
        "--duration": config.duration_s,
        "--num-requests": config.num_requests,
        "--input-len": config.input_len,
        "--output-len": config.output_len,
        "--seed": config.seed,
        "--timeout": config.timeout_s,
    }
    words = ["sageserve", "bench", "serving"]
    for flag, value in flags.items():
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run the load against the server; the whole result (as written by --out)."""
    server = _server_info(config)
    steps_before = server_steps.scrape(config.url, config.headers)
    records, elapsed = asyncio.run(_run_load(config, int(server["vocab_size"])))
    settings = {k: v for k, v in asdict(config).items() if k != "api_key"}
    settings["api_key"] = "<given>" if config.api_key else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": _command(config),
        "machine": _machine(),
        "url": config.url,
        "settings": settings,
        "server_info": server,
        "results": summarize(records, elapsed),
        "kv_pool_after": _pool_after(config),
        **_steps_over_run(config, steps_before),
    }


def _steps_over_run(config: BenchConfig, before: server_steps.Samples | None) -> dict:
    """The server's step timings over the run, by kind, and its garbage collections, by
    process and generation (None: the server reports none)."""
    after = server_steps.scrape(config.url, config.headers)
    if before is None or after is None:
        return {"server_steps": None, "server_gc": None}
    return {
        "server_steps": server_steps.step_summary(before, after),
        "server_gc": server_steps.gc_summary(before, after),
    }


def run(args: argparse.Namespace) -> int:
    """`sageserve bench serving`: print a summary, write --out; 1 if any request failed."""
    result = run_benchmark(config_from_args(args))
    print(format_summary(result["results"]))
    print(server_steps.format_steps(result["server_steps"]))
    print(server_steps.format_gc(result["server_gc"]))
    pool = result["kv_pool_after"]
    print(f"KV pool after: {pool['num_free_pages']}/{pool['num_usable_pages']} pages free")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    summary = result["results"]
    return 1 if summary["errors"] or not summary["requests_completed"] else 0
