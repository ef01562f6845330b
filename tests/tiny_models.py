"""Shapes of tiny random Llama models that the tests build (one place for their fields)."""

from __future__ import annotations

from sageserve.models.config import ModelConfig


def tiny_llama_config(
    num_q_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64, **overrides
) -> ModelConfig:
    """A LlamaForCausalLM config of hidden size num_q_heads * head_dim, 2 layers, untied
    embeddings, no BOS or EOS; `overrides` replaces any other field."""
    fields = dict(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=num_q_heads * head_dim,
        intermediate_size=256, num_layers=2, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, rope_theta=10000.0, rope_scaling=None,
        rms_norm_eps=1e-5, max_position_embeddings=1024, tie_word_embeddings=False,
        attention_bias=False, bos_token_id=None, eos_token_ids=(),
    )  # fmt: skip
    return ModelConfig(**(fields | overrides))
