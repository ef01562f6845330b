"""`sageserve generate | convert | validate | serve | bench`.

User mistakes exit with code 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from sageserve.engine_args import add_engine_args, engine_config_from_args


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a prompt; repeat the flag for several (they are batched together)",
    )
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON with token ids, logprobs, finish reason and timings",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--logprobs", type=int, default=None, help="top-N logprobs per output token")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"))
    add_engine_args(p)
    p.set_defaults(func=_run_generate)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write a GGUF file as a Hugging Face model directory")
    p.add_argument("gguf_file", help="the .gguf file (or a short model name)")
    p.add_argument("out_dir", help="directory to write safetensors, config and tokenizer to")
    p.set_defaults(func=_run_convert)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from sageserve.validate.args import add_validate_args

    p = sub.add_parser(
        "validate",
        help="side-by-side report of attention backends: logprobs, KL, perplexity, MMLU, "
        "throughput, memory, determinism (exit 0: every verdict passed, 1: one failed)",
        conflict_handler="resolve",
    )
    add_validate_args(p)
    _add_engine_args_per_backend(p)
    p.set_defaults(func=_run_validate)


def _add_engine_args_per_backend(p: argparse.ArgumentParser) -> None:
    """--log-level and the engine flags, for a command that builds one engine per entry of
    its --backends (validate, bench offline): a single backend flag would mislead."""
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"))
    add_engine_args(p)
    p.add_argument("--attention-backend", default=None, help=argparse.SUPPRESS)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from sageserve.launch_server import add_launch_args

    p = sub.add_parser("serve", help="serve a model over HTTP (same flags as launch_server)")
    add_launch_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from sageserve.launch_server import run

    return run(args)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from sageserve.bench.kernels import add_kernels_args
    from sageserve.bench.serving import add_serving_args

    p = sub.add_parser(
        "bench", help="benchmarks: a running server, the engine offline, or the attention kernels"
    )
    kinds = p.add_subparsers(dest="bench", required=True)
    serving = kinds.add_parser(
        "serving",
        help="concurrent streaming clients against /generate: throughput, TTFT, inter-token "
        "latency (exit 1 if any request failed)",
    )
    add_serving_args(serving)
    serving.set_defaults(func=_run_bench)
    kernels = kinds.add_parser(
        "kernels",
        help="attention kernels side by side on one device: prefill TOPS and accuracy (ours "
        "vs SDPA and SageAttention 1.0.6), decode µs and GB/s (exit 1 if a variant failed)",
    )
    add_kernels_args(kernels)
    kernels.set_defaults(func=_run_bench_kernels)
    _add_bench_offline(kinds)


def _add_bench_offline(kinds: argparse._SubParsersAction) -> None:
    from sageserve.bench.offline import add_offline_args

    offline = kinds.add_parser(
        "offline",
        help="the engine over a grid of batch x input x output per backend, no HTTP: "
        "prefill s, TTFT, decode tok/s and its memory-bandwidth bound (exit 1 if a point "
        "could not run)",
        conflict_handler="resolve",
    )
    add_offline_args(offline)
    _add_engine_args_per_backend(offline)
    offline.set_defaults(func=_run_bench_offline)


def _run_bench_offline(args: argparse.Namespace) -> int:
    from sageserve.bench.offline import run

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run(args)


def _run_bench(args: argparse.Namespace) -> int:
    from sageserve.bench.serving import run

    return run(args)


def _run_bench_kernels(args: argparse.Namespace) -> int:
    from sageserve.bench.kernels import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sageserve", description="LLM inference with pluggable (8-bit) attention"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_validate(sub)
    _add_serve(sub)
    _add_bench(sub)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from sageserve.engine.llm import LLM
    from sageserve.engine.sampling_params import SamplingParams

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        logprobs=args.logprobs,
    )
    llm = LLM.from_engine_config(engine_config_from_args(args))
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(conversations, params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        print(json.dumps(_output_json(out)) if args.json else out.text)
    return 0


def _output_json(out: Any) -> dict[str, Any]:
    def lp(entries: list[dict[int, float] | None] | None) -> Any:
        if entries is None:
            return None
        return [None if e is None else {str(k): v for k, v in e.items()} for e in entries]

    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "prompt_token_ids": out.prompt_token_ids,
        "logprobs": lp(out.logprobs),
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "usage": {
            "prompt_tokens": out.num_prompt_tokens,
            "completion_tokens": out.num_completion_tokens,
            "cached_tokens": out.num_cached_tokens,
        },
        "time_to_first_token_s": out.metrics.time_to_first_token,
        "latency_s": out.metrics.latency,
    }


def _run_convert(args: argparse.Namespace) -> int:
    from sageserve.models.convert import convert_gguf_to_hf
    from sageserve.models.default_model import resolve_model_path

    convert_gguf_to_hf(resolve_model_path(args.gguf_file), args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sageserve.output_dir import default_out_dir
    from sageserve.validate.args import validate_config_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.attention_backend is not None:
        raise ValueError(
            "validate compares several backends: use --backends, not --attention-backend"
        )
    out = Path(args.out) if args.out else default_out_dir(args.mode)
    from sageserve.validate import pipeline

    if args.url:
        report = _validate_remote(args, out)
    else:
        cfg = validate_config_from_args(args, args.backends or pipeline.default_backends())
        report = pipeline.run_validation(cfg, engine_config_from_args(args), out)
    print(f"{'PASS' if report['passed'] else 'FAIL'}: {out / 'report.md'}")
    return 0 if report["passed"] else 1


def _validate_remote(args: argparse.Namespace, out: object) -> dict:
    from sageserve.validate.args import validate_config_from_args
    from sageserve.validate.pipeline import run_remote_validation
    from sageserve.validate.remote_client import RemoteServer

    if args.backends:
        raise ValueError("--url validates running servers: drop --backends (each URL is one)")
    cfg = validate_config_from_args(args, tuple(u.rstrip("/") for u in args.url))
    servers = [RemoteServer(u, args.remote_api, args.remote_api_key) for u in cfg.backends]
    try:
        return run_remote_validation(cfg, servers, engine_config_from_args(args), out)
    finally:
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"sageserve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
