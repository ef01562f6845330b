"""sageserve vs transformers `generate` on CPU, same weights (SmolLM2-135M, fp32).

Measures, alternating the two engines over `--repeats` rounds:
- single-stream decode: tok/s over `--new-tokens` greedy tokens after a short prompt;
- 16 requests: total generated tok/s, sageserve batching them, transformers one after another.

    python benchmarks/cpu_engine.py --out benchmarks/results/cpu_engine.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.default_model import resolve_model_path
from sageserve.models.loader import load_model

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def _prompts(count: int) -> list[str]:
    return [f"{PROMPT} Chapter {i + 1}." for i in range(count)]


def time_sageserve(llm: LLM, prompts: list[str], new_tokens: int) -> float:
    """Generated tokens per second for all prompts submitted together."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(o.num_completion_tokens for o in outs) / elapsed


def time_transformers(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Generated tokens per second, prompts one after another (no batching)."""
    generated = 0
    start = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        generated += out.shape[1] - ids.shape[1]
    return generated / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    gguf = Path(resolve_model_path(None))
    loaded = load_model(str(gguf), dtype="float32", device="cpu")
    llm = LLM.from_engine_config(
        EngineConfig(device="cpu", dtype="float32", cache=CacheConfig(max_total_tokens=16384)),
        loaded,
    )
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = loaded.tokenizer

    single, many = _prompts(1), _prompts(args.concurrent)
    time_sageserve(llm, single, 8)  # warm-up both
    time_transformers(hf, tokenizer, single, 8)
    rows: dict[str, list[float]] = {k: [] for k in ("ours_1", "hf_1", "ours_n", "hf_n")}
    for _ in range(args.repeats):  # alternate A, B, A, B
        rows["ours_1"].append(time_sageserve(llm, single, args.new_tokens))
        rows["hf_1"].append(time_transformers(hf, tokenizer, single, args.new_tokens))
        rows["ours_n"].append(time_sageserve(llm, many, args.new_tokens))
        rows["hf_n"].append(time_transformers(hf, tokenizer, many, args.new_tokens))
    result = _summarise(rows, args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _summarise(rows: dict[str, list[float]], args: argparse.Namespace) -> dict:
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "benchmark": "cpu_engine",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "new_tokens": args.new_tokens,
        "concurrent": args.concurrent,
        "runs_tok_per_s": rows,
        "median_tok_per_s": med,
        "single_stream_ratio": med["ours_1"] / med["hf_1"],
        "concurrent_ratio": med["ours_n"] / med["hf_n"],
    }


if __name__ == "__main__":
    sys.exit(main())
