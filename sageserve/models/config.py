"""ModelConfig: the architecture facts the model layer needs, parsed from a HF config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sageserve.attention.base import AttentionShape

# HF architecture name -> (model_type written back by to_hf_config, q/k/v biases).
_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}
# Rope variants whose frequencies depend only on the config (not on the sequence length).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(sorted(_ARCHITECTURES))}"
            )
        if self.num_q_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check_rope_scaling(self.rope_scaling_dict)

    def attention_shape(self) -> AttentionShape:
        """What an attention backend is told about this model."""
        return AttentionShape(
            num_layers=self.num_layers,
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
        )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """The HF-style rope_scaling dict (with "rope_type"), or None for plain rotary."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Parse a HF config.json dict (legacy rope_theta/rope_scaling or v5 rope_parameters).

        Raises ValueError for an unsupported architecture or any feature this model lacks
        (active sliding window, unknown rope scaling, non-SiLU activation, MLP biases, ...).
        """
        architecture = _architecture(hf)
        _check_unsupported_features(hf)
        rope_theta, rope_scaling = _rope(hf)
        heads = hf["num_attention_heads"]
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_q_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rope_scaling=_freeze(rope_scaling),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_ARCHITECTURES[architecture][1] or bool(hf.get("attention_bias")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers' AutoConfig reads back to the same model."""
        eos = list(self.eos_token_ids)
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _ARCHITECTURES[self.architecture][0],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_q_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }
        if self.architecture == "LlamaForCausalLM":
            hf["attention_bias"] = self.attention_bias
        if self.architecture != "LlamaForCausalLM":
            hf["sliding_window"] = None
        return hf


def _architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in _ARCHITECTURES:
            return name
    raise ValueError(
        f"unsupported architecture {names or hf.get('model_type')!r}; "
        f"supported: {', '.join(sorted(_ARCHITECTURES))}"
    )


def _check_unsupported_features(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; supported: 'silu'")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    window = hf.get("sliding_window")
    # Qwen2 only slides when use_sliding_window is set; Mistral slides whenever the window
    # is shorter than the context.
    sliding = hf.get("use_sliding_window", True)
    if sliding and window is not None and window < hf["max_position_embeddings"]:
        raise ValueError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{hf['max_position_embeddings']}) is not supported"
        )


def _rope(hf: dict) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the legacy or the v5 config layout."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = dict(hf.get("rope_scaling") or params)
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    required = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}.get(rope_type, ())
    missing = [key for key in required if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _freeze(scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if scaling is None:
        return None
    return tuple(sorted((key, _freeze_value(value)) for key, value in scaling.items()))


def _freeze_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)
