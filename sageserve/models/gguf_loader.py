"""Model config and dequantized HF-named weights from a GGUF file (via the `gguf` package)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, ReaderTensor, get_tensor_name_map
from gguf.quants import dequantize

from sageserve.models.config import ModelConfig
from sageserve.models.llama import hf_weight_names

Q = GGMLQuantizationType
SUPPORTED_QUANT_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K,
)  # fmt: skip
# general.architecture -> (HF architecture, gguf arch enum, whether llama.cpp permuted Q/K rows).
_ARCHITECTURES: dict[str, tuple[str, MODEL_ARCH, bool]] = {
    "llama": ("LlamaForCausalLM", MODEL_ARCH.LLAMA, True),
    "qwen2": ("Qwen2ForCausalLM", MODEL_ARCH.QWEN2, False),
}
_MISSING = object()


def _field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is _MISSING:
        raise ValueError(f"GGUF metadata lacks required key {key!r}")
    return default


def gguf_architecture(reader: GGUFReader) -> str:
    """general.architecture, checked against the supported ones."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """ModelConfig from GGUF metadata, via an HF-style dict so the same validation applies."""
    return ModelConfig.from_hf_config(hf_config_from_gguf(reader))


def hf_config_from_gguf(reader: GGUFReader) -> dict[str, Any]:
    """The HF config.json equivalent of the GGUF's `{arch}.*` and `tokenizer.ggml.*` keys."""
    arch = gguf_architecture(reader)
    _reject_rope_freqs(reader)
    tensors = {t.name: t for t in reader.tensors}
    hidden = _field(reader, f"{arch}.embedding_length")
    heads = _field(reader, f"{arch}.attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary (rope dim {rope_dim} < head dim {head_dim}) unsupported")
    return {
        "architectures": [_ARCHITECTURES[arch][0]],
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
        "sliding_window": _field(reader, f"{arch}.attention.sliding_window", None),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _eos_ids(reader),
    }


def _reject_rope_freqs(reader: GGUFReader) -> None:
    # Llama 3.1 GGUFs carry their rope scaling as a precomputed `rope_freqs` tensor.
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            "GGUF rope_freqs (Llama 3.1 rope scaling) is not supported; load the HF "
            "safetensors checkpoint instead"
        )


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    raise ValueError(f"unsupported GGUF rope scaling {kind!r}; supported: none, linear")


def _eos_ids(reader: GGUFReader) -> list[int]:
    """EOS plus end-of-turn, when the file names one (both end a generation)."""
    ids = [_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch order (GGUF lists dims fastest-first)."""
    if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
        raise ValueError(
            f"tensor {tensor.name!r} has unsupported GGUF type {tensor.tensor_type.name}; "
            f"supported: {', '.join(q.name for q in SUPPORTED_QUANT_TYPES)}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    # F32 data is a read-only view of the memory-mapped file; torch wants writable arrays.
    return np.require(values, requirements="W")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved -> HF rotate_half rotary layout).

    weight: [num_heads * head_dim, ...] (a weight or a bias); same shape out.
    """
    rows = weight.shape[0]
    rest = weight.shape[1:]
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
    return split.transpose(1, 2).reshape(rows, *rest)


def gguf_weights(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, dequantized lazily one by one."""
    arch = gguf_architecture(reader)
    _, gguf_arch, permuted = _ARCHITECTURES[arch]
    names = _hf_names_by_gguf_name(config, gguf_arch)
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise ValueError(f"unexpected GGUF tensor {tensor.name!r} for {arch}")
        name = names[tensor.name]
        weight = torch.from_numpy(dequantize_tensor(tensor))
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_rotary(weight, config.num_q_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_rotary(weight, config.num_kv_heads)
        yield name, weight


def _hf_names_by_gguf_name(config: ModelConfig, arch: MODEL_ARCH) -> dict[str, str]:
    """GGUF tensor name -> HF name, using gguf's own HF<->GGUF name table."""
    table = get_tensor_name_map(arch, config.num_layers)
    mapping = {}
    for hf_name in hf_weight_names(config):
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf has no tensor name for {hf_name!r}")
        mapping[gguf_name] = hf_name
    return mapping
