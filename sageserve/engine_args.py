"""Command-line flags for the engine, named as SGLang names them where the meaning is the same."""

from __future__ import annotations

import argparse

from sageserve.attention.flags import BackendFlags
from sageserve.attention.registry import backend_entries, backend_entry, backend_names
from sageserve.config import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    KV_CACHE_DTYPE_CHOICES,
    LOAD_FORMAT_CHOICES,
    CacheConfig,
    CudaGraphConfig,
    EngineConfig,
    SchedulerConfig,
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add every EngineConfig flag to `parser`."""
    _add_model_args(parser.add_argument_group("model"))
    _add_cache_args(parser.add_argument_group("KV cache"))
    _add_scheduler_args(parser.add_argument_group("scheduler"))
    _add_cuda_graph_args(parser.add_argument_group("CUDA graphs"))
    for entry in backend_entries():
        entry.flags_class.add_cli_flags(parser.add_argument_group(f"{entry.name} backend"))


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
        choices=backend_names(),
        help="; ".join(f"{e.name} = {e.help}" for e in backend_entries()),
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
    group.add_argument(
        "--max-prefill-tokens-while-decoding",
        type=int,
        default=None,
        help="prefill tokens a step may compute while other requests decode (they wait for "
        "the whole step: a cap bounds their inter-token latency, at a cost in throughput and "
        "TTFT); 0: no cap beyond --chunked-prefill-size; default: with piecewise CUDA graphs, "
        "--piecewise-cuda-graph-max-tokens less --cuda-graph-max-bs (448), so such a step "
        "is one graph replay; otherwise no cap",
    )


def _add_cuda_graph_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run every step eagerly (CUDA graphs are captured on CUDA only; whole decode "
        "steps only for the triton and sage_attn kernels)",
    )
    group.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=64,
        help="largest decode batch replayed from a CUDA graph (capped by "
        "--max-running-requests); larger ones run eagerly",
    )
    group.add_argument(
        "--piecewise-cuda-graph-max-tokens",
        type=int,
        default=512,
        help="longest step with prefill replayed from piecewise CUDA graphs (every layer's "
        "projections and MLP captured, attention eager between them; token counts 16, 32, "
        "64, then multiples of 64); longer ones run eagerly; 0 turns them off",
    )
    group.add_argument(
        "--disable-cuda-graph-sampling",
        action="store_true",
        help="sample decode steps with the eager sampler after the graph replay instead of "
        "in their own captured graphs (the same tokens; for comparing the two)",
    )
    group.add_argument(
        "--skip-warmup",
        action="store_true",
        help="start serving without the warm-up requests that compile the kernels first "
        "(CUDA; the first requests then wait for compilation)",
    )
    group.add_argument(
        "--disable-fused-layers",
        action="store_true",
        help="run RMSNorm, rotary and SiLU-mul as separate torch ops instead of fused Triton "
        "kernels (CUDA; CPU always uses the torch ops)",
    )
    group.add_argument(
        "--disable-fused-gemv",
        action="store_true",
        help="compute the projections of steps of 1 to 4 rows (small-batch decode) with "
        "cuBLAS instead of the Triton GEMV launched with programmatic dependent launch "
        "(used with the fused layers on sm_90+ GPUs)",
    )
    group.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="read each step's sampled tokens back before preparing the next step, instead "
        "of preparing step N+1 while the device runs step N",
    )


def backend_options_from_args(args: argparse.Namespace) -> tuple[BackendFlags, ...]:
    """Every registered backend's options, as its flags parsed (one per options class: two
    backends may share one)."""
    classes = dict.fromkeys(entry.flags_class for entry in backend_entries())
    return tuple(flags_class.from_cli_args(args) for flags_class in classes)


def check_backend_flags_used(args: argparse.Namespace, backend: str) -> None:
    """ValueError when flags of a backend other than `backend` were given: they would be
    ignored, and what the user asked for would silently not happen."""
    chosen = backend_entry(backend).flags_class
    for entry in backend_entries():
        flags = entry.flags_class.from_cli_args(args)
        if entry.flags_class is not chosen and flags != entry.flags_class():
            raise ValueError(
                f"options of --attention-backend {entry.name} were given ({flags}), but the "
                f"backend is {backend}"
            )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the EngineConfig; ValueError (naming the valid choices) on bad values.

    Without --attention-backend (validate, which builds one engine per --backends entry from
    this config) the default backend is kept and every backend's options ride along; with
    one, options given for another backend are an error.
    """
    if args.attention_backend is not None:
        check_backend_flags_used(args, args.attention_backend)
    return EngineConfig(
        model_path=args.model_path,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend or EngineConfig.attention_backend,
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
            max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
        ),
        attention_options=backend_options_from_args(args),
        cuda_graph=CudaGraphConfig(
            disable=args.disable_cuda_graph,
            max_bs=args.cuda_graph_max_bs,
            piecewise_max_tokens=args.piecewise_cuda_graph_max_tokens,
            disable_sampling=args.disable_cuda_graph_sampling,
        ),
        fused_layers=not args.disable_fused_layers,
        fused_gemv=not args.disable_fused_gemv,
        warmup=not args.skip_warmup,
        overlap_schedule=not args.disable_overlap_schedule,
    )
