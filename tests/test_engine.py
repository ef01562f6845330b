"""The engine end to end on SmolLM2 (fp32, CPU): exact `torch` attention and 8-bit `sage_attn`."""

from __future__ import annotations

import pytest
import torch
from int8_flips import assert_outputs_match

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel, load_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def make_llm(
    loaded: LoadedModel,
    *,
    backend: str = "torch",
    max_total_tokens: int = 8192,
    page_size: int = 16,
    chunked_prefill_size: int = 2048,
    enable_prefix_cache: bool = True,
) -> LLM:
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        attention_backend=backend,
        cache=CacheConfig(
            page_size=page_size,
            max_total_tokens=max_total_tokens,
            enable_prefix_cache=enable_prefix_cache,
        ),
        scheduler=SchedulerConfig(chunked_prefill_size=chunked_prefill_size),
    )
    return LLM.from_engine_config(config, loaded)


def random_prompts(lengths: list[int], seed: int, vocab: int = 49152) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Skip the first ids (special tokens) so prompts look like text to the model.
    return [torch.randint(100, vocab, (n,), generator=gen).tolist() for n in lengths]


def assert_pool_whole(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_free_pages == stats.num_usable_pages


BACKENDS = ["torch", "sage_attn"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_alone(smollm2: LoadedModel, backend: str) -> None:
    prompts = random_prompts([1, 7, 20, 33, 64, 100, 150, 200], seed=1)
    llm = make_llm(smollm2, backend=backend, chunked_prefill_size=64)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, logprobs=2)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    for t, a in zip(together, alone, strict=True):
        assert len(t.token_ids) == 16 and t.finish_reason == "length"
        assert_outputs_match(t, a, exact=backend == "torch", top_n=2)
    assert_pool_whole(llm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_hit_matches_miss(smollm2: LoadedModel, backend: str) -> None:
    """The prefix's K/V came from a GEMM over another batch shape (the first prompt), so on
    the 8-bit path a code may flip (int8_flips.py); the torch backend stays exact."""
    shared, tail_a, tail_b = random_prompts([70, 9, 13], seed=2)
    params = SamplingParams(temperature=0, max_new_tokens=8, logprobs=5, ignore_eos=True)
    cached = make_llm(smollm2, backend=backend)
    cached.generate([shared + tail_a], params)
    hit = cached.generate([shared + tail_b], params)[0]
    assert hit.num_cached_tokens == 64  # the 4 full pages of the shared prefix
    no_cache = make_llm(smollm2, backend=backend, enable_prefix_cache=False)
    miss = no_cache.generate([shared + tail_b], params)[0]
    assert miss.num_cached_tokens == 0
    assert_outputs_match(hit, miss, exact=backend == "torch", top_n=5)
    assert_pool_whole(cached)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_under_tiny_pool_gives_same_outputs(smollm2: LoadedModel, backend: str) -> None:
    prompts = random_prompts([40, 45, 50, 35], seed=3)
    """A preempted request is recomputed in other chunks (another GEMM shape: on the 8-bit
    path a code may flip, int8_flips.py)."""
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, logprobs=2)
    big = make_llm(smollm2, backend=backend).generate(prompts, params)
    tiny_llm = make_llm(smollm2, backend=backend, max_total_tokens=160, chunked_prefill_size=32)
    tiny = tiny_llm.generate(prompts, params)
    assert tiny_llm.engine.stats().num_preemptions > 0
    for t, b in zip(tiny, big, strict=True):
        assert_outputs_match(t, b, exact=backend == "torch", top_n=2)
    assert_pool_whole(tiny_llm)


def test_seeded_sampling_is_batch_independent(smollm2: LoadedModel) -> None:
    prompts = random_prompts([12, 30, 5], seed=4)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=12)
    others = SamplingParams(temperature=1.2, top_k=50, max_new_tokens=20)
    llm = make_llm(smollm2)
    alone = llm.generate([prompts[0]], seeded)[0]
    batched = llm.generate(prompts, [seeded, others, others])[0]
    again = llm.generate([prompts[0]], seeded)[0]
    assert alone.token_ids == batched.token_ids == again.token_ids
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=8, max_new_tokens=12)
    assert llm.generate([prompts[0]], other_seed)[0].token_ids != alone.token_ids


def test_abort_frees_pages(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in random_prompts([50, 60], seed=5)]
    engine.step()
    engine.step()
    stats = engine.stats()
    assert stats.num_free_pages < stats.num_usable_pages
    final = engine.abort(ids[0])
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert engine.abort("no-such-request") is None
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_whole(llm)


def test_stop_conditions(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2)
    prompt = "The capital of France is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert "Paris" in free.text
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, stop="aris"))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "aris"
    assert cut.text == free.text[: free.text.index("aris")]
    first = free.token_ids[0]
    by_id = llm.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[first])
    )[0]
    assert by_id.token_ids == [first] and by_id.stop_reason == first
    held = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[first], min_new_tokens=3),
    )[0]
    assert held.token_ids[0] != first and len(held.token_ids) >= 3


def test_chat_answers_paris(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_new_tokens=32),
    )[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|>


def test_prompt_logprobs_and_scoring_only(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2, chunked_prefill_size=16)
    prompt = random_prompts([40], seed=6)[0]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=3, logprob_start_len=10)
    out = llm.generate([prompt], params)[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    lps = out.prompt_logprobs
    assert len(lps) == 40 and all(lp is None for lp in lps[:10])
    for pos in range(10, 40):
        assert prompt[pos] in lps[pos] and 3 <= len(lps[pos]) <= 4
    assert_pool_whole(llm)


def test_user_errors_are_value_errors(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2, max_total_tokens=256)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 9000], GREEDY)
    with pytest.raises(ValueError, match="KV pool"):
        llm.generate([[5] * 300], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="valid backends"):
        LLM.from_engine_config(EngineConfig(attention_backend="nope", device="cpu"), smollm2)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")


def test_logit_bias_is_checked_against_vocab_and_steers_greedy(smollm2: LoadedModel) -> None:
    llm = make_llm(smollm2, max_total_tokens=256)
    vocab = smollm2.config.vocab_size
    prompt = random_prompts([12], seed=7)[0]
    params = dict(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=1)
    with pytest.raises(ValueError, match=rf"logit_bias \[{vocab}\] .*\[0, {vocab}\)"):
        llm.generate([prompt], SamplingParams(**params, logit_bias={3: 1.0, vocab: -1.0}))
    assert_pool_whole(llm)  # the refused request left nothing behind
    plain = llm.generate([prompt], SamplingParams(**params))[0]
    gen = torch.Generator().manual_seed(8)
    target = next(
        t
        for t in torch.randint(100, vocab, (10,), generator=gen).tolist()
        if t not in plain.token_ids
    )
    forced = llm.generate([prompt], SamplingParams(**params, logit_bias={str(target): 100}))[0]
    assert forced.token_ids == [target] * 6
    # Logprobs are the raw distribution's: the bias changed the pick, not its reported logprob.
    assert forced.logprobs[0][target] < plain.logprobs[0][plain.token_ids[0]]
    banned = llm.generate([prompt], SamplingParams(**params, logit_bias={plain.token_ids[0]: -100}))
    assert banned[0].token_ids[0] != plain.token_ids[0]
    assert_pool_whole(llm)


def test_validate_engine_frees_its_pool_while_still_named(smollm2: LoadedModel) -> None:
    """`built_engine` frees the pool on exit though the caller's `as` name still holds the
    engine (on a GPU the next engine's pool is sized from the memory left)."""
    import gc
    import weakref

    from sageserve.validate.workload import built_engine

    base = EngineConfig(dtype="float32", device="cpu", cache=CacheConfig(max_total_tokens=256))
    with built_engine(base, "torch", smollm2) as engine:
        engine.add_request([5, 6, 7], GREEDY)
        engine.step()
        pool = weakref.ref(engine._runner.kv_cache)  # the pool itself: what close() frees
    gc.collect()
    assert pool() is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()
