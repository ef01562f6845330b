"""Engine configuration: one frozen dataclass per concern, each validating itself.

"auto" values are resolved before a config is built (see `EngineConfig.resolve`), never by
mutating a frozen config afterwards. The model's own shape lives in
`sageserve.models.config.ModelConfig`, read from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sageserve.attention.flags import BackendFlags
from sageserve.attention.registry import backend_entries, backend_entry

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
KV_CACHE_DTYPE_CHOICES = ("auto", "int8", "fp16", "bf16", "fp32")
LOAD_FORMAT_CHOICES = ("auto", "safetensors", "gguf", "dummy")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    On CUDA the pool takes what `mem_fraction_static` of the card leaves after the weights;
    on CPU it holds `max_total_tokens` tokens (default `DEFAULT_CPU_KV_TOKENS`).
    """

    page_size: int | None = None  # None: the attention backend's `preferred_page_size`
    kv_cache_dtype: str = "auto"
    mem_fraction_static: float = 0.85
    max_total_tokens: int | None = None
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        _check_positive("page_size", self.page_size)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPE_CHOICES)
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )
        _check_positive("max_total_tokens", self.max_total_tokens)


DEFAULT_CPU_KV_TOKENS = 32768


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    `chunked_prefill_size` is the token budget of one step: decode tokens and prefill
    chunks together never exceed it, and longer prompts are split across steps.
    `max_prefill_tokens_while_decoding` caps the prefill tokens of a step in which some
    request decodes: the decoding requests wait for the whole step, so a large prefill chunk
    stalls them (inter-token latency). None (the default) lets the engine choose: with
    piecewise CUDA graphs, the largest graph's tokens less the largest decode graph's batch
    (512 - 64 = 448 by default), so that a step with prefill and up to that many decodes is
    one piecewise replay (`scheduler.prefill_cap_while_decoding`); otherwise no cap. 0: no
    cap. On an H100 at 32 clients (1024-token prompts), the cap of 448 took ITL p99 from
    52.9 to 23.0 ms for 5% of the throughput (BENCHMARKS.md, issue 16).
    """

    max_running_requests: int = 256
    chunked_prefill_size: int = 2048
    max_prefill_tokens_while_decoding: int | None = None
    max_queued_requests: int | None = None

    def __post_init__(self) -> None:
        _check_positive("max_running_requests", self.max_running_requests)
        _check_positive("chunked_prefill_size", self.chunked_prefill_size)
        _check_positive(
            "max_prefill_tokens_while_decoding", self.max_prefill_tokens_while_decoding, 0
        )
        _check_positive("max_queued_requests", self.max_queued_requests)


@dataclass(frozen=True)
class CudaGraphConfig:
    """CUDA-graph decode (CUDA only; on CPU decode always runs eagerly).

    disable: run every step eagerly. max_bs: the largest decode batch replayed from a
    graph (capped by max_running_requests); graphs are captured for 1, 2, 4, 8, 16, 24,
    ... up to it (sageserve/attention/graph_sizes.py), larger batches run eagerly.
    piecewise_max_tokens: the longest other step (prefill, or prefill mixed with decodes)
    replayed in pieces around eager attention (sageserve/engine/piecewise_graph.py); 0
    turns piecewise graphs off, longer steps run eagerly. disable_sampling: sample every
    step with the eager sampler instead of the decode graphs' sampling graphs
    (sageserve/engine/static_sampler.py; same tokens, for comparing the two).
    """

    disable: bool = False
    max_bs: int = 64
    piecewise_max_tokens: int = 512
    disable_sampling: bool = False

    def __post_init__(self) -> None:
        _check_positive("cuda_graph_max_bs", self.max_bs)
        _check_positive("piecewise_cuda_graph_max_tokens", self.piecewise_max_tokens, 0)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model_path: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "torch"
    context_length: int | None = None
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Options of any registered backend, at most one per backend: the chosen backend reads
    # its own (`attention_flags`), its defaults when absent. Validation builds one engine per
    # backend from one config, so the others' options ride along unread.
    attention_options: tuple[BackendFlags, ...] = ()
    cuda_graph: CudaGraphConfig = field(default_factory=CudaGraphConfig)
    # On CUDA, RMSNorm (+ residual add), rotary and SiLU-mul run as fused Triton kernels
    # (sageserve/layers/fused); False keeps the torch ops. CPU always uses the torch ops.
    fused_layers: bool = True
    # With the fused layers on an sm_90+ GPU, the projections of a step of 1 to 4 rows
    # (small-batch decode) run as a Triton GEMV launched with programmatic dependent launch
    # (sageserve/layers/fused/gemv.py); False keeps cuBLAS there.
    fused_gemv: bool = True
    # On CUDA, run a few requests of every step kind before the engine is ready, so that
    # the first users do not wait for kernels to compile (sageserve/engine/warmup.py).
    warmup: bool = True
    # Queue each step on the device before reading back the previous one's tokens, so the
    # host prepares step N+1 while the device runs step N (sageserve/engine/engine.py).
    overlap_schedule: bool = True

    def __post_init__(self) -> None:
        _check_choice("load_format", self.load_format, LOAD_FORMAT_CHOICES)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("device", self.device, DEVICE_CHOICES)
        _check_positive("context_length", self.context_length)
        self._check_attention()

    def _check_attention(self) -> None:
        """A bad backend name or options object fails here, before any weight is loaded."""
        backend_entry(self.attention_backend)
        known = {entry.flags_class for entry in backend_entries()}
        kinds = [type(flags) for flags in self.attention_options]
        for kind in kinds:
            if kind not in known:
                names = ", ".join(sorted(k.__name__ for k in known))
                raise ValueError(f"attention_options: {kind.__name__} is not one of {names}")
        if len(set(kinds)) != len(kinds):
            raise ValueError("attention_options holds two options objects of one backend")

    def attention_flags(self) -> BackendFlags:
        """The chosen backend's options: those given, else the defaults of its class."""
        flags_class = backend_entry(self.attention_backend).flags_class
        given = [f for f in self.attention_options if type(f) is flags_class]
        return given[0] if given else flags_class()

    def torch_device(self) -> torch.device:
        """The device "auto" resolves to: CUDA when available, else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available")
        return torch.device(self.device)
