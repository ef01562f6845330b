"""Load a model (HF safetensors dir, GGUF file or dummy weights) onto a device, with tokenizer."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sageserve.layers.rotary import RotaryEmbedding
from sageserve.models.config import ModelConfig
from sageserve.models.default_model import resolve_model_path
from sageserve.models.gguf_loader import config_from_gguf, gguf_weights
from sageserve.models.gguf_tokenizer import tokenizer_from_gguf
from sageserve.models.llama import LlamaForCausalLM
from sageserve.models.registry import model_class_for

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Dummy weights: uniform with this standard deviation, the usual HF initializer_range.
_DUMMY_STD = 0.02

Weights = Iterable[tuple[str, torch.Tensor]]


@dataclass
class LoadedModel:
    """A model ready to run: on its device, in eval mode, in `dtype`."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None  # None only for dummy weights without tokenizer
    dtype: torch.dtype
    source: str  # file or directory name, format and stored types (no absolute path)


@dataclass
class _Source:
    """What a format yields before the model is built; `weights` is None for dummy."""

    config: ModelConfig
    hf_torch_dtype: str | None
    tokenizer: PreTrainedTokenizerBase | None
    weights: Callable[[], Weights] | None
    description: str


def load_model(
    model_path: str | None,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load `model_path` (None = the default model; see default_model.resolve_model_path).

    load_format: "auto" (a directory -> safetensors, a *.gguf file -> gguf), "safetensors",
    "gguf", or "dummy" (random weights seeded by `seed`; model_path is a directory with
    config.json, a config.json file, or a bundled config name such as "llama-3.1-8b").
    dtype: see `resolve_dtype`. Raises ValueError naming the valid choices on bad input.
    """
    _check_dtype(dtype)  # before the (slow) source is opened
    source = _open_source(resolve_model_path(model_path), load_format)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, source.config, source.hf_torch_dtype, torch_device)
    model = build_model(source.config, torch_dtype, torch_device)
    if source.weights is None:
        init_dummy_weights(model, seed)
    else:
        model.load_weights(source.weights())
    return LoadedModel(
        model.eval(), source.config, source.tokenizer, torch_dtype, source.description
    )


def load_tokenizer(
    model_path: str | None, *, load_format: str = "auto"
) -> tuple[PreTrainedTokenizerBase, ModelConfig]:
    """The tokenizer and config of `model_path` without its weights (see `load_model`).

    ValueError when the model has no tokenizer (dummy weights without tokenizer files).
    """
    source = _open_source(resolve_model_path(model_path), load_format)
    if source.tokenizer is None:
        raise ValueError(f"{model_path or 'the default model'} has no tokenizer")
    return source.tokenizer, source.config


def resolve_dtype(
    dtype: str, config: ModelConfig, hf_torch_dtype: str | None, device: torch.device
) -> torch.dtype:
    """The compute dtype for a requested `dtype` string.

    "auto" means float32 on CPU (16-bit matmuls are no faster there and lose accuracy); on
    CUDA, the checkpoint's torch_dtype when it is float16/bfloat16, else bfloat16 (GGUF and
    float32 checkpoints). Explicit names ("float32", "float16", "bfloat16", ...) are taken as is.
    `config` is accepted for per-architecture rules; none exist today.
    """
    _check_dtype(dtype)
    explicit = DTYPES[dtype]
    if explicit is not None:
        return explicit
    if device.type != "cuda":
        return torch.float32
    if hf_torch_dtype in ("float16", "bfloat16"):
        return DTYPES[hf_torch_dtype]
    return torch.bfloat16


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """An uninitialised model allocated once, directly on `device` in `dtype`.

    Built on the meta device first so no time is spent on default initialisation.
    """
    with torch.device("meta"), _default_dtype(dtype):
        model = model_class_for(config)(config)
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()
    return model


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights: norm weights 1, everything else uniform with std 0.02."""
    params = list(model.named_parameters())
    if not params or params[0][1].is_meta:
        return
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    bound = _DUMMY_STD * 3**0.5
    for name, param in params:
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.uniform_(-bound, bound, generator=generator)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _open_source(path: str, load_format: str) -> _Source:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"unknown load_format {load_format!r}; choose from: {', '.join(LOAD_FORMATS)}"
        )
    if load_format == "dummy":
        return _dummy_source(path)
    resolved = Path(path)
    if not resolved.exists():
        raise ValueError(
            f"model path {path!r} does not exist; give a HF model directory, a .gguf file, "
            "or a short name such as 'smollm2-135m-instruct'"
        )
    if load_format == "gguf" or (load_format == "auto" and resolved.is_file()):
        return _gguf_source(resolved)
    return _safetensors_source(resolved)


def _gguf_source(path: Path) -> _Source:
    if not path.is_file() or not _is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file")
    reader = GGUFReader(path)
    config = config_from_gguf(reader)
    return _Source(
        config=config,
        hf_torch_dtype=None,
        tokenizer=tokenizer_from_gguf(reader),
        weights=lambda: gguf_weights(reader, config),
        description=f"{path.name} (GGUF; {_tensor_types(reader)}; dequantized on load)",
    )


def _tensor_types(reader: GGUFReader) -> str:
    """How many tensors of each stored type, most common first: '210 Q4_1, 61 F32'."""
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _safetensors_source(path: Path) -> _Source:
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a directory; safetensors checkpoints are HF model directories "
            "(config.json + *.safetensors), single files must be .gguf"
        )
    hf = _read_json(path / "config.json")
    files = safetensors_files(path)
    return _Source(
        config=ModelConfig.from_hf_config(hf),
        hf_torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
        tokenizer=_hf_tokenizer(path, required=True),
        weights=lambda: safetensors_weights(files),
        description=f"{path.name} (safetensors, {len(files)} file{'s' * (len(files) > 1)})",
    )


def _dummy_source(path: str) -> _Source:
    config_file = _dummy_config_file(path)
    hf = _read_json(config_file)
    return _Source(
        config=ModelConfig.from_hf_config(hf),
        hf_torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
        tokenizer=_hf_tokenizer(config_file.parent, required=False),
        weights=None,
        description=f"{config_file.parent.name}/{config_file.name} (dummy weights)",
    )


def _dummy_config_file(path: str) -> Path:
    """A directory with config.json, a config file, or a bundled config name."""
    candidates = [Path(path) / "config.json", Path(path), BUNDLED_CONFIGS / f"{path.lower()}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    bundled = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.json"))
    raise ValueError(
        f"no config for dummy weights at {path!r}; give a directory with config.json, a "
        f"config.json file, or a bundled config: {', '.join(bundled)}"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} not found")
    return json.loads(path.read_text())


def _hf_tokenizer(directory: Path, *, required: bool) -> PreTrainedTokenizerBase | None:
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(directory)
    if required:
        raise ValueError(f"{directory} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    return None


def safetensors_files(directory: Path) -> list[Path]:
    """Checkpoint files: those named by model.safetensors.index.json, else all *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    return files


def safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs read lazily, one tensor at a time (memory-mapped, no pickles)."""
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 -- safe_open is not a mapping
                yield name, handle.get_tensor(name)
