"""Teacher-forced log-probabilities through the engine (torch backend) vs transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel, load_model
from sageserve.validate.metrics import perplexity, target_logprobs
from sageserve.validate.teacher_forced import teacher_forced_logprobs

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
    ours = teacher_forced_logprobs(engine, tokens)
    theirs = _hf_logprobs(smollm2_gguf, tokens)
    assert ours.shape == (NUM_TOKENS - 1, 49152) and ours.dtype == torch.float32
    assert ours.device.type == "cpu"
    assert (ours - theirs).abs().max().item() <= 1e-4
    targets = torch.tensor(tokens[1:])
    ppl_ours = perplexity(target_logprobs(ours, targets))
    assert ppl_ours == pytest.approx(perplexity(target_logprobs(theirs, targets)), rel=1e-3)
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm.check_invariants()


def test_pages_are_freed_on_error(engine, tokens, monkeypatch) -> None:
    def failing_forward(batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        teacher_forced_logprobs(engine, tokens)
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages


def test_rejects_what_cannot_be_scored(engine) -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        teacher_forced_logprobs(engine, [5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        teacher_forced_logprobs(engine, [5, 49152])
    with pytest.raises(ValueError, match="max-total-tokens"):
        teacher_forced_logprobs(engine, [5] * 300)  # the pool holds 256 tokens


def test_refuses_a_busy_engine(engine) -> None:
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=1))
    try:
        with pytest.raises(AssertionError, match="idle"):
            teacher_forced_logprobs(engine, [5, 6, 7])
    finally:
        engine.abort(request_id)
