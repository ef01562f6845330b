"""The HTTP server against a real process on loopback (SmolLM2 on CPU).

One server per module (and per xdist worker that runs tests of it): launching costs ~10 s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess, launched

from sageserve import LLM, SamplingParams

API_KEY = "test-key"
MODEL = "smollm2-135m-instruct"
CONTEXT = 1024
MAX_RUNNING = 8
MAX_QUEUED = 8
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--context-length", str(CONTEXT)]
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    """A launch_server process and an authenticated client for it."""

    def __init__(self, proc: ServerProcess) -> None:
        self.url = proc.url
        self.process = proc.process
        self.log = proc.log
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        )

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body)

    def info(self) -> dict[str, Any]:
        return self.client.get("/get_server_info").raise_for_status().json()

    def wait_until(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if predicate(info) or time.monotonic() > deadline:
                return info
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    flags = [
        *("--api-key", API_KEY, "--max-total-tokens", "8192"),
        *("--max-running-requests", str(MAX_RUNNING), "--max-queued-requests", str(MAX_QUEUED)),
        *ENGINE_FLAGS,
    ]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        yield Server(proc)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, dtype="float32", device="cpu", context_length=CONTEXT, max_total_tokens=2048)


def _greedy(max_new_tokens: int = 12, **kw: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **kw}


def _sse(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event; "[DONE]" stays a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _pool_whole(info: dict[str, Any]) -> bool:
    idle = info["num_running"] == 0 and info["num_waiting"] == 0
    return idle and info["num_free_pages"] == info["num_usable_pages"]


# ------------------------------------------------------------------------- /generate


def test_generate_equals_offline_with_logprobs(server: Server, llm: LLM) -> None:
    body = {
        "text": PROMPT,
        "sampling_params": _greedy(),
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    got = server.post("/generate", body).raise_for_status().json()
    params = SamplingParams(temperature=0, max_new_tokens=12, logprobs=3, prompt_logprobs=3)
    want = llm.generate([PROMPT], params)[0]
    assert got["text"] == want.text and got["output_ids"] == want.token_ids
    meta = got["meta_info"]
    assert meta["prompt_tokens"] == want.num_prompt_tokens
    assert meta["completion_tokens"] == len(want.token_ids)
    assert meta["finish_reason"] == {"type": "length"} and meta["e2e_latency"] > 0
    out_lp = meta["output_token_logprobs"]
    for (lp, tok, text), t, d in zip(out_lp, want.token_ids, want.logprobs, strict=True):
        assert tok == t and lp == pytest.approx(d[t], abs=1e-4) and isinstance(text, str)
    assert [len(top) for top in meta["output_top_logprobs"]] == [3] * len(want.token_ids)
    assert meta["output_top_logprobs"][0][0][0] >= meta["output_top_logprobs"][0][1][0]
    assert [e[1] for e in meta["input_token_logprobs"]] == want.prompt_token_ids
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    assert meta["input_token_logprobs"][1][0] == pytest.approx(
        want.prompt_logprobs[1][want.prompt_token_ids[1]], abs=1e-4
    )


def test_generate_output_logprobs_only_by_default(server: Server) -> None:
    body = {"input_ids": [1, 504, 3575], "sampling_params": _greedy(3), "return_logprob": True}
    meta = server.post("/generate", body).raise_for_status().json()["meta_info"]
    assert meta["input_token_logprobs"] == []
    assert [e[2] for e in meta["output_token_logprobs"]] == [None] * 3
    assert "output_top_logprobs" not in meta


def test_generate_batch_and_stop(server: Server) -> None:
    body = {"text": [PROMPT, "Hello"], "sampling_params": _greedy(8, stop=["."])}
    got = server.post("/generate", body).raise_for_status().json()
    assert isinstance(got, list) and len(got) == 2
    assert got[0]["text"] == " Paris"
    assert got[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "."}
    ids = {r["meta_info"]["id"] for r in got}
    assert len(ids) == 2


def test_generate_stream_matches_non_stream(server: Server) -> None:
    body = {"text": PROMPT, "sampling_params": _greedy(10, stop=" is")}
    full = server.post("/generate", body).raise_for_status().json()
    with server.client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = [c["text"] for c in chunks]
    assert all(full["text"].startswith(t) for t in texts)  # cumulative, never taken back
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_abort_request(server: Server) -> None:
    body = {"text": PROMPT, "rid": "to-abort", "sampling_params": _greedy(400, ignore_eos=True)}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post, "/generate", body)
        server.wait_until(lambda info: info["num_running"] == 1)
        assert server.post("/abort_request", {"rid": "to-abort"}).status_code == 200
        got = pending.result().json()
    assert got["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < got["meta_info"]["completion_tokens"] < 400
    assert server.post("/abort_request", {"rid": "to-abort"}).status_code == 404


# ---------------------------------------------------------------------------- OpenAI


def test_completions_equal_offline(server: Server, llm: LLM) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "n": 2}
    got = server.post("/v1/completions", body).raise_for_status().json()
    want = llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=8, logprobs=2))[0]
    assert got["object"] == "text_completion" and got["model"] == MODEL
    assert [c["index"] for c in got["choices"]] == [0, 1]
    for choice in got["choices"]:
        assert choice["text"] == want.text and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
        assert lp["token_logprobs"][0] == pytest.approx(want.logprobs[0][want.token_ids[0]], 1e-4)
        assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == want.text
    usage = got["usage"]
    assert usage["prompt_tokens"] == want.num_prompt_tokens and usage["completion_tokens"] == 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16


def test_chat_equals_offline(server: Server, llm: LLM) -> None:
    body = {"messages": CHAT, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    got = server.post("/v1/chat/completions", body).raise_for_status().json()
    want = llm.chat(CHAT, SamplingParams(temperature=0, max_new_tokens=CONTEXT))[0]
    choice = got["choices"][0]
    assert got["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert len(content) == len(want.token_ids)
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert bytes(content[0]["bytes"]).decode() == content[0]["token"]
    assert got["usage"]["prompt_tokens"] == want.num_prompt_tokens


def test_chat_stream_with_usage(server: Server) -> None:
    body = {"messages": CHAT, "temperature": 0, "max_completion_tokens": 12, "seed": 3}
    full = server.post("/v1/chat/completions", body).raise_for_status().json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with server.client.stream("POST", "/v1/chat/completions", json=stream_body) as response:
        events = _sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_completions_stream_logprobs_and_n(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1, "n": 2}
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = _sse(r)[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        tokens = [t for c in mine for t in c["logprobs"]["tokens"]]
        assert "".join(c["text"] for c in mine) == "".join(tokens)
        assert len(tokens) == 6 and mine[-1]["finish_reason"] == "length"


def test_models_and_info(server: Server) -> None:
    models = server.client.get("/v1/models").raise_for_status().json()
    assert models["data"][0]["id"] == MODEL and models["object"] == "list"
    info = server.info()
    assert info["attention_backend"] == "torch" and info["kv_cache_dtype"] == "float32"
    assert info["pool_capacity_tokens"] == 8192 and info["page_size"] == 16
    assert "torch" in info["versions"] and "api_key" not in info
    model = server.client.get("/get_model_info").raise_for_status().json()
    assert model["context_length"] == CONTEXT and model["is_generation"] is True


# ---------------------------------------------------------------- batching, aborting


def test_concurrent_clients_are_batched(server: Server) -> None:
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    body = lambda p: {"text": p, "sampling_params": _greedy(8)}  # noqa: E731
    alone = [server.post("/generate", body(p)).json()["output_ids"] for p in prompts]
    before = server.info()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: server.post("/generate", body(p)).json(), prompts))
    after = server.info()
    assert [r["output_ids"] for r in together] == alone
    assert after["max_batch_seen"] > 1
    # Alone, 16 requests of 8 tokens take 16 x 8 steps; batched, far fewer.
    assert after["num_steps"] - before["num_steps"] < 16 * 8 / 2


def test_client_disconnect_aborts_and_frees_pages(server: Server) -> None:
    body = {"text": PROMPT, "stream": True, "sampling_params": _greedy(500, ignore_eos=True)}
    with server.client.stream("POST", "/generate", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # Stats are published after the step whose output we just read: wait for them.
        assert server.wait_until(lambda i: i["num_running"] == 1, timeout=10)["num_running"] == 1
    info = server.wait_until(_pool_whole)
    assert _pool_whole(info), info


def test_queue_full_is_503_with_retry_after(server: Server) -> None:
    body = {"text": PROMPT, "stream": True, "sampling_params": _greedy(500, ignore_eos=True)}
    capacity = MAX_RUNNING + MAX_QUEUED
    stop = threading.Event()

    def hold() -> None:
        with server.client.stream("POST", "/generate", json=body) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    with ThreadPoolExecutor(capacity) as pool:
        for _ in range(capacity):
            pool.submit(hold)
        full = server.wait_until(lambda i: i["num_running"] + i["num_waiting"] == capacity)
        assert full["num_running"] + full["num_waiting"] == capacity
        refused = server.post("/generate", {"text": PROMPT, "sampling_params": _greedy(1)})
        stop.set()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert _pool_whole(server.wait_until(_pool_whole))
    _assert_serving(server)


# -------------------------------------------------------------------------- errors


def _assert_serving(server: Server) -> None:
    got = server.post("/generate", {"text": PROMPT, "sampling_params": _greedy(2)})
    assert got.status_code == 200, got.text


@pytest.mark.parametrize(
    ("path", "body", "param", "phrase"),
    [
        ("/generate", b'{"text": "x",', None, "malformed JSON"),
        ("/generate", {"text": 5}, "text", "valid string"),
        ("/generate", {"text": "x", "sampling_params": {"top_p": 2}}, "sampling_params", "top_p"),
        (
            "/generate",
            {"text": "x", "sampling_params": {"max_new_tokens": "5"}},
            "sampling_params",
            "integer",
        ),
        ("/generate", {"text": "x", "sampling_params": {"regex": "a"}}, "sampling_params", "regex"),
        ("/generate", {"text": ""}, None, "empty"),
        ("/generate", {"input_ids": []}, None, "empty"),
        ("/generate", {"input_ids": [1] * CONTEXT}, None, "context length"),
        ("/generate", {"input_ids": [10**9]}, None, "vocabulary"),
        ("/generate", {"text": "x", "input_ids": [1]}, None, "exactly one"),
        (
            "/generate",
            {"text": "x", "return_logprob": True, "top_logprobs_num": 99},
            "sampling_params",
            "logprobs",
        ),
        ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of", "not supported"),
        ("/v1/chat/completions", {"messages": CHAT, "tools": [{}]}, "tools", "tool calling"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, None, "temperature"),
        ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n", "greater than or equal"),
        ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages",
            "role",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, None, "logprobs"),
        ("/abort_request", {}, "rid", "required"),
    ],
)
def test_errors_are_400_and_harmless(
    server: Server, path: str, body: Any, param: str | None, phrase: str
) -> None:
    if isinstance(body, bytes):
        got = server.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        got = server.post(path, body)
    assert got.status_code == 400, got.text
    error = got.json()["error"]
    assert error["type"] == "invalid_request_error" and phrase.lower() in error["message"].lower()
    assert param is None or error["param"] == param
    _assert_serving(server)


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_json_body_without_a_json_content_type(server: Server, content_type: str | None) -> None:
    """curl -d labels a body as a form, some clients label nothing: both are read as JSON."""
    body = json.dumps({"text": PROMPT, "sampling_params": _greedy(2)}).encode()
    request = server.client.build_request("POST", "/generate", content=body)
    assert "content-type" not in request.headers  # httpx labels no raw content
    if content_type:
        request.headers["content-type"] = content_type
    got = server.client.send(request)
    assert got.status_code == 200, got.text
    assert len(got.json()["output_ids"]) == 2


def test_a_body_labelled_otherwise_is_a_400(server: Server) -> None:
    body = json.dumps({"text": PROMPT}).encode()
    got = server.client.post("/generate", content=body, headers={"content-type": "text/plain"})
    assert got.status_code == 400 and "application/json" in got.json()["error"]["message"]
    _assert_serving(server)


def test_api_key(server: Server) -> None:
    body = {"text": PROMPT, "sampling_params": _greedy(1)}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        got = httpx.post(f"{server.url}/generate", json=body, headers=headers)
        assert got.status_code == 401
        assert got.json()["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/health_generate"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
    assert server.client.get("/metrics").status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    lower_case_scheme = {"Authorization": f"bearer {API_KEY}"}
    assert httpx.post(f"{server.url}/generate", json=body, headers=lower_case_scheme).is_success
    _assert_serving(server)


def test_unknown_route_is_openai_style_404(server: Server) -> None:
    got = server.client.get("/nope")
    assert got.status_code == 404 and got.json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------- fuzz

# Lone UTF-16 surrogates (json.dumps writes them as \udxxx escapes), huge ints and strings.
_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
_huge = st.sampled_from(["x" * 200_000, "\u00e9" * 50_000]) | st.integers(2**64, 2**300)
_garbage = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.text(max_size=12)
    | st.integers(-(2**66), 2**66)
    | _surrogates
    | _huge,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# Values of the right type, mostly in range. Token counts stay tiny and are never absent nor
# garbage: a default of 128 (or the context, for chat) would make one example cost seconds.


def _mostly(valid: st.SearchStrategy[Any], invalid: Any) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten, else the value `invalid`."""
    return st.integers(0, 9).flatmap(lambda i: st.just(invalid) if i == 0 else valid)


_count = _mostly(st.integers(0, 4), -1)
_text = _mostly(st.text(min_size=1, max_size=30), "a\ud800b")
_ids = st.lists(st.integers(0, 49_151), min_size=1, max_size=12)
_openai_sampling = {
    "temperature": _mostly(st.floats(0, 2) | st.just(0), -1),
    "top_p": _mostly(st.floats(0.01, 1), 1.5),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "seed": _mostly(st.integers(0, 2**64 - 1), 2**64),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(
        _mostly(st.integers(0, 49_151).map(str), "x"),
        _mostly(st.floats(-100, 100), 101),
        max_size=3,
    ),
}
_sglang_sampling = {
    **_openai_sampling,
    "top_k": st.integers(-1, 60) | st.integers(49_000, 10**9),
    "min_p": st.floats(0, 1),
    "min_new_tokens": _count,
    "stop_token_ids": st.lists(st.integers(0, 49_200), max_size=3),
    "ignore_eos": st.booleans(),
    "repetition_penalty": st.floats(0.1, 2),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "n": _mostly(st.integers(1, 2), 0),
}


def _mutate(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**body, key: value}


def _body(required: dict[str, Any], optional: dict[str, Any], keep: str) -> st.SearchStrategy[Any]:
    """Well-typed bodies, the same with one field (not `keep`) made garbage, or garbage."""
    typed = st.fixed_dictionaries(required, optional=optional)
    keys = st.sampled_from([k for k in [*required, *optional, "bogus"] if k != keep])
    mutated = st.builds(_mutate, typed, keys, _garbage)
    return st.integers(0, 9).flatmap(lambda i: _garbage if i == 0 else mutated if i <= 2 else typed)


_generate_body = _body(
    {
        "sampling_params": st.fixed_dictionaries(
            {"max_new_tokens": _count}, optional=_sglang_sampling
        ),
        "text": _text | st.lists(_text, min_size=1, max_size=3),
    },
    {
        "return_logprob": st.booleans(),
        "logprob_start_len": st.integers(-2, 12),
        "top_logprobs_num": _mostly(st.integers(0, 5), 21),
        "return_text_in_logprobs": st.booleans(),
        "stream": st.booleans(),
        "rid": st.text(min_size=1, max_size=8),
    },
    "sampling_params",
)
_generate_ids_body = _body(
    {
        "sampling_params": st.fixed_dictionaries({"max_new_tokens": _count}),
        "input_ids": _mostly(_ids | st.lists(_ids, min_size=1, max_size=3), [-1]),
    },
    {"return_logprob": st.booleans(), "logprob_start_len": st.integers(-1, 12)},
    "sampling_params",
)
_openai_common = {
    **_openai_sampling,
    "n": _mostly(st.integers(1, 3), 0),
    "stream": st.booleans(),
    "model": st.sampled_from([MODEL, "default", "gpt-4"]),
    "top_k": st.integers(-1, 60),
    "min_p": st.floats(0, 1),
    "repetition_penalty": _mostly(st.floats(0.1, 2), 0),
    "min_tokens": _mostly(st.integers(0, 2), -1),
    "best_of": _mostly(st.just(1), 2),
}
_completion_body = _body(
    {"prompt": _text | _ids | st.lists(_text, min_size=1, max_size=2), "max_tokens": _count},
    {
        **_openai_common,
        "logprobs": _mostly(st.integers(0, 5), 21),
        "echo": st.booleans(),
        "prompt_logprobs": _mostly(st.integers(0, 3), 21),
    },
    "max_tokens",
)
_message = st.fixed_dictionaries(
    {
        "role": _mostly(st.sampled_from(["user", "system"]), "robot"),
        "content": _mostly(st.text(max_size=20), "\udc00"),
    }
)
_chat_body = _body(
    {"messages": st.lists(_message, min_size=1, max_size=3), "max_completion_tokens": _count},
    {**_openai_common, "logprobs": st.just(True), "top_logprobs": st.integers(0, 5)},
    "max_completion_tokens",
)


def _post_any(server: Server, path: str, body: Any) -> int:
    """Status of a POST; a stream is read to its end (an error inside it is a 5xx too).

    Python's json writes NaN and Infinity literals (httpx's json= refuses them): the server
    must answer them with a 400 too.
    """
    headers = {"content-type": "application/json"}
    with server.client.stream("POST", path, content=json.dumps(body), headers=headers) as response:
        text = "".join(response.iter_text())
    if response.status_code == 200 and isinstance(body, dict) and body.get("stream") is True:
        assert text.endswith("data: [DONE]\n\n"), text
    return response.status_code


@pytest.mark.parametrize(
    ("path", "strategy"),
    [
        ("/generate", _generate_body),
        ("/generate", _generate_ids_body),
        ("/v1/completions", _completion_body),
        ("/v1/chat/completions", _chat_body),
    ],
)
def test_fuzz_never_5xx(server: Server, path: str, strategy: st.SearchStrategy[Any]) -> None:
    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(body=strategy)
    def check(body: Any) -> None:
        status = _post_any(server, path, body)
        event(f"HTTP {status}")  # see --hypothesis-show-statistics
        assert status in (200, 400), (status, body)

    check()
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _pool_whole(server.wait_until(_pool_whole))
    _assert_serving(server)
