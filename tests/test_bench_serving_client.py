"""`sageserve bench serving`'s client side, against a scripted transport (no server)."""

from __future__ import annotations

import asyncio
import json

import httpx

from sageserve.bench.serving import BenchConfig, _run_load


def _scripted(calls: list[tuple[str, str]], new_tokens: int) -> httpx.MockTransport:
    """Records every request; /generate streams `new_tokens` tokens one event each."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        events = []
        for n in range(1, new_tokens + 1):
            reason = {"type": "length"} if n == new_tokens else None
            chunk = {"output_ids": list(range(n)), "meta_info": {"finish_reason": reason}}
            events.append(f"data: {json.dumps(chunk)}\n\n")
        body = "".join(events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_every_connection_is_opened_before_the_first_timed_request() -> None:
    """One untimed GET /health per client comes before any /generate (a process's first
    request otherwise times the client's own first use of its HTTP stack); the timed
    requests are all there, each with its tokens."""
    calls: list[tuple[str, str]] = []
    config = BenchConfig(url="http://bench.test", concurrency=3, num_requests=7,
                         input_len=5, output_len=4)  # fmt: skip
    records, elapsed = asyncio.run(_run_load(config, 1000, _scripted(calls, 4)))
    assert calls[:3] == [("GET", "/health")] * 3
    assert calls[3:] == [("POST", "/generate")] * 7
    assert len(records) == 7 and elapsed > 0
    assert all(r.ok and r.output_tokens == 4 and r.ttft is not None for r in records)
