"""Command-line flags for the engine, named as SGLang names them where the meaning is the same."""

from __future__ import annotations

import argparse

from sageserve.config import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    KV_CACHE_DTYPE_CHOICES,
    LOAD_FORMAT_CHOICES,
    SAGE_IMPL_CHOICES,
    SAGE_PV_CHOICES,
    CacheConfig,
    CudaGraphConfig,
    EngineConfig,
    SageConfig,
    SchedulerConfig,
)

# Kept in sync with sageserve.attention.registry (tested); listed here so that parsing
# arguments never imports torch.
ATTENTION_BACKEND_CHOICES = ("sage_attn", "torch", "triton")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add every EngineConfig flag to `parser`."""
    _add_model_args(parser.add_argument_group("model"))
    _add_cache_args(parser.add_argument_group("KV cache"))
    _add_scheduler_args(parser.add_argument_group("scheduler"))
    _add_cuda_graph_args(parser.add_argument_group("CUDA graphs"))
    _add_sage_args(parser.add_argument_group("sage_attn (8-bit attention)"))


def _add_model_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--model-path",
        default=None,
        help="a Hugging Face model directory, a .gguf file, a bundled config name (with "
        "--load-format dummy) or a short name; default: smollm2-135m-instruct",
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMAT_CHOICES,
        help="how to read the weights; dummy = random weights (speed tests)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights and activations; auto = float32 on CPU, the checkpoint's "
        "16-bit dtype (else bfloat16) on CUDA",
    )
    group.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="auto = cuda when available, else cpu",
    )
    group.add_argument(
        "--attention-backend",
        default="torch",
        choices=ATTENTION_BACKEND_CHOICES,
        help="torch = exact reference; triton = 16-bit Triton kernels (CUDA, fp16/bf16); "
        "sage_attn = 8-bit attention and KV cache",
    )
    group.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="maximum tokens per sequence; default: the model's limit",
    )
    group.add_argument(
        "--random-seed",
        type=int,
        default=0,
        help="seeds dummy weights and requests that carry no seed",
    )


def _add_cache_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="tokens per KV cache page; default: the attention backend's choice (64 for the "
        "GPU kernels of triton and sage_attn, whose key blocks are then whole pages; 16 else)",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPE_CHOICES,
        help="auto = the model dtype for 16-bit backends",
    )
    group.add_argument(
        "--mem-fraction-static",
        type=float,
        default=0.85,
        help="CUDA: fraction of the card for weights + KV pool",
    )
    group.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV pool size in tokens (CPU default 32768; caps the CUDA pool)",
    )
    group.add_argument(
        "--disable-prefix-cache",
        action="store_true",
        help="do not share KV pages between requests with a common prefix",
    )


def _add_scheduler_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-running-requests", type=int, default=256, help="most requests decoding at once"
    )
    group.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=2048,
        help="token budget of one step; longer prompts are prefilled in chunks",
    )


def _add_cuda_graph_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run every decode step eagerly (CUDA graphs are captured on CUDA only, and only "
        "for the triton and sage_attn kernels)",
    )
    group.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=64,
        help="largest decode batch replayed from a CUDA graph (capped by "
        "--max-running-requests); larger ones run eagerly",
    )


def _add_sage_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sage-pv",
        default="fp16",
        choices=SAGE_PV_CHOICES,
        help="P·V precision: fp16 (V cached as INT8; accurate) or fp8 (P and the cached V in "
        "FP8 e4m3)",
    )
    group.add_argument(
        "--sage-disable-smooth-k",
        action="store_true",
        help="quantize keys without subtracting their calibrated mean",
    )
    group.add_argument(
        "--sage-disable-qk-balance",
        action="store_true",
        help="quantize Q and K without the calibrated per-channel balance",
    )
    group.add_argument(
        "--sage-impl",
        default="auto",
        choices=SAGE_IMPL_CHOICES,
        help="auto = Triton kernels on CUDA, the torch reference elsewhere",
    )
    group.add_argument(
        "--sage-skip-layers",
        type=_layer_list,
        default=(),
        help="comma-separated layers kept in exact attention, e.g. 0,1",
    )


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 0,1 -- got {text!r}"
        ) from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the EngineConfig; ValueError (naming the valid choices) on bad values."""
    return EngineConfig(
        model_path=args.model_path,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        context_length=args.context_length,
        seed=args.random_seed,
        cache=CacheConfig(
            page_size=args.page_size,
            kv_cache_dtype=args.kv_cache_dtype,
            mem_fraction_static=args.mem_fraction_static,
            max_total_tokens=args.max_total_tokens,
            enable_prefix_cache=not args.disable_prefix_cache,
        ),
        scheduler=SchedulerConfig(
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
        ),
        sage=SageConfig(
            pv=args.sage_pv,
            smooth_k=not args.sage_disable_smooth_k,
            balance_qk=not args.sage_disable_qk_balance,
            skip_layers=args.sage_skip_layers,
            impl=args.sage_impl,
        ),
        cuda_graph=CudaGraphConfig(disable=args.disable_cuda_graph, max_bs=args.cuda_graph_max_bs),
    )
