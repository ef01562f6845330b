"""The server survives anything one client sends (issue 13), against real server processes.

After each bad request a good one still succeeds, /health is 200 and the KV pool is whole.
Limits are set small here (1 MiB bodies, 32 sequences per request, 8 running + 8 queued,
1 s for headers, 2 s for a body) so the tests reach them in a moment.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from server_process import ServerProcess, launched

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
CONTEXT = 1024
BASE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--context-length", str(CONTEXT)]
LIMIT_FLAGS = [
    *("--max-body-bytes", str(2**20), "--max-batch-size", "32"),
    *("--max-running-requests", "8", "--max-queued-requests", "8"),
    *("--header-timeout", "1", "--body-timeout", "2"),
]
GOOD = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}


class Server:
    """A launch_server process and a client for it."""

    def __init__(self, proc: ServerProcess) -> None:
        self.url = proc.url
        self.process = proc.process
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body)

    def post_raw(self, path: str, text: str) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return self.client.post(path, content=text.encode(), headers=headers)

    def info(self) -> dict[str, Any]:
        return self.client.get("/get_server_info").raise_for_status().json()

    def wait_until(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if predicate(info) or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def assert_healthy(self) -> None:
        """Concurrent good requests succeed, /health is 200, and the pool returns whole."""
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda _: self.post("/generate", GOOD), range(4)))
        assert all(r.status_code == 200 for r in got), [r.text for r in got]
        assert self.client.get("/health").status_code == 200
        assert _pool_whole(self.wait_until(_pool_whole)), self.info()


def _pool_whole(info: dict[str, Any]) -> bool:
    idle = info["num_running"] == 0 and info["num_waiting"] == 0
    return idle and info["num_free_pages"] == info["num_usable_pages"]


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    flags = [*BASE_FLAGS, *LIMIT_FLAGS, "--max-total-tokens", "4096"]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        yield Server(proc)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ------------------------------------------------------------- 1. text that is not text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", '{"text": "a\\ud800b"}', "body.text"),
        ("/generate", '{"text": ["ok", "\\udfff"]}', "body.text[1]"),
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "body.prompt"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
            "body.messages[0].content",
        ),
        ("/generate", '{"text": "x", "rid": "\\udc00"}', "body.rid"),
        ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "body.model"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    server: Server, path: str, body: str, field: str
) -> None:
    innocents = _innocents(server, 4)
    error = _error(server.post_raw(path, body), 400)
    assert field in error["message"] and "surrogate" in error["message"]
    assert all(f.result().status_code == 200 for f in innocents)
    server.assert_healthy()


def test_a_surrogate_pair_is_text(server: Server) -> None:
    body = '{"text": "smile \\ud83d\\ude00", "sampling_params": {"max_new_tokens": 2}}'
    assert server.post_raw("/generate", body).status_code == 200


def test_deep_nesting_is_a_400(server: Server) -> None:
    body = '{"text": "x", "sampling_params": ' + "[" * 5000 + "]" * 5000 + "}"
    assert "nested too deeply" in _error(server.post_raw("/generate", body), 400)["message"]
    server.assert_healthy()


# ------------------------------------------------- 2. one request fails no one else's


def _innocents(server: Server, count: int) -> list[Any]:
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 16}}
    pool = ThreadPoolExecutor(count)
    return [pool.submit(server.post, "/generate", body) for _ in range(count)]


@pytest.mark.parametrize(
    "sampling_params",
    [
        {"min_new_tokens": 1, "stop_token_ids": [VOCAB]},
        {"stop_token_ids": [2**70]},
        {"stop": ["x"] * 100_000},
        {"stop": ["y" * 10_000]},
        {"stop_token_ids": list(range(5000))},
    ],
)
def test_bad_sampling_params_are_a_400_and_fail_no_one_else(
    server: Server, sampling_params: dict[str, Any]
) -> None:
    innocents = _innocents(server, 6)
    bad = {"text": "hi", "sampling_params": {"max_new_tokens": 4, **sampling_params}}
    error = _error(server.post("/generate", bad), 400)
    assert "stop" in error["message"]
    assert all(f.result().status_code == 200 for f in innocents)
    server.assert_healthy()


def test_huge_prompt_token_ids_are_a_400(server: Server) -> None:
    for ids in ([2**70], [-1], [VOCAB]):
        _error(server.post("/generate", {"input_ids": ids}), 400)
    server.assert_healthy()


# ------------------------------------------------------------ 3. work nobody waits for


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {**GOOD, "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}),
        # No max_tokens: chat's default is the rest of the context.
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True},
        ),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 900, "ignore_eos": True}),
    ],
)
def test_a_non_streamed_request_ends_when_its_client_leaves(
    server: Server, path: str, body: dict[str, Any]
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{path}", json=body, timeout=httpx.Timeout(60, read=1.0))
    left = time.monotonic()
    info = server.wait_until(_pool_whole, timeout=5)
    assert _pool_whole(info), info
    assert time.monotonic() - left < 1.5  # the watch polls every 0.25 s
    server.assert_healthy()


# ------------------------------------------------------------------ 4. large inputs


def test_a_body_over_the_limit_is_a_413(server: Server) -> None:
    body = {"text": "x" * (2**20 + 1)}
    error = _error(server.post("/generate", body), 413)
    assert "--max-body-bytes" in error["message"]
    server.assert_healthy()


def test_a_declared_oversize_body_is_refused_before_it_is_sent(server: Server) -> None:
    head = _raw_request_head(server, "/generate", content_length=300 * 2**20)
    with _connect(server) as sock:
        sock.sendall(head)
        assert _read_status(sock) == 413


def test_a_prompt_over_the_character_limit_is_a_400_before_tokenizing(server: Server) -> None:
    limit = CONTEXT * 32
    start = time.monotonic()
    for path, body in [
        ("/generate", {"text": "ab " * limit}),
        ("/v1/completions", {"prompt": "ab " * limit}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab " * limit}]}),
    ]:
        assert "--max-prompt-chars" in _error(server.post(path, body), 400)["message"]
    assert time.monotonic() - start < 5
    server.assert_healthy()


def test_the_event_loop_answers_while_a_large_body_is_handled(server: Server) -> None:
    big = {"text": "word " * (2**20 // 5 - 10)}  # just under 1 MiB
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post, "/generate", big)
        latencies = []
        while not pending.done():
            start = time.monotonic()
            assert server.client.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
    _error(pending.result(), 400)
    assert max(latencies) < 0.5, latencies


def test_a_batch_larger_than_the_limits_is_a_400_naming_them(server: Server) -> None:
    batch = {"text": ["hi"] * 33, "sampling_params": {"max_new_tokens": 1}}
    assert "--max-batch-size" in _error(server.post("/generate", batch), 400)["message"]
    n = {"prompt": "hi", "n": 33, "max_tokens": 1}
    assert "--max-batch-size" in _error(server.post("/v1/completions", n), 400)["message"]
    # Within --max-batch-size but more than running + queued slots: it could never fit.
    n = {"prompt": "hi", "n": 17, "max_tokens": 1}
    message = _error(server.post("/v1/completions", n), 400)["message"]
    assert "at most 16 can be in flight" in message and "--max-queued-requests" in message
    server.assert_healthy()


# --------------------------------------------------------------- 5. slow or keyless


def _connect(server: Server) -> socket.socket:
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def _raw_request_head(server: Server, path: str, content_length: int) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {urlparse(server.url).netloc}",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_status(sock: socket.socket) -> int:
    head = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_a_client_that_trickles_its_headers_is_cut_off(server: Server) -> None:
    head = _raw_request_head(server, "/generate", content_length=2)
    with _connect(server) as sock, ThreadPoolExecutor(1) as others:
        start = time.monotonic()
        # Others are served meanwhile (beside the trickle, so that how long they take on a
        # busy machine is not counted in the deadline's time).
        healthy = others.submit(server.assert_healthy)
        for byte in head[:-2]:  # a byte per 0.1 s: they never complete
            if _peer_closed(sock):
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server kept a connection whose headers took 10 s")
        took = time.monotonic() - start
        healthy.result()
    assert 0.9 < took < 4, took
    server.assert_healthy()


def _peer_closed(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def test_a_body_that_never_arrives_is_a_408(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(_raw_request_head(server, "/generate", content_length=100) + b'{"te')
        start = time.monotonic()
        assert _read_status(sock) == 408
        assert 1.5 < time.monotonic() - start < 5
    server.assert_healthy()


def test_the_api_key_is_checked_before_the_body_is_read(
    request: pytest.FixtureRequest,
) -> None:
    flags = [*BASE_FLAGS, "--api-key", "k", "--max-total-tokens", "1024"]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        server = Server(proc)
        with _connect(server) as sock:
            sock.sendall(_raw_request_head(server, "/generate", content_length=300 * 2**20))
            assert _read_status(sock) == 401  # no byte of the body was sent
        assert httpx.get(f"{proc.url}/health").status_code == 200
        key = {"Authorization": "Bearer k"}
        assert httpx.post(f"{proc.url}/generate", json=GOOD, headers=key).status_code == 200


# ---------------------------------------------------- the pool, shutdown, engine death


def test_a_request_that_outgrows_the_pool_ends_with_a_message(
    request: pytest.FixtureRequest,
) -> None:
    flags = [*BASE_FLAGS, "--max-total-tokens", "64"]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        server = Server(proc)
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        got = server.post("/generate", body)
        assert got.status_code == 200, got.text
        reason = got.json()["meta_info"]["finish_reason"]
        assert reason["type"] == "length" and "KV cache pool holds" in reason["message"]
        assert "--max-total-tokens" in reason["message"]
        server.assert_healthy()


def test_sigterm_with_requests_in_flight_exits_within_the_shutdown_timeout(
    request: pytest.FixtureRequest,
) -> None:
    flags = [*BASE_FLAGS, "--max-total-tokens", "4096", "--shutdown-timeout", "2"]
    body = {**GOOD, "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        server = Server(proc)
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(server.post, "/generate", body) for _ in range(3)]
            server.wait_until(lambda i: i["num_running"] == 3)
            start = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            code = proc.process.wait(timeout=30)
            took = time.monotonic() - start
            for future in pending:
                with pytest.raises(httpx.HTTPError):
                    future.result().raise_for_status()
    # uvicorn re-raises the signal once it has shut down: the status says SIGTERM ended it.
    assert code == -signal.SIGTERM and took < 2 + 5, (code, took)


def test_json_of_every_route_is_answered(server: Server) -> None:
    """The robustness guards leave ordinary traffic alone (GET routes, small bodies)."""
    assert server.client.get("/v1/models").status_code == 200
    assert server.client.get("/openapi.json").status_code == 200
    assert json.loads(server.client.get("/get_model_info").text)["vocab_size"] == VOCAB


def test_ctrl_c_shuts_down_and_exits_130_without_a_traceback(
    request: pytest.FixtureRequest,
) -> None:
    with launched(MODEL, BASE_FLAGS, show_log=lambda: request.session.testsfailed > 0) as proc:
        Server(proc).assert_healthy()
        proc.process.send_signal(signal.SIGINT)
        code = proc.process.wait(timeout=30)
        log = proc.log.read_text()
    assert code == 130, log
    assert "Application shutdown complete" in log and "engine loop stopped" in log
    assert "Traceback" not in log, log
