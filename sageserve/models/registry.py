"""Architecture name -> model class."""

from __future__ import annotations

from sageserve.models.config import ModelConfig
from sageserve.models.llama import LlamaForCausalLM

# One class serves the whole Llama family; the config carries the differences (biases, ties).
SUPPORTED_ARCHITECTURES: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class_for(config: ModelConfig) -> type:
    """The class implementing `config.architecture`; ValueError naming the supported ones."""
    try:
        return SUPPORTED_ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        ) from None
