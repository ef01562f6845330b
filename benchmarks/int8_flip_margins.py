"""How far two float paths through the 8-bit backend drift apart: tests/int8_flips.py's margins.

The same greedy requests run along paths that differ only in GEMM shapes (inside a batch vs
alone, a prefix-cache hit vs a miss, recomputed after preemption vs not) for `sage_attn` and,
as a control, the exact `torch` backend; the 8-bit path is also compared with exact attention.
Per pair of outputs, up to and including their first differing token, it records every
|Δ logprob| of a candidate both top-N lists hold, how far a candidate on one side only sits
above the other side's cut-off, each pair's mean |Δ|, and the top-two gaps where tokens part.

    python benchmarks/int8_flip_margins.py --model PATH.gguf --seeds 1,2,3 --threads 2,1 \
        --out benchmarks/results/int8_flip_margins-cpu-DATE.json

CPU, SmolLM2-135M-Instruct (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from int8_flips import first_difference, top_two_gap

from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel, load_model

TOP_N = 5


def make_llm(loaded: LoadedModel, backend: str, **cache: object) -> LLM:
    chunk = int(cache.pop("chunk", 64))
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        attention_backend=backend,
        cache=CacheConfig(page_size=16, **({"max_total_tokens": 8192} | cache)),
        scheduler=SchedulerConfig(chunked_prefill_size=chunk),
    )
    return LLM.from_engine_config(config, loaded)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 49152, (n,), generator=gen).tolist() for n in lengths]


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, logprobs=TOP_N)


def pair_stats(a, b) -> dict:
    """Drift of two outputs of one prompt, up to (and including) their first differing token."""
    first = first_difference(a.token_ids, b.token_ids)
    steps = min(first + 1, len(a.token_ids))
    deltas, crossings = [], []
    for lp_a, lp_b in zip(a.logprobs[:steps], b.logprobs[:steps], strict=True):
        deltas += [abs(lp_a[t] - lp_b[t]) for t in lp_a.keys() & lp_b.keys()]
        for mine, other in ((lp_a, lp_b), (lp_b, lp_a)):
            cut_off = sorted(other.values(), reverse=True)[TOP_N - 1]
            crossings += [mine[t] - cut_off for t in mine.keys() - other.keys()]
    diverged = first < len(a.token_ids)
    gap = max(top_two_gap(a.logprobs[first]), top_two_gap(b.logprobs[first])) if diverged else None
    return {"deltas": deltas, "crossings": crossings, "divergence_gap": gap}


def batched_vs_alone(llm: LLM, seed: int) -> list[dict]:
    ps = prompts([1, 7, 20, 33, 64, 100, 150, 200], seed)
    together = llm.generate(ps, greedy(16))
    alone = [llm.generate([p], greedy(16))[0] for p in ps]
    return [pair_stats(t, a) for t, a in zip(together, alone, strict=True)]


def hit_vs_miss(loaded: LoadedModel, backend: str, seed: int) -> list[dict]:
    shared, tail_a, tail_b = prompts([70, 9, 13], seed)
    cached = make_llm(loaded, backend)
    cached.generate([shared + tail_a], greedy(16))
    hit = cached.generate([shared + tail_b], greedy(16))[0]
    miss = make_llm(loaded, backend, enable_prefix_cache=False)
    return [pair_stats(hit, miss.generate([shared + tail_b], greedy(16))[0])]


def preempted_vs_not(loaded: LoadedModel, backend: str, seed: int) -> list[dict]:
    ps = prompts([40, 45, 50, 35], seed)
    big = make_llm(loaded, backend).generate(ps, greedy(40))
    tiny = make_llm(loaded, backend, max_total_tokens=160, chunk=32).generate(ps, greedy(40))
    return [pair_stats(t, b) for t, b in zip(tiny, big, strict=True)]


def eight_bit_vs_exact(exact: LLM, sage: LLM, seed: int) -> list[dict]:
    ps = prompts([20, 64, 150], seed)
    pairs = zip(exact.generate(ps, greedy(16)), sage.generate(ps, greedy(16)), strict=True)
    return [pair_stats(a, b) for a, b in pairs]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(pairs: list[dict]) -> dict:
    deltas = [d for p in pairs for d in p["deltas"]]
    gaps = [p["divergence_gap"] for p in pairs if p["divergence_gap"] is not None]
    return {
        "pairs": len(pairs),
        "candidates_compared": len(deltas),
        "delta_p50": quantile(deltas, 0.5),
        "delta_p99": quantile(deltas, 0.99),
        "delta_max": max(deltas),
        "pair_mean_delta_max": max(statistics.fmean(p["deltas"]) for p in pairs),
        "crossing_max": max((c for p in pairs for c in p["crossings"]), default=None),
        "crossings": sum(len(p["crossings"]) for p in pairs),
        "diverged_pairs": len(gaps),
        "divergence_gap_max": max(gaps) if gaps else None,
    }


def run_cases(loaded: LoadedModel, seeds: list[int]) -> dict[str, list[dict]]:
    cases: dict[str, list[dict]] = {}
    for backend in ("torch", "sage_attn"):
        llm = make_llm(loaded, backend)
        for seed in seeds:
            cases.setdefault(f"{backend} batched_vs_alone", []).extend(batched_vs_alone(llm, seed))
            hits = hit_vs_miss(loaded, backend, seed)
            cases.setdefault(f"{backend} hit_vs_miss", []).extend(hits)
            preempted = preempted_vs_not(loaded, backend, seed)
            cases.setdefault(f"{backend} preempted_vs_not", []).extend(preempted)
    exact, sage = make_llm(loaded, "torch"), make_llm(loaded, "sage_attn")
    for seed in seeds:
        cases.setdefault("sage_attn vs torch (8-bit error)", []).extend(
            eight_bit_vs_exact(exact, sage, seed)
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct GGUF path")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", default="2,1", help="torch CPU threads, one run each")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    by_threads = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        cases = run_cases(loaded, seeds)
        by_threads[threads] = {name: summary(pairs) for name, pairs in cases.items()}
        print(json.dumps({threads: by_threads[threads]}, indent=1), flush=True)
    result = {
        "benchmark": "int8_flip_margins",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"cpu": platform.machine(), "cores": len(os.sched_getaffinity(0))},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"seeds": seeds, "top_n": TOP_N, "model": "SmolLM2-135M-Instruct Q4_1, fp32"},
        "by_torch_threads": by_threads,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
