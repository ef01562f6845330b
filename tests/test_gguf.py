"""GGUF loading: weights vs transformers' GGUF loader, tokenizer, dequantization, convert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from sageserve.models.config import ModelConfig
from sageserve.models.convert import convert_gguf_to_hf
from sageserve.models.gguf_loader import (
    config_from_gguf,
    dequantize_tensor,
    gguf_weights,
    unpermute_rotary,
)
from sageserve.models.gguf_tokenizer import tokenizer_from_gguf
from sageserve.models.llama import LlamaForCausalLM

Q = GGMLQuantizationType
CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROSE = (
    "The quick brown fox jumps over the lazy dog.\n\nIt's   a test: naïve café, 東京, "
    "def f(x):\n    return x ** 2  # comment\n"
)


@pytest.fixture(scope="module")
def reader(smollm2_gguf: Path) -> GGUFReader:
    return GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def config(reader: GGUFReader) -> ModelConfig:
    return config_from_gguf(reader)


@pytest.fixture(scope="module")
def weights(reader: GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(gguf_weights(reader, config))


@pytest.fixture(scope="module")
def tokenizer(reader: GGUFReader) -> transformers.PreTrainedTokenizerFast:
    return tokenizer_from_gguf(reader)


def test_config_from_metadata(config: ModelConfig) -> None:
    expected = dict(num_layers=30, hidden_size=576, num_q_heads=9, num_kv_heads=3, head_dim=64)
    assert {key: getattr(config, key) for key in expected} == expected
    assert (config.vocab_size, config.intermediate_size, config.rope_theta) == (49152, 1536, 1e5)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_weights_equal_transformers_gguf_loader(
    smollm2_gguf: Path, weights: dict[str, torch.Tensor]
) -> None:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    reference = hf_model.state_dict()
    reference.pop("lm_head.weight")  # tied to the embedding
    assert set(weights) == set(reference)
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name


def test_unpermute_inverts_llama_cpp_permute() -> None:
    heads, rows, cols = 3, 3 * 8, 5
    weight = torch.randn(rows, cols)
    # llama.cpp's convert_hf_to_gguf.py permute:
    permuted = weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert torch.equal(unpermute_rotary(permuted, heads), weight)


def test_tokenizer_round_trip(tokenizer: transformers.PreTrainedTokenizerFast) -> None:
    for text in (PROSE, "  leading spaces", "emoji 🙂 and tabs\t\t", ""):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_splits_digits_individually(
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer.encode("year 2024")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_tokenizer_special_tokens(tokenizer: transformers.PreTrainedTokenizerFast) -> None:
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert set(range(17)) <= set(tokenizer.all_special_ids)  # the control tokens
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # never split, and no BOS added
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_matches_transformers_on_prose(
    smollm2_gguf: Path, tokenizer: transformers.PreTrainedTokenizerFast
) -> None:
    # transformers' GGUF converter omits the Digits pre-tokenizer, so compare digit-free text.
    reference = transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )
    assert tokenizer.encode(PROSE) == reference.encode(PROSE, add_special_tokens=False)


def test_chat_template_renders_chatml(tokenizer: transformers.PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == CHATML


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> GGUFReader:
    writer = GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        raw = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFReader(path)


# Relative RMS error allowed after a quantize -> dequantize round trip.
ROUND_TRIP_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 5e-3,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 6e-2,
    Q.Q5_1: 6e-2,
    Q.Q4_0: 0.12,
    Q.Q4_1: 0.12,
}


def test_dequantize_round_trip(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    tensors = {qtype.name: (quantize(data, qtype), qtype) for qtype in ROUND_TRIP_TOLERANCE}
    reader = _write_gguf(tmp_path / "q.gguf", tensors)
    for tensor in reader.tensors:
        values = dequantize_tensor(tensor)
        assert values.shape == data.shape and values.dtype == np.float32
        rel_rms = np.sqrt(np.mean((values - data) ** 2) / np.mean(data**2))
        assert rel_rms <= ROUND_TRIP_TOLERANCE[Q[tensor.name]], tensor.name


def _q4_k_reference(block: bytes) -> np.ndarray:
    """ggml's dequantize_row_q4_K for one 144-byte block, written out scalar by scalar."""
    d, dmin = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    scales, qs = block[4:16], block[16:144]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )

    out = []
    for chunk in range(4):
        (sc1, m1), (sc2, m2) = scale_min(2 * chunk), scale_min(2 * chunk + 1)
        q = qs[32 * chunk : 32 * chunk + 32]
        out += [d * sc1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * sc2 * (b >> 4) - dmin * m2 for b in q]
    return np.array(out, dtype=np.float32)


def _q6_k_reference(block: bytes) -> np.ndarray:
    """ggml's dequantize_row_q6_K for one 210-byte block, written out scalar by scalar."""
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], dtype=np.int8).astype(np.float32)
    d = np.frombuffer(block[208:210], dtype=np.float16).astype(np.float32)[0]
    out = np.zeros(256, dtype=np.float32)
    for half in range(2):
        l_off, h_off, s_off, y = 64 * half, 32 * half, 8 * half, 128 * half
        for i in range(32):
            h = qh[h_off + i]
            quarters = (
                (ql[l_off + i] & 0xF) | (((h >> 0) & 3) << 4),
                (ql[l_off + i + 32] & 0xF) | (((h >> 2) & 3) << 4),
                (ql[l_off + i] >> 4) | (((h >> 4) & 3) << 4),
                (ql[l_off + i + 32] >> 4) | (((h >> 6) & 3) << 4),
            )
            for k, q in enumerate(quarters):
                out[y + i + 32 * k] = d * sc[s_off + i // 16 + 2 * k] * (q - 32)
    return out


def _random_k_block(rng: np.random.Generator, qtype: Q) -> bytes:
    """Random quant bits with sane fp16 scale fields (random bytes could be inf/NaN)."""
    if qtype == Q.Q4_K:
        head = np.array([0.01, 0.005], dtype=np.float16).tobytes()
        return head + rng.integers(0, 256, 140, dtype=np.uint8).tobytes()
    body = rng.integers(0, 256, 208, dtype=np.uint8).tobytes()
    return body + np.array([0.01], dtype=np.float16).tobytes()


@pytest.mark.parametrize(
    ("qtype", "reference"), [(Q.Q4_K, _q4_k_reference), (Q.Q6_K, _q6_k_reference)]
)
def test_dequantize_k_quants_against_ggml_reference(tmp_path: Path, qtype: Q, reference) -> None:
    rng = np.random.default_rng(1)
    blocks = [_random_k_block(rng, qtype) for _ in range(2)]
    data = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(2, -1)
    (tensor,) = _write_gguf(tmp_path / "k.gguf", {"w": (data, qtype)}).tensors
    expected = np.stack([reference(block) for block in blocks])
    np.testing.assert_allclose(dequantize_tensor(tensor), expected, rtol=1e-6, atol=1e-6)


def test_unsupported_quant_type_is_a_clear_error(tmp_path: Path) -> None:
    data = np.zeros((1, 84), dtype=np.uint8)  # one Q2_K block
    (tensor,) = _write_gguf(tmp_path / "q2k.gguf", {"w": (data, Q.Q2_K)}).tensors
    with pytest.raises(ValueError, match=r"Q2_K.*supported:.*Q4_K"):
        dequantize_tensor(tensor)


@torch.no_grad()
def test_convert_output_loads_in_transformers_and_matches(
    smollm2_gguf: Path,
    tmp_path: Path,
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    convert_gguf_to_hf(str(smollm2_gguf), str(tmp_path))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.chat_template == tokenizer.chat_template
    assert hf_tokenizer.encode(PROSE + " 2024") == tokenizer.encode(PROSE + " 2024")

    model = LlamaForCausalLM(config).eval()
    model.load_weights(weights.items())
    ids = torch.tensor(tokenizer.encode(CHATML))
    ours = model.compute_logits(model(ids, torch.arange(len(ids)), _PrefillAttention()))
    reference = hf_model(ids[None]).logits[0]
    assert (ours.log_softmax(-1) - reference.log_softmax(-1)).abs().max() <= 1e-4


class _PrefillAttention:
    """Causal attention over one fresh sequence (no cache): enough for a single prefill."""

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(
            0, 1
        )
