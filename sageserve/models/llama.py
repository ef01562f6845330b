"""The Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v biases), SmolLM2 (tied).

Tokens of many sequences are flattened into one dimension T; attention (and the KV cache
behind it) is delegated to the per-step `AttentionContext`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sageserve.attention.context import AttentionContext
from sageserve.layers.activation import silu_and_mul
from sageserve.layers.fused.silu_mul import silu_mul
from sageserve.layers.linear import DecodeLinear, MergedLinear
from sageserve.layers.rmsnorm import RMSNorm
from sageserve.layers.rotary import RotaryEmbedding, Rotation
from sageserve.models.config import ModelConfig

# HF projection name -> (our fused module name, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Buffers some old checkpoints saved; recomputed here, so skipped on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_q_heads, self.num_kv_heads = config.num_q_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            [config.q_size, config.kv_size, config.kv_size],
            bias=config.attention_bias,
        )
        self.o_proj = DecodeLinear(config.q_size, config.hidden_size, bias=False)
        self.splits = [config.q_size, config.kv_size, config.kv_size]

    def forward(self, x: torch.Tensor, rotation: Rotation, attn: AttentionContext) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q, k = rotation(
            q.view(tokens, self.num_q_heads, self.head_dim),
            k.view(tokens, self.num_kv_heads, self.head_dim),
        )
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = attn.attend(self.layer_id, q, k, v)
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [inter, inter], bias=False)
        self.down_proj = DecodeLinear(inter, config.hidden_size, bias=False)
        self.use_triton = False  # silu(gate) * up in one fused kernel (layers/fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> down(silu(gate(x)) * up(x)) [T, hidden]."""
        gate_up = self.gate_up_proj(x)
        activation = silu_mul if self.use_triton else silu_and_mul
        return self.down_proj(activation(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotation: Rotation,
        attn: AttentionContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block on [T, hidden]. Returns (mlp output, residual stream before it);
        the next layer's norm adds them, saving one add per layer."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rotation, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling_dict,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, hidden]."""
        rotation = self.rotary_emb.at(positions)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, rotation, attn)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Causal LM head over `LlamaModel`; parameters load from HF names (see `load_weights`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext
    ) -> torch.Tensor:
        """input_ids, positions [T] int64 (absolute position within each token's sequence)
        -> hidden [T, hidden]. Each layer i calls attn.attend(i, q, k, v)."""
        return self.model(input_ids, positions, attn)

    def use_triton_layers(self, enabled: bool) -> None:
        """Run RMSNorm (+ residual add), rotary and SiLU-mul as fused Triton kernels
        (layers/fused; CUDA, or Triton's interpreter) or as torch ops (the default)."""
        for module in self.modules():
            if isinstance(module, RMSNorm | LlamaMLP | RotaryEmbedding):
                module.use_triton = enabled

    def use_triton_gemv(self, enabled: bool) -> None:
        """Compute the decoder layers' projections of a step of 1 to 4 rows (small-batch
        decode) with the Triton GEMV (layers/fused/gemv.py) or with `F.linear` (the
        default). The LM head keeps `F.linear`: it reads at the copy bandwidth already
        (lab/gemv_probe.py)."""
        for module in self.model.layers.modules():
            if isinstance(module, DecodeLinear):
                module.use_gemv = enabled

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return F.linear(hidden, head.weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF name, tensor) pairs into the (possibly fused) parameters.

        Raises ValueError on an unknown name, a shape mismatch, or a parameter left unloaded.
        """
        params = dict(self.named_parameters())
        expected = set(hf_weight_names(self.config))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (
                name == "lm_head.weight" and self.config.tie_word_embeddings
            ):
                continue
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            target = _target(self, params, name)
            target.copy_(_checked(name, tensor, target))
            loaded.add(name)
        missing = expected - loaded
        if missing:
            raise ValueError(
                f"{len(missing)} weights missing from checkpoint: {sorted(missing)[:5]}"
            )


def _target(model: nn.Module, params: dict[str, nn.Parameter], hf_name: str) -> torch.Tensor:
    """The parameter (or fused-parameter rows) that HF weight `hf_name` fills."""
    parts = hf_name.split(".")
    if len(parts) < 3 or parts[-2] not in _STACKED:
        return params[hf_name]
    prefix, kind = ".".join(parts[:-2]), parts[-1]
    fused, index = _STACKED[parts[-2]]
    module: MergedLinear = model.get_submodule(f"{prefix}.{fused}")
    return module.shard(params[f"{prefix}.{fused}.{kind}"], index)


def _checked(name: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if tensor.shape != target.shape:
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
        )
    return tensor


def hf_weight_names(config: ModelConfig) -> list[str]:
    """Every HF parameter name a checkpoint of `config` must provide."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{layer}.self_attn.{proj}.weight")
        if config.attention_bias:
            names += [f"{layer}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
        names += [f"{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{layer}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    return names
