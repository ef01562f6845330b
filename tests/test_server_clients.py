"""Third-party clients, unchanged, against a real server process (SmolLM2 on CPU, torch
attention): the OpenAI SDK's typed calls, SGLang's newer routes, /tokenize, /detokenize.

Results are compared with the offline LLM on the same weights, so a field the server accepted
but ignored fails here. Request bodies recorded from lm-eval, bench_serving and SGLang's
frontend (tests/data/client_bodies.json) are replayed as they were sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_process import launched
from transformers import AutoTokenizer

from sageserve import LLM, SamplingParams
from sageserve.server.app import build_app
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop

MODEL = "smollm2-135m-instruct"
CONTEXT = 1024
FLAGS = ["--device", "cpu", "--dtype", "float32", "--context-length", str(CONTEXT)]
PROMPT = "The capital of France is"
LOGPROB_TOLERANCE = 1e-4  # server vs offline: same weights, same kernels, other batch shapes


@pytest.fixture(scope="module")
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    flags = [*FLAGS, "--max-total-tokens", "8192"]
    with launched(MODEL, flags, show_log=lambda: request.session.testsfailed > 0) as proc:
        yield proc.url


@pytest.fixture(scope="module")
def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, dtype="float32", device="cpu", context_length=CONTEXT, max_total_tokens=2048)


def _post(url: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


# ----------------------------------------------------------------- the OpenAI SDK


def test_sdk_sampling_extensions_reach_the_sampler(sdk: openai.OpenAI, llm: LLM) -> None:
    """vLLM's and SGLang's extra_body fields change the tokens exactly as offline."""
    extra = {"top_k": 3, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 5}
    got = sdk.completions.create(
        model="default", prompt=PROMPT, max_tokens=6, temperature=0.7, seed=11, extra_body=extra
    )
    params = SamplingParams(
        temperature=0.7,
        seed=11,
        top_k=3,
        min_p=0.05,
        repetition_penalty=1.3,
        min_new_tokens=5,
        max_new_tokens=6,
    )
    want = llm.generate(PROMPT, params)[0]
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    assert got.model == MODEL  # the served name, whatever the request called it


def test_sdk_logit_bias_forces_tokens_and_bytes_are_raw(sdk: openai.OpenAI, llm: LLM) -> None:
    """A +100 bias forces each piece of a 4-byte character; the pieces' `bytes` rebuild it."""
    emoji = "\U0001f642"
    pieces = llm.tokenizer.encode(emoji, add_special_tokens=False)
    assert len(pieces) > 1  # else the check below is trivial
    rebuilt = b""
    for token_id in pieces:
        got = sdk.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=2,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            logit_bias={str(token_id): 100},
        )
        content = got.choices[0].logprobs.content
        assert len(content) == 2  # both steps forced to the same token
        assert content[0].bytes == content[1].bytes and content[0].bytes != list("\ufffd".encode())
        assert content[0].top_logprobs[0].bytes is not None
        rebuilt += bytes(content[0].bytes)
    assert rebuilt == emoji.encode()


def test_sdk_chat_accepts_parts_developer_tool_and_null_content(
    sdk: openai.OpenAI, llm: LLM
) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}],
        },
        {"role": "assistant", "content": None},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    got = sdk.chat.completions.create(
        model="anything",
        messages=messages,
        max_tokens=5,
        temperature=0,
        response_format={"type": "text"},
        extra_body={"repetition_penalty": 1.4, "min_tokens": 5},
    )
    as_template = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is\n2+2?"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    ids = llm.apply_chat_template(as_template)
    params = SamplingParams(
        temperature=0, max_new_tokens=5, min_new_tokens=5, repetition_penalty=1.4
    )
    want = llm.generate([ids], params)[0]
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.content == want.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("response_format", {"type": "json_object"}),
        ("tool_choice", "required"),
    ],
)
def test_sdk_unsupported_values_are_400_naming_the_field(
    sdk: openai.OpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=1,
            **{field: value},
        )
    error = caught.value.body
    assert error["param"] == field and "not supported" in error["message"], error


def test_sdk_image_parts_are_400(sdk: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="default", messages=[{"role": "user", "content": [part]}], max_tokens=1
        )
    assert (
        "image_url" in caught.value.body["message"] and "text-only" in caught.value.body["message"]
    )


def test_sdk_models(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [MODEL]
    card = sdk.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def test_sdk_echo_logprobs_max_tokens_0_are_prompt_logprobs(sdk: openai.OpenAI, llm: LLM) -> None:
    """lm-eval's loglikelihood call: the prompt echoed with its logprobs, nothing generated."""
    ids = llm.tokenizer.encode(PROMPT)
    want = llm.generate([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=1))[0]
    got = sdk.completions.create(model="default", prompt=ids, max_tokens=0, logprobs=1, echo=True)
    choice = got.choices[0]
    assert choice.text == llm.tokenizer.decode(ids) and got.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) == len(lp.tokens) == len(lp.text_offset)
    for j in range(1, len(ids)):
        expected = want.prompt_logprobs[j][ids[j]]
        assert lp.token_logprobs[j] == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
        assert max(lp.top_logprobs[j].values()) >= lp.token_logprobs[j] - LOGPROB_TOLERANCE
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_generated_tokens_streamed_and_not(sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": "default",
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
    }
    whole = sdk.completions.create(**kwargs, logprobs=2)
    choice = whole.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    prompt_tokens = whole.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 4 and lp.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset[prompt_tokens] == len(PROMPT)
    chunks = list(sdk.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_vllm_prompt_logprobs(url: str, llm: LLM) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    got = _post(url, "/v1/completions", body).raise_for_status().json()["choices"][0]
    ids = llm.tokenizer.encode(PROMPT)
    want = llm.generate([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=2))[0]
    entries = got["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        entry = entries[j]
        actual = entry[str(ids[j])]
        assert actual["logprob"] == pytest.approx(
            want.prompt_logprobs[j][ids[j]], abs=LOGPROB_TOLERANCE
        )
        ranked = sorted((e for e in entry.values() if e["rank"]), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked] == [1, 2]
        assert ranked[0]["logprob"] >= ranked[1]["logprob"]
        if actual["rank"] is None:  # outside the top 2
            assert actual["logprob"] <= ranked[1]["logprob"] and len(entry) == 3


def test_several_served_names_are_checked(llm: LLM) -> None:
    """In-process, engine thread not started: nothing here reaches the engine."""
    app = build_app(EngineLoop(llm.engine), ServerArgs(served_model_names=("first", "second")))

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.get("/v1/models"),
                await client.get("/v1/models/second"),
                await client.get("/v1/models/default"),
                await client.post("/v1/completions", json={"model": "default", "prompt": "x"}),
            ]

    models, second, unknown, completion = asyncio.run(ask())
    assert [m["id"] for m in models.json()["data"]] == ["first", "second"]
    assert second.json()["id"] == "second" and unknown.status_code == 404
    assert completion.status_code == 404
    error = completion.json()["error"]
    assert error["code"] == "model_not_found" and "'first', 'second'" in error["message"]


# -------------------------------------------------------------------- SGLang's /generate


def test_generate_n_samples_with_consecutive_seeds(url: str, llm: LLM) -> None:
    params = {"max_new_tokens": 5, "temperature": 1.0, "n": 3, "seed": 7}
    got = _post(url, "/generate", {"text": PROMPT, "sampling_params": params}).raise_for_status()
    samples = got.json()
    assert isinstance(samples, list) and len(samples) == 3
    for j, sample in enumerate(samples):
        want = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=7 + j, max_new_tokens=5))
        assert sample["output_ids"] == want[0].token_ids
    body = {"text": [PROMPT, "Hi"], "sampling_params": {"max_new_tokens": 1, "n": 2}}
    assert len(_post(url, "/generate", body).raise_for_status().json()) == 4
    refused = _post(url, "/generate", {"text": PROMPT, "rid": "a", "sampling_params": params})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "rid"


def test_generate_logit_bias(url: str, llm: LLM) -> None:
    forced = llm.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    banned = llm.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=1))[0].token_ids[0]
    params = {"max_new_tokens": 2, "temperature": 0, "logit_bias": {str(banned): -100}}
    got = _post(url, "/generate", {"text": PROMPT, "sampling_params": params}).json()
    assert banned not in got["output_ids"]
    params["logit_bias"] = {str(forced): 100}
    got = _post(url, "/generate", {"text": PROMPT, "sampling_params": params}).json()
    assert got["output_ids"] == [forced, forced]


# ------------------------------------------------------------------- the other routes


def test_health_generate(url: str) -> None:
    got = httpx.get(f"{url}/health_generate", timeout=60)
    assert got.status_code == 200


def test_model_info_paths_load(url: str, llm: LLM) -> None:
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(f"{url}{path}").raise_for_status().json()
        assert info["is_generation"] is True and info["context_length"] == CONTEXT
    tokenizer = AutoTokenizer.from_pretrained(info["tokenizer_path"])
    text = "Héllo wörld \U0001f642 <|im_end|>"
    assert tokenizer.encode(text) == llm.tokenizer.encode(text)
    assert info["model_path"].endswith(".gguf") and info["model_path"].startswith("/")
    for path in ("/server_info", "/get_server_info"):
        server = httpx.get(f"{url}{path}").raise_for_status().json()
        assert server["attention_backend"] == "torch" and server["context_length"] == CONTEXT


def test_tokenize_and_detokenize(url: str, llm: LLM) -> None:
    texts = ["Hello there", "Ünïcode \U0001f642 text"]
    one = _post(url, "/tokenize", {"prompt": texts[0], "return_token_strs": True}).json()
    ids = llm.tokenizer.encode(texts[0])
    assert one["tokens"] == ids and one["count"] == len(ids) and one["max_model_len"] == CONTEXT
    assert len(one["token_strs"]) == len(ids)
    many = _post(url, "/tokenize", {"prompt": texts}).json()
    assert many["tokens"] == [llm.tokenizer.encode(t) for t in texts]
    chat = [{"role": "user", "content": "Hi"}]
    templated = _post(url, "/tokenize", {"messages": chat}).json()
    assert templated["tokens"] == llm.apply_chat_template(chat)
    back = _post(url, "/detokenize", {"tokens": many["tokens"][1]}).json()
    assert back["text"] == back["prompt"] == llm.tokenizer.decode(many["tokens"][1])
    both = _post(url, "/detokenize", {"tokens": many["tokens"]}).json()
    assert both["text"] == [llm.tokenizer.decode(t) for t in many["tokens"]]
    bad = _post(url, "/detokenize", {"tokens": [10**7]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_unknown_fields_are_ignored_and_unsupported_values_are_400(url: str) -> None:
    body = {
        "prompt": PROMPT,
        "max_tokens": 1,
        "metadata": {"a": 1},
        "best_of": 1,
        "lora_path": None,
    }
    assert _post(url, "/v1/completions", body).status_code == 200
    refused = _post(url, "/v1/completions", {**body, "best_of": 3})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "best_of"
    assert "best_of: 3 is not supported" in error["message"] and "use n" in error["message"]
    nested = {"text": PROMPT, "sampling_params": {"max_new_tokens": 1, "regex": "[0-9]+"}}
    refused = _post(url, "/generate", nested)
    assert (
        refused.status_code == 400 and "sampling_params.regex" in refused.json()["error"]["message"]
    )
    assert json.loads(refused.text)["error"]["param"] == "sampling_params"


# --------------------------------------------- request bodies recorded from real clients

RECORDED = json.loads((Path(__file__).parent / "data" / "client_bodies.json").read_text())
CASES = RECORDED["clients"]


def _replay(url: str, name: str) -> httpx.Response:
    """The recorded request, sent as the client sent it (method, path, headers, body)."""
    case = CASES[name]
    headers = {k: v for k, v in case.get("headers", {}).items() if k.lower() != "authorization"}
    content = None if case["body"] is None else json.dumps(case["body"])
    response = httpx.request(
        case["method"], f"{url}{case['path']}", content=content, headers=headers, timeout=120
    )
    assert response.status_code == 200, (name, response.text)
    return response


def _events(response: httpx.Response) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_recorded_request_is_served(url: str, name: str) -> None:
    response = _replay(url, name)
    if CASES[name]["stream"]:
        assert _events(response), name
    else:
        assert response.headers["content-type"].startswith("application/json"), name


def _lm_eval_loglikelihood(choice: dict[str, Any], ctxlen: int) -> tuple[float, bool]:
    """lm-eval 0.4.13's parse_logprobs for one choice (openai_completions.py:99), restated:
    the continuation's logprobs (the generated token dropped), and whether each was the top."""
    logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = all(lp == max(top.values()) for lp, top in zip(logprobs, tops, strict=True))
    return sum(logprobs), is_greedy


def test_lm_eval_loglikelihood_matches_offline(url: str, llm: LLM) -> None:
    ids = CASES["lm_eval/local-completions/loglikelihood"]["body"]["prompt"][0]
    choices = _replay(url, "lm_eval/local-completions/loglikelihood").json()["choices"]
    assert len(choices) == 1 and len(choices[0]["logprobs"]["token_logprobs"]) == len(ids) + 1
    want = llm.generate([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=1))[0]
    for ctxlen in range(1, len(ids)):
        got, is_greedy = _lm_eval_loglikelihood(choices[0], ctxlen)
        expected = sum(want.prompt_logprobs[j][ids[j]] for j in range(ctxlen, len(ids)))
        assert got == pytest.approx(expected, abs=LOGPROB_TOLERANCE * len(ids))
        greedy = [
            max(want.prompt_logprobs[j], key=want.prompt_logprobs[j].get)
            for j in range(ctxlen, len(ids))
        ]
        assert is_greedy == (greedy == ids[ctxlen:])


def test_lm_eval_generate_until_matches_offline(url: str, llm: LLM) -> None:
    body = CASES["lm_eval/local-completions/generate_until"]["body"]
    got = _replay(url, "lm_eval/local-completions/generate_until").json()["choices"]
    params = SamplingParams(temperature=0, max_new_tokens=body["max_tokens"], stop=body["stop"])
    assert [c["text"] for c in got] == [llm.generate(body["prompt"], params)[0].text]


def test_lm_eval_remote_tokenizer_round_trip(url: str, llm: LLM) -> None:
    """lm-eval's RemoteTokenizer: /tokenizer_info's eos_token, encoded by /tokenize."""
    info = _replay(url, "lm_eval/local-completions/probe_tokenizer_info").json()
    assert info["eos_token"] == llm.tokenizer.eos_token and info["chat_template"]
    eos = _post(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [llm.tokenizer.eos_token_id]
    assert _replay(url, "lm_eval/local-completions/probe_tokenize").json()["tokens"]


def test_bench_serving_streams_carry_what_it_reads(url: str) -> None:
    """bench_serving reads cumulative `text` and `meta_info.completion_tokens` (sglang) or
    `choices[0]` in every chunk (OpenAI backends)."""
    for name in ("sglang-bench/sglang", "sglang-bench/sglang_tokenize_prompt"):
        chunks = _events(_replay(url, name))
        assert all("completion_tokens" in c["meta_info"] for c in chunks)
        assert chunks[-1]["meta_info"]["completion_tokens"] == 8  # ignore_eos
        texts = [c["text"] for c in chunks]
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    for name in ("sglang-bench/sglang-oai", "sglang-bench/vllm", "sglang-bench/sglang-oai-chat"):
        assert all(c["choices"] for c in _events(_replay(url, name))), name
    info = _replay(url, "sglang-bench/model_info").json()
    assert info["tokenizer_path"] and info["model_path"]


def test_sglang_frontend_select_gets_a_list_of_prompt_logprobs(url: str, llm: LLM) -> None:
    body = CASES["sglang-lang/select_logprobs"]["body"]
    got = _replay(url, "sglang-lang/select_logprobs").json()
    assert isinstance(got, list) and len(got) == len(body["text"])
    for text, answer in zip(body["text"], got, strict=True):
        entries = answer["meta_info"]["input_token_logprobs"]
        ids = llm.tokenizer.encode(text)
        assert [e[1] for e in entries] == ids[body["logprob_start_len"] :]
        assert all(len(e) == 3 and isinstance(e[2], str) for e in entries)
    gen = _replay(url, "sglang-lang/gen").json()
    assert gen["meta_info"]["completion_tokens"] <= 8 and isinstance(gen["text"], str)
