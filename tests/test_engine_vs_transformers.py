"""The whole engine (paged cache, chunked prefill, decode) against transformers, fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import load_model

PROMPT_LEN = 256
DECODE_STEPS = 16


@pytest.mark.slow
def test_smollm2_engine_matches_transformers(smollm2_gguf) -> None:
    loaded = load_model(str(smollm2_gguf), dtype="float32", device="cpu")
    config = EngineConfig(
        device="cpu",
        dtype="float32",
        cache=CacheConfig(page_size=16, max_total_tokens=1024),
        scheduler=SchedulerConfig(chunked_prefill_size=100),  # 256 tokens -> 3 chunks
    )
    llm = LLM.from_engine_config(config, loaded)
    captured: list[torch.Tensor] = []
    prompt = torch.randint(100, 49152, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(
        temperature=0, max_new_tokens=DECODE_STEPS + 1, ignore_eos=True, prompt_logprobs=0
    )
    with llm.engine.logits_hook(lambda logits: captured.append(logits.clone())):
        out = llm.generate([prompt.tolist()], params)[0]
    ours = torch.cat(captured).log_softmax(-1)  # positions 0 .. 255 + 16 decode steps

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    full = torch.tensor([prompt.tolist() + out.token_ids[:-1]])
    with torch.inference_mode():
        theirs = hf(full).logits[0].float().log_softmax(-1)
    assert ours.shape == theirs.shape == (PROMPT_LEN + DECODE_STEPS, 49152)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Greedy: every generated token is the argmax of transformers' distribution too.
    assert theirs[PROMPT_LEN - 1 :].argmax(-1).tolist() == out.token_ids
