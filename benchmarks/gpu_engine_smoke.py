"""The engine on one CUDA GPU with dummy weights of a real architecture (default Llama-3.1-8B).

Checks that the KV pool is sized from --mem-fraction-static, that greedy decode is
repeatable, that greedy tokens are the same with CUDA graphs as without, that every page
is free afterwards, and times decode with CUDA graphs (the default) and eagerly (what
--disable-cuda-graph runs), alternated over --rounds on one engine: one stream, and
`--concurrent` streams batched. Speed does not depend on weight values.

    python benchmarks/gpu_engine_smoke.py --attention-backend triton --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import torch

from sageserve.config import CacheConfig, CudaGraphConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams

PROMPT_LEN = 512


def _decode_rate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens per second: every token after each stream's first, over the time from
    the first tokens (one prefill step: see main's chunked_prefill_size) to the last finish.
    The prefix cache is emptied first, so that every round prefills the same way."""
    llm.engine.flush_prefix_cache()
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    start = max(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    return sum(o.num_completion_tokens - 1 for o in outs) / (end - start)


@contextlib.contextmanager
def _eager(llm: LLM) -> Iterator[None]:
    """Decode eagerly on this engine (what --disable-cuda-graph runs): the same pool and
    weights, so both modes can alternate on one card. Reaches into the engine's runner: what
    is switched off is its CUDA graphs, an internal no public method exposes."""
    runner = llm.engine._runner
    graphs, runner.graph_runner = runner.graph_runner, None
    try:
        yield
    finally:
        runner.graph_runner = graphs


Greedy = list[tuple[list[int], list[dict[int, float]]]]


def _greedy(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> Greedy:
    """(token ids, per-token top-2 logprobs) of each prompt."""
    # Same conditions every time: a run that hits the prefix cache does a different (equally
    # valid) computation whose bf16 rounding differs; that comparison belongs to `validate`.
    llm.engine.flush_prefix_cache()
    return [(o.token_ids, o.logprobs or []) for o in llm.generate(prompts, params)]


def _divergences(first: Greedy, other: Greedy) -> list[dict[str, float]]:
    """Where two greedy runs part: per differing stream, the first differing position, the
    gap between the two best logprobs there in `first`, and the largest |difference| of the
    chosen token's logprob before it. A gap within that difference is a near-tie that
    rounding decides (different GEMM shapes, e.g. a batch padded to a graph's size), not a
    wrong result."""
    found = []
    for stream, ((tokens_a, lps_a), (tokens_b, lps_b)) in enumerate(zip(first, other, strict=True)):
        if tokens_a == tokens_b:
            continue
        pos = next(i for i, (a, b) in enumerate(zip(tokens_a, tokens_b, strict=True)) if a != b)
        best = sorted(lps_a[pos].values(), reverse=True)
        drift = [abs(lps_a[i][tokens_a[i]] - lps_b[i][tokens_b[i]]) for i in range(pos)]
        found.append({"stream": stream, "position": pos, "top2_gap": best[0] - best[1],
                      "max_logprob_drift_before": max(drift, default=0.0)})  # fmt: skip
    return found


def _greedy_checks(llm: LLM, prompts: list[list[int]]) -> dict[str, object]:
    """Greedy tokens repeat, and are the same eager. Staggered lengths: 5 streams decode
    padded to a graph of 8 rows, then fewer as they finish."""
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=2)
              for n in (32, 24, 32, 16, 28)]  # fmt: skip
    first = _greedy(llm, prompts, params)
    second = _greedy(llm, prompts, params)
    with _eager(llm):
        eager = _greedy(llm, prompts, params)
    return {
        "greedy_repeatable": first == second,
        "greedy_graphs_equal_eager": [t for t, _ in first] == [t for t, _ in eager],
        "graphs_vs_eager_divergences": _divergences(first, eager),
    }


def _rates(llm: LLM, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, list]:
    """tok/s per mode ("graphs", "eager") and stream count, over alternating rounds."""
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("graphs", "eager"):
            with _eager(llm) if mode == "eager" else contextlib.nullcontext():
                for streams in (1, args.concurrent):
                    rate = _decode_rate(llm, prompts[:streams], args.new_tokens)
                    rates.setdefault(f"{mode}_{streams}", []).append(rate)
    return rates


def _profile(llm: LLM, prompts: list[list[int]]) -> None:
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    cProfile.runctx("llm.generate(prompts, params)", globals(), locals(), "/tmp/host.prof")
    pstats.Stats("/tmp/host.prof").sort_stats("cumtime").print_stats(40)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--attention-backend", default="torch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternations graphs / eager")
    parser.add_argument("--cuda-graph-max-bs", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="print host and CUDA hot spots")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")

    config = EngineConfig(
        model_path=args.model,
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        attention_backend=args.attention_backend,
        context_length=8192,
        cache=CacheConfig(mem_fraction_static=0.85),
        # Every prompt's prefill in one step: the decode rates then time decode steps alone.
        scheduler=SchedulerConfig(chunked_prefill_size=max(2048, args.concurrent * PROMPT_LEN)),
        cuda_graph=CudaGraphConfig(max_bs=args.cuda_graph_max_bs),
    )
    llm = LLM.from_engine_config(config)
    engine = llm.engine
    graphs = engine._runner.graph_runner  # graphs are internal: the smoke test checks them
    gen = torch.Generator().manual_seed(0)
    count = max(16, args.concurrent)
    prompts = [
        torch.randint(0, 128000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(count)
    ]
    _decode_rate(llm, prompts[:2], 4)  # warm-up
    with _eager(llm):
        _decode_rate(llm, prompts[:2], 4)
    checks = _greedy_checks(llm, prompts[:5])
    rates = _rates(llm, prompts, args)
    rate = {key: statistics.median(values) for key, values in rates.items()}
    if args.profile:
        _profile(llm, prompts[:1])
    stats, info = engine.stats(), engine.info
    result = {
        "benchmark": "gpu_engine_smoke",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "card": torch.cuda.get_device_name(),
        "software": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "model": f"{args.model} (dummy bf16 weights)",
        "attention_backend": info.attention_backend,
        "kv_bytes_per_token": info.memory.kv_bytes_per_token,
        "pool_tokens": info.pool_capacity_tokens,
        "card_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        **checks,
        "pages_all_free": stats.num_free_pages == stats.num_usable_pages,
        "decode_tok_per_s_single": rate["graphs_1"],
        f"decode_tok_per_s_{args.concurrent}_streams": rate[f"graphs_{args.concurrent}"],
        "decode_tok_per_s_single_eager": rate["eager_1"],
        f"decode_tok_per_s_{args.concurrent}_streams_eager": rate[f"eager_{args.concurrent}"],
        "decode_tok_per_s_rounds": rates,
        "cuda_graph": None
        if graphs is None
        else {"batch_sizes": graphs.batch_sizes, "capture_s": graphs.capture_seconds},
        "note": "decode_tok_per_s_*: the engine's default, CUDA-graph decode (eager when "
        "cuda_graph is null: the backend has no graph support); *_eager: every step eager "
        f"(--disable-cuda-graph); medians of {args.rounds} alternated rounds; prompts of "
        f"{PROMPT_LEN} tokens, prefilled in one step and excluded from the rates",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if checks["greedy_repeatable"] and result["pages_all_free"] else 1


if __name__ == "__main__":
    sys.exit(main())
