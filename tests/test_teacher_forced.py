"""`Engine.teacher_forced_logprobs` (torch backend) vs transformers, and its page borrowing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel, load_model
from sageserve.validate.metrics import perplexity, target_logprobs

NUM_TOKENS = 100
CHUNK = 32  # 99 inputs -> chunks of 32, 32, 32, 3: three of them after a cached prefix


@pytest.fixture(scope="module")
def loaded(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def engine(loaded) -> Engine:
    config = EngineConfig(
        device="cpu",
        dtype="float32",
        cache=CacheConfig(page_size=16, max_total_tokens=256),
        scheduler=SchedulerConfig(chunked_prefill_size=CHUNK),
    )
    return Engine(config, loaded)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 49152, (NUM_TOKENS,), generator=gen).tolist()


def _hf_logprobs(smollm2_gguf, tokens: list[int]) -> torch.Tensor:
    """transformers' log_softmax at positions 0 .. n-2: [n - 1, vocab]."""
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([tokens])).logits[0, :-1].float()
    return logits.log_softmax(-1)


# NOTE: one test, so that pytest-xdist loads transformers' model in one worker only.
def test_matches_transformers_and_frees_the_pool(engine, tokens, smollm2_gguf) -> None:
    ours = engine.teacher_forced_logprobs(tokens)
    theirs = _hf_logprobs(smollm2_gguf, tokens)
    assert ours.shape == (NUM_TOKENS - 1, 49152) and ours.dtype == torch.float32
    assert ours.device.type == "cpu"
    assert (ours - theirs).abs().max().item() <= 1e-4
    targets = torch.tensor(tokens[1:])
    ppl_ours = perplexity(target_logprobs(ours, targets))
    assert ppl_ours == pytest.approx(perplexity(target_logprobs(theirs, targets)), rel=1e-3)
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and stats.num_cached_pages == 0
    engine._block_manager.check_invariants()  # the borrowed pages left no trace


def test_pages_are_freed_on_error(engine, tokens) -> None:
    calls = []

    def failing_hook(logits: torch.Tensor) -> None:
        calls.append(logits.shape)
        if len(calls) == 2:  # the second chunk, with the first one's pages in the cache
            raise RuntimeError("boom")

    with engine.logits_hook(failing_hook), pytest.raises(RuntimeError, match="boom"):
        engine.teacher_forced_logprobs(tokens)
    assert calls == [(CHUNK, 49152)] * 2
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages


def test_rejects_what_cannot_be_scored(engine) -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        engine.teacher_forced_logprobs([5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.teacher_forced_logprobs([5, 49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.teacher_forced_logprobs([-1, 5])
    with pytest.raises(ValueError, match="max-total-tokens"):
        engine.teacher_forced_logprobs([5] * 300)  # the pool holds 256 tokens


def test_refuses_a_busy_engine(engine) -> None:
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=1))
    try:
        with pytest.raises(RuntimeError, match="idle"):
            engine.teacher_forced_logprobs([5, 6, 7])
    finally:
        engine.abort(request_id)
    assert engine.teacher_forced_logprobs([5, 6, 7]).shape == (2, 49152)  # idle again
