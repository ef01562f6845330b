"""GET /metrics and `sageserve bench serving` against a real server process (SmolLM2, CPU).

One server for the module (launching costs ~10 s); the tests run in file order and read
counter deltas, so they do not depend on what ran before them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, launched

from sageserve.cli import main as cli_main

API_KEY = "metrics-test-key"
MODEL = "smollm2-135m-instruct"
PROMPT_LENS = (5, 9, 17)
MAX_NEW_TOKENS = 6

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Server:
    """A launch_server process, its URL and its log."""

    def __init__(self, proc: ServerProcess) -> None:
        self.url = proc.url
        self.process = proc.process
        self.log = proc.log
        headers = {"Authorization": f"Bearer {API_KEY}"}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def metrics(self) -> Samples:
        """Every sample of /metrics (without the API key: --metrics-public), by name and labels."""
        response = httpx.get(f"{self.url}/metrics", timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }

    def generate(self, prompt_len: int, stream: bool) -> httpx.Response:
        body = {
            "input_ids": list(range(1000, 1000 + prompt_len)),
            "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True},
            "stream": stream,
        }
        return self.client.post("/generate", json=body)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    flags = [
        *("--api-key", API_KEY, "--metrics-public", "--max-total-tokens", "4096"),
        *("--device", "cpu", "--dtype", "float32", "--context-length", "1024"),
    ]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        yield Server(proc)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _wait_idle(server: Server, timeout: float = 30) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        busy = _value(samples, "sageserve_num_requests_running") + _value(
            samples, "sageserve_num_requests_waiting"
        )
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


# ------------------------------------------------------------------------------ /metrics


def test_metrics_count_requests_and_tokens(server: Server) -> None:
    before = server.metrics()
    for i, n in enumerate(PROMPT_LENS):
        response = server.generate(n, stream=i % 2 == 1)
        assert response.status_code == 200, response.text
    after = _wait_idle(server)
    num = len(PROMPT_LENS)
    assert _delta(before, after, "sageserve_requests_total", finish_reason="length") == num
    assert _delta(before, after, "sageserve_prompt_tokens_total") == sum(PROMPT_LENS)
    assert _delta(before, after, "sageserve_generation_tokens_total") == num * MAX_NEW_TOKENS
    ttft = "sageserve_time_to_first_token_seconds_count"
    assert _delta(before, after, ttft) == num
    itl = "sageserve_inter_token_latency_seconds_count"
    assert _delta(before, after, itl) == num * (MAX_NEW_TOKENS - 1)
    assert _delta(before, after, "sageserve_e2e_request_latency_seconds_count") == num
    assert _delta(before, after, "sageserve_e2e_request_latency_seconds_sum") > 0
    inf = _delta(before, after, "sageserve_e2e_request_latency_seconds_bucket", le="+Inf")
    assert inf == num
    # Requests one at a time: each has a prefill step and decode steps, none mixed.
    steps = "sageserve_step_duration_seconds_count"
    assert _delta(before, after, steps, kind="prefill") >= num
    assert _delta(before, after, steps, kind="decode") >= num * (MAX_NEW_TOKENS - 1)
    assert _delta(before, after, steps, kind="mixed") == 0
    wall = _delta(before, after, "sageserve_step_duration_seconds_sum", kind="decode")
    wait = _delta(before, after, "sageserve_step_device_wait_seconds_sum", kind="decode")
    assert 0 <= wait <= wall


def test_metrics_pool_gauges_return_to_zero_when_idle(server: Server) -> None:
    samples = _wait_idle(server)
    info = server.client.get("/get_server_info").raise_for_status().json()
    assert _value(samples, "sageserve_num_requests_running") == 0
    assert _value(samples, "sageserve_num_requests_waiting") == 0
    assert _value(samples, "sageserve_kv_cache_used_pages") == 0
    assert _value(samples, "sageserve_kv_cache_used_tokens") == 0
    assert _value(samples, "sageserve_kv_cache_usage_ratio") == 0
    usable = _value(samples, "sageserve_kv_cache_usable_pages")
    assert usable == info["num_usable_pages"] > 0
    capacity = _value(samples, "sageserve_kv_cache_capacity_tokens")
    assert capacity == usable * info["page_size"]


def test_metrics_count_an_aborted_request(server: Server) -> None:
    before = server.metrics()
    body = {
        "input_ids": list(range(2000, 2010)),
        "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
        "stream": True,
    }
    with server.client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one event, then the client leaves
    after = _wait_idle(server)
    assert _delta(before, after, "sageserve_requests_total", finish_reason="abort") == 1
    assert _delta(before, after, "sageserve_prompt_tokens_total") == 10
    assert _value(after, "sageserve_kv_cache_used_pages") == 0


# ------------------------------------------------------------------------ bench serving


def test_bench_serving_against_the_server(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    before = server.metrics()
    code = cli_main(
        [
            *("bench", "serving", "--url", server.url, "--api-key", API_KEY),
            *("--concurrency", "4", "--duration", "5", "--input-len", "32"),
            *("--output-len", "8", "--out", str(out)),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    summary = result["results"]
    assert summary["errors"] == 0
    assert summary["requests_completed"] >= 4
    assert summary["generated_tokens"] == 8 * summary["requests_completed"]
    assert summary["ttft_s"]["p50"] > 0 and summary["itl_s"]["p99"] > 0
    assert result["settings"]["concurrency"] == 4 and result["settings"]["api_key"] == "<given>"
    assert API_KEY not in out.read_text()
    assert result["server_info"]["vocab_size"] > 0 and "date" in result
    assert result["kv_pool_after"]["pages_leaked"] == 0
    steps = result["server_steps"]
    assert steps["decode"]["steps"] > 0 and steps["prefill"]["steps"] > 0
    assert 0 <= steps["decode"]["device_wait_mean_s"] <= steps["decode"]["mean_s"]
    assert steps["decode"]["p50_at_most_s"] <= steps["decode"]["p99_at_most_s"]
    after = _wait_idle(server)
    completed = _delta(before, after, "sageserve_requests_total", finish_reason="length")
    assert completed == summary["requests_completed"]


def test_bench_serving_counts_errors(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    too_long = [*("--input-len", "2000", "--output-len", "2", "--out", str(out))]
    flags = [*("--url", server.url, "--api-key", API_KEY, "--num-requests", "2"), *too_long]
    assert cli_main(["bench", "serving", *flags]) == 1
    summary = json.loads(out.read_text())["results"]
    assert summary["errors"] == 2 and summary["requests_completed"] == 0
    assert summary["error_examples"][0].startswith("HTTP 400")


def test_bench_serving_refuses_a_wrong_api_key(server: Server) -> None:
    flags = ["--url", server.url, "--api-key", "wrong", "--num-requests", "1"]
    assert cli_main(["bench", "serving", *flags]) == 2
