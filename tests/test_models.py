"""Our Llama-family model vs transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from sageserve.layers.rotary import inverse_frequencies
from sageserve.models.config import ModelConfig
from sageserve.models.llama import LlamaForCausalLM
from sageserve.models.loader import LoadedModel, load_model

PROMPT_LEN = 256
DECODE_STEPS = 16
TOLERANCE = 1e-4


class DenseCausalContext:
    """Test-only AttentionContext: one sequence, exact causal attention, K/V kept across calls."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; queries are the last T positions."""
        if self.keys[layer_id] is not None:
            k = torch.cat([self.keys[layer_id], k])
            v = torch.cat([self.values[layer_id], v])
        self.keys[layer_id], self.values[layer_id] = k, v
        new, total = q.shape[0], k.shape[0]
        # Bottom-right aligned: query i (position total - new + i) sees keys 0..its position.
        mask = torch.ones(new, total, dtype=torch.bool).tril(diagonal=total - new)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
        )
        return out.transpose(0, 1)


@torch.no_grad()
def ours_prefill_then_decode(
    model: LlamaForCausalLM, ids: torch.Tensor, prompt_len: int = PROMPT_LEN
) -> torch.Tensor:
    """Log-softmax [len(ids), vocab]: a prompt_len prefill, then one-token decode steps."""
    attn = DenseCausalContext(model.config.num_layers)
    hidden = model(ids[:prompt_len], torch.arange(prompt_len), attn)
    outputs = [model.compute_logits(hidden)]
    for pos in range(prompt_len, ids.shape[0]):
        hidden = model(ids[pos : pos + 1], torch.tensor([pos]), attn)
        outputs.append(model.compute_logits(hidden))
    return torch.cat(outputs).log_softmax(-1)


@torch.no_grad()
def reference_logprobs(hf_model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' log-softmax over the full sequence in one pass."""
    return hf_model(ids[None]).logits[0].float().log_softmax(-1)


def random_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (PROMPT_LEN + DECODE_STEPS,), generator=generator)


def assert_matches_reference(
    model: LlamaForCausalLM,
    hf_model: torch.nn.Module,
    prompt_len: int = PROMPT_LEN,
    decode_steps: int = DECODE_STEPS,
) -> None:
    ids = random_ids(model.config.vocab_size)[: prompt_len + decode_steps]
    ours = ours_prefill_then_decode(model, ids, prompt_len)
    ref = reference_logprobs(hf_model, ids)
    assert ours.shape == ref.shape == (prompt_len + decode_steps, model.config.vocab_size)
    # The comparison is meaningless if the distributions are flat.
    assert ref.max(-1).values.mean() > ref.mean() + 1.0
    assert (ours - ref).abs().max().item() <= TOLERANCE


def ours_from_hf(hf_model: transformers.PreTrainedModel) -> LlamaForCausalLM:
    config = ModelConfig.from_hf_config(hf_model.config.to_dict())
    model = LlamaForCausalLM(config).eval()
    model.load_weights(hf_model.state_dict().items())
    return model


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(None)  # the default model: SmolLM2-135M-Instruct from its GGUF


def test_smollm2_from_gguf_matches_transformers(smollm2: LoadedModel) -> None:
    hf_config = transformers.LlamaConfig(**smollm2.config.to_hf_config())
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {
        name: tensor
        for name, tensor in smollm2.model.state_dict().items()
        if "qkv_proj" not in name and "gate_up_proj" not in name
    }
    state |= _unfused(smollm2.model)
    hf_model.load_state_dict(state, strict=False)
    hf_model.tie_weights()
    assert smollm2.config.tie_word_embeddings
    assert_matches_reference(smollm2.model, hf_model)


def _unfused(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF-named q/k/v and gate/up weights split back out of our fused parameters."""
    state = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
        for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{prefix}.self_attn.{proj}.weight"] = qkv.shard(qkv.weight, index)
        for index, proj in enumerate(("gate_proj", "up_proj")):
            state[f"{prefix}.mlp.{proj}.weight"] = gate_up.shard(gate_up.weight, index)
    return state


def _tiny_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # large enough that attention is far from uniform
        tie_word_embeddings=False,
    )
    return kwargs | overrides


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # far below the 272 positions tested
}


def test_tiny_llama31_with_llama3_rope_matches_transformers() -> None:
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        **_tiny_kwargs(rope_theta=10000.0, rope_scaling=LLAMA3_SCALING),
        architectures=["LlamaForCausalLM"],
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    model = ours_from_hf(hf_model)
    assert model.config.rope_scaling_dict["rope_type"] == "llama3"
    # The scaling must actually change some frequencies for this test to mean anything.
    plain = inverse_frequencies(model.config.head_dim, 10000.0, None)
    scaled = inverse_frequencies(model.config.head_dim, 10000.0, LLAMA3_SCALING)
    assert not torch.allclose(plain, scaled)
    assert_matches_reference(model, hf_model)


def test_tiny_qwen2_with_biases_matches_transformers() -> None:
    torch.manual_seed(1)
    hf_config = transformers.Qwen2Config(
        **_tiny_kwargs(rope_theta=1000000.0), architectures=["Qwen2ForCausalLM"]
    )
    hf_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises biases to zero, which would test nothing
        for name, param in hf_model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model = ours_from_hf(hf_model)
    assert model.config.attention_bias
    assert_matches_reference(model, hf_model)


def test_tiny_mistral_matches_transformers() -> None:
    torch.manual_seed(2)
    hf_config = transformers.MistralConfig(
        **_tiny_kwargs(sliding_window=None, head_dim=32), architectures=["MistralForCausalLM"]
    )
    hf_model = transformers.MistralForCausalLM(hf_config).eval()
    assert_matches_reference(ours_from_hf(hf_model), hf_model)


def test_tiny_llama31_with_fused_triton_layers_matches_transformers() -> None:
    """The fused RMSNorm, rotary and SiLU-mul kernels and the GEMV (Triton's interpreter on
    CPU) in a whole model: prefill, then decode steps, against transformers. A 3-token
    prompt: its prefill takes the GEMV's 4-row tile with a padding row, the decode steps
    its one-row tile (and the interpreter runs one program per token and layer)."""
    torch.manual_seed(3)
    hf_config = transformers.LlamaConfig(
        **_tiny_kwargs(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
        architectures=["LlamaForCausalLM"],
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    model = ours_from_hf(hf_model)
    model.use_triton_layers(True)
    model.use_triton_gemv(True)
    fused = [m for m in model.modules() if getattr(m, "use_triton", False)]
    assert len(fused) == 2 * 2 + 1 + 2 + 1  # norms, final norm, MLPs, rotary
    gemvs = [m for m in model.modules() if getattr(m, "use_gemv", False)]
    assert len(gemvs) == 2 * 4  # qkv, o, gate_up, down: products of up to 4 rows
    assert_matches_reference(model, hf_model, prompt_len=3, decode_steps=4)
