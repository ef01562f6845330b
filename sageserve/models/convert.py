"""`sageserve convert`: a GGUF file -> a HF model directory (fp32 safetensors + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader
from safetensors.torch import save_file

from sageserve.models.config import ModelConfig
from sageserve.models.gguf_loader import gguf_weights, hf_config_from_gguf
from sageserve.models.gguf_tokenizer import tokenizer_from_gguf


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write model.safetensors (dequantized, float32, HF names and rotary layout), config.json,
    generation_config.json and the tokenizer files (chat template inside tokenizer_config.json)
    so transformers' AutoModelForCausalLM / AutoTokenizer load the result."""
    reader = GGUFReader(gguf_path)
    config = ModelConfig.from_hf_config(hf_config_from_gguf(reader))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: weight.contiguous() for name, weight in gguf_weights(reader, config)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _write_json(out / "config.json", {**config.to_hf_config(), "torch_dtype": "float32"})
    _write_json(out / "generation_config.json", _generation_config(config))
    tokenizer = tokenizer_from_gguf(reader)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    _write_json(out / "special_tokens_map.json", tokenizer.special_tokens_map)


def _generation_config(config: ModelConfig) -> dict:
    eos = list(config.eos_token_ids)
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
