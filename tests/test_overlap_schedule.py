"""The overlap schedule (the default: step N+1 queued before step N is read back) against
reading every step back at once (`--disable-overlap-schedule`), on SmolLM2 fp32 with the
exact torch backend on the CPU.

Whatever ends a request -- max tokens, EOS, a stop token or string, min_new_tokens holding a
stop back, the context length, the pool's capacity, an abort -- it ends at the same token
with the same text, logprobs and finish reason, no token is emitted after the end, and the
pool is whole afterwards. Logprobs are compared with `assert_outputs_match(exact=True)`
(1e-4): a preemption recomputes a request in other chunks when the two schedules run out of
pages at different steps.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from int8_flips import assert_outputs_match

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine_args import add_engine_args, engine_config_from_args
from sageserve.models.loader import LoadedModel, load_model

MODES = (True, False)  # overlap on, off


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def make_llm(
    loaded: LoadedModel,
    overlap: bool,
    *,
    max_total_tokens: int = 8192,
    chunked_prefill_size: int = 2048,
    context_length: int | None = None,
) -> LLM:
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        context_length=context_length,
        cache=CacheConfig(page_size=16, max_total_tokens=max_total_tokens),
        scheduler=SchedulerConfig(chunked_prefill_size=chunked_prefill_size),
        overlap_schedule=overlap,
    )
    return LLM.from_engine_config(config, loaded)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 49152, (n,), generator=gen).tolist() for n in lengths]


def assert_pool_whole(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_free_pages == stats.num_usable_pages


def generate_both(
    loaded: LoadedModel, prompts: list, params: list[SamplingParams] | SamplingParams, **kwargs
) -> dict[bool, list[RequestOutput]]:
    """Outputs with overlap on and off, each engine's pool checked whole afterwards."""
    results = {}
    for overlap in MODES:
        llm = make_llm(loaded, overlap, **kwargs)
        results[overlap] = llm.generate(prompts, params)
        assert_pool_whole(llm)
    return results


def assert_same(on: list[RequestOutput], off: list[RequestOutput], top_n: int) -> None:
    for a, b in zip(on, off, strict=True):
        assert_outputs_match(a, b, exact=True, top_n=top_n)
        ends = [(o.text, o.finish_reason, o.stop_reason, o.finish_message) for o in (a, b)]
        assert ends[0] == ends[1]


def test_every_stop_ends_at_the_same_token(smollm2: LoadedModel) -> None:
    """Stops drawn from a free run, batched together, so that a request ending on a token
    read back late leaves a step that the others still run in."""
    prompts = random_prompts([9, 30, 61, 17, 44], seed=11)
    free_params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    free = make_llm(smollm2, False).generate(prompts, free_params)
    stop_id, held_id = free[0].token_ids[5], free[3].token_ids[0]
    stop_text = free[1].text[len(free[1].text) // 2 :][:4]
    base = dict(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=3)
    params = [
        SamplingParams(**base, stop_token_ids=[stop_id]),
        SamplingParams(**base, stop=[stop_text]),
        SamplingParams(**{**base, "max_new_tokens": 9}),
        SamplingParams(**base, stop_token_ids=[held_id], min_new_tokens=3),
        SamplingParams(**{**base, "max_new_tokens": 1}),
    ]
    results = generate_both(smollm2, prompts, params)
    assert_same(results[True], results[False], top_n=3)
    on = results[True]
    assert on[0].finish_reason == "stop" and on[0].stop_reason == stop_id
    assert on[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop_id) + 1]
    assert on[1].finish_reason == "stop" and on[1].stop_reason == stop_text
    assert [len(on[2].token_ids), len(on[4].token_ids)] == [9, 1]
    assert on[3].token_ids[0] != held_id and len(on[3].token_ids) >= 3


def test_eos_ends_a_chat_answer(smollm2: LoadedModel) -> None:
    answers = {}
    for overlap in MODES:
        llm = make_llm(smollm2, overlap)
        answers[overlap] = llm.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0, max_new_tokens=32, logprobs=1),
        )
        assert_pool_whole(llm)
    assert answers[True][0].finish_reason == "stop"
    assert answers[True][0].text == "The capital of France is Paris."
    assert_same(answers[True], answers[False], top_n=1)


def test_preemption_under_a_tiny_pool(smollm2: LoadedModel) -> None:
    prompts = random_prompts([40, 45, 50, 35], seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, logprobs=2)
    preemptions = {}
    results = {}
    for overlap in MODES:
        llm = make_llm(smollm2, overlap, max_total_tokens=160, chunked_prefill_size=32)
        results[overlap] = llm.generate(prompts, params)
        preemptions[overlap] = llm.engine.stats().num_preemptions
        assert_pool_whole(llm)
    assert min(preemptions.values()) > 0
    assert_same(results[True], results[False], top_n=2)


def test_context_length_and_pool_capacity_end_requests(smollm2: LoadedModel) -> None:
    """At the context length the last token is never fed back; a request alone on a pool
    too small for it ends with "length" and a message, in both schedules."""
    prompt = random_prompts([50], seed=5)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, logprobs=1)
    short = generate_both(smollm2, prompt, params, context_length=64)
    assert_same(short[True], short[False], top_n=1)
    assert len(short[True][0].token_ids) == 14 and short[True][0].finish_reason == "length"
    small = generate_both(smollm2, prompt, params, max_total_tokens=64)
    assert_same(small[True], small[False], top_n=1)
    assert small[True][0].finish_message and small[True][0].finish_reason == "length"


def test_penalties_and_seeded_sampling(smollm2: LoadedModel) -> None:
    """Penalties count the values of earlier tokens, so their steps wait for the read-back;
    seeded rows draw their noise in the same order either way."""
    prompts = random_prompts([12, 25, 8], seed=6)
    params = [
        SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3, max_new_tokens=20),
        SamplingParams(
            temperature=0, frequency_penalty=0.7, presence_penalty=0.4, max_new_tokens=20
        ),
        SamplingParams(temperature=1.0, top_p=0.9, seed=9, max_new_tokens=20, logprobs=2),
    ]
    results = generate_both(smollm2, prompts, params)
    for a, b in zip(results[True], results[False], strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
    assert_outputs_match(results[True][2], results[False][2], exact=True, top_n=2)


def test_prompt_logprobs_and_scoring_only(smollm2: LoadedModel) -> None:
    prompts = random_prompts([33, 20], seed=7)
    params = [
        SamplingParams(max_new_tokens=0, prompt_logprobs=2),
        SamplingParams(temperature=0, max_new_tokens=5, prompt_logprobs=1, logprobs=1),
    ]
    results = generate_both(smollm2, prompts, params, chunked_prefill_size=16)
    for a, b in zip(results[True], results[False], strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for lp_a, lp_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert lp_a.keys() == lp_b.keys()
            assert max(abs(lp_a[k] - lp_b[k]) for k in lp_a) < 1e-4
    assert results[True][0].token_ids == [] and results[True][0].finish_reason == "length"


def drive_with_abort(llm: LLM, prompts: list[list[int]], victim: int, after: int) -> dict:
    """Step the engine by hand, abort request `victim` after `after` steps; returns each
    request's last output and every output streamed after the abort."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    last: dict[str, RequestOutput] = {}
    for _ in range(after):
        last.update((o.request_id, o) for o in engine.step())
    last[ids[victim]] = engine.abort(ids[victim])
    later = []
    while engine.has_unfinished_requests():
        later += engine.step()
        last.update((o.request_id, o) for o in later)
    return {"last": [last[i] for i in ids], "later": later, "victim": ids[victim]}


def test_abort_mid_run(smollm2: LoadedModel) -> None:
    """The aborted request's output is a prefix of its free run (one step behind with
    overlap), nothing of it streams after the abort, the others are unaffected."""
    prompts = random_prompts([21, 40, 13], seed=8)
    runs = {}
    for overlap in MODES:
        llm = make_llm(smollm2, overlap)
        runs[overlap] = drive_with_abort(llm, prompts, victim=1, after=5)
        assert_pool_whole(llm)
    free = make_llm(smollm2, False).generate(
        prompts[1], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    )[0]
    for run in runs.values():
        aborted = run["last"][1]
        assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 20
        assert aborted.token_ids == free.token_ids[: len(aborted.token_ids)]
        assert all(o.request_id != run["victim"] for o in run["later"])
    kept = [0, 2]
    assert_same([runs[True]["last"][i] for i in kept], [runs[False]["last"][i] for i in kept], 2)


def test_streamed_outputs_grow_one_token_at_a_time(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2, True)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    rid = engine.add_request(random_prompts([10], seed=9)[0], params)
    lengths = []
    while engine.has_unfinished_requests():
        lengths += [len(o.token_ids) for o in engine.step() if o.request_id == rid]
    assert lengths == [1, 2, 3, 4, 5, 6]
    assert engine.stats().num_steps == 6  # the last token is never fed back
    assert_pool_whole(llm)


def test_flag_and_info() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).overlap_schedule
    args = parser.parse_args(["--disable-overlap-schedule"])
    assert not engine_config_from_args(args).overlap_schedule
    assert engine_config_from_args(parser.parse_args([])).fused_gemv
    assert not engine_config_from_args(parser.parse_args(["--disable-fused-gemv"])).fused_gemv


def test_engine_info_names_the_schedule(smollm2: LoadedModel) -> None:
    for overlap in MODES:
        assert make_llm(smollm2, overlap).engine.info.overlap_schedule is overlap
