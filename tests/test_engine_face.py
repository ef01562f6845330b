"""The engine's public face on SmolLM2 (fp32, CPU): info, stats, request ids, prefix-cache
flush, logits hooks. Teacher-forced scoring: test_teacher_forced.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.engine.memory_usage import tensor_bytes
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.warmup import prompts_beside_decodes, warmup_batches
from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.models.loader import LoadedModel, load_model

VOCAB = 49152
PAGE = 16
POOL_TOKENS = 256
CHUNK = 128


@pytest.fixture(scope="module")
def loaded(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def make_engine(loaded: LoadedModel) -> Engine:
    config = EngineConfig(
        device="cpu",
        dtype="float32",
        context_length=512,
        cache=CacheConfig(page_size=PAGE, max_total_tokens=POOL_TOKENS),
        scheduler=SchedulerConfig(chunked_prefill_size=CHUNK, max_running_requests=8),
    )
    return Engine(config, loaded)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def drain(engine: Engine) -> dict[str, RequestOutput]:
    """Step until idle; every request's final output by id."""
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    return finals


def greedy(new_tokens: int, **extra: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, **extra)


def test_info_describes_model_backend_pool_and_memory(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    info = engine.info
    assert (info.model_path, info.model_source) == (DEFAULT_MODEL, loaded.source)
    assert (info.attention_backend, info.kv_cache_dtype, info.dtype) == (
        "torch",
        "float32",
        "float32",
    )
    assert info.attention_kernels == "torch SDPA over the gathered pages"
    assert (info.device, info.page_size, info.pool_capacity_tokens) == ("cpu", PAGE, POOL_TOKENS)
    assert (info.context_length, info.vocab_size) == (512, VOCAB)
    assert (info.max_running_requests, info.chunked_prefill_size) == (8, CHUNK)
    assert info.enable_prefix_cache
    cfg = loaded.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    weights = sum(tensor_bytes(t) for t in (*loaded.model.parameters(), *loaded.model.buffers()))
    mem = info.memory
    assert (mem.kv_bytes_per_token, mem.kv_dtype, mem.weights_bytes) == (
        per_token,
        "float32",
        weights,
    )
    # The pool's tensors hold the null page too.
    assert mem.pool_bytes == (POOL_TOKENS + PAGE) * per_token
    assert mem.pool_capacity_tokens == POOL_TOKENS and mem.tokens_per_gib == 2**30 // per_token
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.page_size = 1  # type: ignore[misc]
    assert engine.tokenizer is loaded.tokenizer


def test_stats_follow_requests_and_pages(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    idle = engine.stats()
    usable = POOL_TOKENS // PAGE
    assert (idle.num_steps, idle.num_unfinished, idle.max_batch_seen) == (0, 0, 0)
    assert idle.num_free_pages == idle.num_usable_pages == usable
    assert idle.num_cached_pages == 0
    ids = [engine.add_request(p, greedy(3)) for p in random_prompts([40, 70], seed=11)]
    queued = engine.stats()
    assert (queued.num_waiting, queued.num_running, queued.num_unfinished) == (2, 0, 2)
    engine.step()  # both prefills in one step (110 tokens <= CHUNK)
    running = engine.stats()
    assert (running.num_waiting, running.num_running, running.max_batch_seen) == (0, 2, 2)
    assert running.num_free_pages == usable - 3 - 5  # ceil(40 / 16) + ceil(70 / 16)
    assert set(drain(engine)) == set(ids)
    done = engine.stats()
    assert (done.num_steps, done.num_unfinished, done.num_preemptions) == (3, 0, 0)
    # Computed tokens at the end: 40 + 2 and 70 + 2, whose full pages stay cached.
    assert done.num_cached_pages == 42 // PAGE + 72 // PAGE
    assert done.num_free_pages == usable


def test_request_ids_in_flight_and_abort(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    prompts = random_prompts([9, 25, 14], seed=12)
    ids = [engine.add_request(p, greedy(4), request_id=f"r{i}") for i, p in enumerate(prompts)]
    assert engine.request_ids() == ["r0", "r1", "r2"] == ids
    engine.step()
    final = engine.abort("r1")
    assert final is not None and final.finish_reason == "abort"
    assert engine.request_ids() == ["r0", "r2"]
    assert engine.abort("r1") is None
    assert set(drain(engine)) == {"r0", "r2"}
    assert engine.request_ids() == []


def test_only_streamed_requests_report_every_step(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    streamed, final_only = random_prompts([9, 14], seed=13)
    ids = [engine.add_request(streamed, greedy(5)),
           engine.add_request(final_only, greedy(5), stream=False)]  # fmt: skip
    seen: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [len(out.token_ids) for out in seen[ids[0]]] == [1, 2, 3, 4, 5]
    assert [(len(out.token_ids), out.finished) for out in seen[ids[1]]] == [(5, True)]
    assert seen[ids[1]][0].token_ids == drain_one(make_engine(loaded), final_only).token_ids


def drain_one(engine: Engine, prompt: list[int]) -> RequestOutput:
    engine.add_request(prompt, greedy(5))
    return next(iter(drain(engine).values()))


def test_flush_prefix_cache_forgets_idle_pages_keeps_used_ones(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    shared, other = random_prompts([50, 37], seed=13)
    first = _run(engine, shared, greedy(1))
    assert _run(engine, shared, greedy(1)).num_cached_tokens == 48  # 3 full pages
    engine.flush_prefix_cache()
    assert engine.stats().num_cached_pages == 0
    miss = _run(engine, shared, greedy(1))
    assert miss.num_cached_tokens == 0 and miss.token_ids == first.token_ids
    # A request in flight keeps its pages (and its output) through a flush.
    alone = _run(engine, other, greedy(6))
    engine.flush_prefix_cache()
    rid = engine.add_request(other, greedy(6))
    engine.step()
    engine.flush_prefix_cache()
    assert engine.stats().num_cached_pages == 2  # the running request's own full pages
    assert drain(engine)[rid].token_ids == alone.token_ids


def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> RequestOutput:
    rid = engine.add_request(prompt, params)
    return drain(engine)[rid]


def test_logits_hook_sees_each_step_while_held(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    prompts = random_prompts([20, 33], seed=14)
    seen: list[torch.Tensor] = []
    with engine.logits_hook(lambda logits: seen.append(logits.clone())):
        ids = [engine.add_request(p, greedy(4, logprobs=0)) for p in prompts]
        finals = drain(engine)
    assert [t.shape for t in seen] == [(2, VOCAB)] * 4  # one sampled row per request per step
    for row, rid in enumerate(ids):
        out = finals[rid]
        assert [step[row].argmax().item() for step in seen] == out.token_ids
        picked = zip(seen, out.token_ids, strict=True)
        logprobs = [step[row].log_softmax(-1)[t].item() for step, t in picked]
        reported = zip(out.logprobs, out.token_ids, strict=True)
        assert logprobs == pytest.approx([lp[t] for lp, t in reported])
    _run(engine, prompts[0], greedy(2))
    assert len(seen) == 4  # the hook is gone after its block


def test_logits_hooks_nest_see_scoring_and_leave_on_error(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    (tokens,) = random_prompts([200], seed=15)
    outer: list[torch.Size] = []
    inner: list[torch.Tensor] = []
    with engine.logits_hook(lambda logits: outer.append(logits.shape)):
        with engine.logits_hook(lambda logits: inner.append(logits.clone())):
            rows = engine.teacher_forced_logprobs(tokens)
        _run(engine, tokens[:10], greedy(1))
    # 199 inputs in chunks of 128 and 71, then one sampled row.
    assert outer == [(CHUNK, VOCAB), (71, VOCAB), (1, VOCAB)]
    torch.testing.assert_close(torch.cat(inner).log_softmax(-1), rows, rtol=0, atol=1e-6)
    with pytest.raises(KeyError), engine.logits_hook(lambda logits: outer.append(logits.shape)):
        raise KeyError("left the block")
    _run(engine, tokens[:10], greedy(1))
    assert len(outer) == 3


def test_a_closed_engine_refuses_work_but_keeps_its_info(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    info = engine.info
    engine.close()
    for call in (engine.stats, engine.flush_prefix_cache, engine.step):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with pytest.raises(RuntimeError, match="closed"):
        engine.teacher_forced_logprobs([5, 6, 7])
    assert engine.info == info and engine.request_ids() == []


def test_warm_up_leaves_the_engine_as_it_found_it(loaded: LoadedModel) -> None:
    """The CUDA warm-up (engine/warmup.py), run here on CPU: its batches fit the pool and
    context, and afterwards the pool is whole, the prefix cache empty, the counters zero, and
    a request's tokens are those of an engine that never warmed up."""
    prompts, params = random_prompts([9, 40], seed=5), greedy(6)
    cold = make_engine(loaded)
    ids = [cold.add_request(p, params) for p in prompts]
    finals = drain(cold)
    want = [finals[i].token_ids for i in ids]
    engine = make_engine(loaded)
    # pool 256 tokens: a 4 x 200-token batch and a 261-token prompt do not fit; then 2 and
    # 4 short prompts (decode widths), single prompts of 64 tokens up to one chunk (128)
    lengths = [[len(p) for p in b] for b in warmup_batches(engine)]
    assert lengths == [[1, 7, 16], [33], [5] * 2, [5] * 4, [64], [128]]
    engine._warm_up()
    stats = engine.stats()
    assert (stats.num_steps, stats.max_batch_seen, stats.num_cached_pages) == (0, 0, 0)
    assert stats.num_free_pages == stats.num_usable_pages and not engine.request_ids()
    ids = [engine.add_request(p, params) for p in prompts]
    finals = drain(engine)
    assert [finals[i].token_ids for i in ids] == want


def test_warm_up_runs_capped_chunks_beside_decodes(loaded: LoadedModel) -> None:
    """With a prefill cap while decoding, the warm-up makes the steps that cap makes: a
    chunk of `cap` tokens over a cached prefix beside 1, 7 and 16 decoding requests; the
    engine is whole afterwards. Without a cap (CPU's default) it makes none."""
    assert prompts_beside_decodes(make_engine(loaded)) == []
    base = make_engine(loaded)._config
    config = dataclasses.replace(
        base, cache=CacheConfig(page_size=PAGE, max_total_tokens=4096),
        scheduler=dataclasses.replace(base.scheduler, max_running_requests=32,
                                      max_prefill_tokens_while_decoding=40),
    )  # fmt: skip
    engine = Engine(config, loaded)
    plans = prompts_beside_decodes(engine)
    assert [(len(d), len(late)) for d, late in plans] == [(1, 97), (7, 97), (16, 97)]
    seen = []
    schedule = engine._scheduler.schedule

    def recording_schedule():
        out = schedule()
        decodes = sum(c.request.num_computed_tokens >= c.request.num_prompt_tokens
                      for c in out.chunks)  # fmt: skip
        chunks = [(c.request.num_computed_tokens, c.num_new_tokens) for c in out.chunks
                  if c.num_new_tokens > 1]  # fmt: skip
        seen.append((decodes, chunks))
        return out

    engine._scheduler.schedule = recording_schedule
    engine._warm_up()
    for count in (1, 7, 16):
        assert (count, [(40, 40)]) in seen, seen
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and not engine.request_ids()


def test_warm_up_fills_the_step_budget_when_the_context_is_shorter(loaded) -> None:
    """A context shorter than the step budget: the widest warm-up step is several prompts
    that fill the budget (concurrent requests make such steps; on an H100 the KV store's
    widest launch compiled on the first burst of requests), and the engine is whole after."""
    config = dataclasses.replace(make_engine(loaded)._config, context_length=90)
    engine = Engine(config, loaded)
    lengths = [[len(p) for p in b] for b in warmup_batches(engine)]
    assert lengths == [[1, 7, 16], [33], [5] * 2, [5] * 4, [64], [87, 41]]
    seen = []
    schedule = engine._scheduler.schedule

    def recording_schedule():
        out = schedule()
        seen.append(sum(c.num_new_tokens for c in out.chunks))
        return out

    engine._scheduler.schedule = recording_schedule
    engine._warm_up()
    assert max(seen) == CHUNK, seen
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and not engine.request_ids()


def test_warm_up_batches_grow_with_the_pool(loaded: LoadedModel) -> None:
    config = dataclasses.replace(
        make_engine(loaded)._config, cache=CacheConfig(page_size=PAGE, max_total_tokens=4096)
    )
    engine = Engine(config, loaded)
    lengths = [[len(p) for p in b] for b in warmup_batches(engine)]
    # context 512 bounds the mixed batch
    assert lengths == [[1, 7, 16], [2 * CHUNK + 5], [33], [5] * 2, [5] * 4, [64],
                       [CHUNK]]  # fmt: skip
