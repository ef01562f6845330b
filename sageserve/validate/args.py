"""`sageserve validate` flags -> ValidateConfig (parsing never imports torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sageserve.output_dir import DEFAULT_OUT_ROOT
from sageserve.validate.config import (
    CONTEXT_GROUPS,
    PRESETS,
    PROFILE_CHOICES,
    REPORT_SECTIONS,
    Thresholds,
    ValidateConfig,
    WindowGroup,
    sizes_with,
)

# Size flags: flag name -> (Sizes field, parser, help).
_SIZE_FLAGS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "--logprob-prompts": ("logprob_prompts", int, "prompts checked in the logprobs section"),
    "--logprob-prompt-len": ("logprob_prompt_len", int, "tokens per logprobs prompt"),
    "--logprob-new-tokens": ("logprob_new_tokens", int, "tokens generated per logprobs prompt"),
    "--prefix-len": ("prefix_len", int, "prefix-cache case: cached prefix tokens (0: skip)"),
    "--suffix-len": ("suffix_len", int, "prefix-cache case: scored suffix tokens"),
    "--ppl-group": ("ppl_group", str, f"window group for perplexity: {', '.join(CONTEXT_GROUPS)}"),
    "--mmlu-per-subject": ("mmlu_per_subject", int, "MMLU questions per subject (57 subjects)"),
    "--mmlu-subjects": ("mmlu_subjects", int, "first N subjects alphabetically (0: all 57)"),
    "--throughput-input-lens": ("throughput_input_lens", None, "comma-separated prompt tokens"),
    "--throughput-output-lens": ("throughput_output_lens", None, "comma-separated new tokens"),
    "--throughput-concurrency": ("throughput_concurrency", None, "comma-separated batch sizes"),
    "--throughput-repeats": ("throughput_repeats", int, "rounds alternating the backends"),
    "--determinism-runs": ("determinism_runs", int, "identical runs compared (0: skip)"),
    "--determinism-prompt-len": ("determinism_prompt_len", int, "tokens of the prompt"),
    "--determinism-new-tokens": ("determinism_new_tokens", int, "greedy tokens per run"),
    "--determinism-batch": ("determinism_batch", int, "batch size for alone-vs-batch"),
    "--remote-top-n": ("remote_top_n", int, "--url: top-N logprobs per position for the KL"),
}

# Threshold flags: flag name -> (Thresholds field, help).
_THRESHOLD_FLAGS: dict[str, tuple[str, str]] = {
    "--max-logprob-delta": ("logprob_delta", "|Δ logprob| limit (default 5e-2)"),
    "--logprob-delta-quantile": (
        "logprob_delta_quantile",
        "share of tokens that must be within it (default 0.99)",
    ),
    "--max-mean-kl": ("mean_kl", "mean KL limit per context group (default 2e-3)"),
    "--max-ppl-delta": ("ppl_delta_rel", "relative perplexity change limit (default 5e-3)"),
    "--consistency-tol": (
        "consistency_tol",
        "prompt logprobs vs teacher-forced tolerance (default 1e-4)",
    ),
    "--determinism-logprob-tol": (
        "determinism_logprob_tol",
        "also fail on logprob differences above this (default off)",
    ),
    "--max-mmlu-flip-rate": ("max_mmlu_flip_rate", "answer-flip rate limit (default: none)"),
    "--min-decode-speedup": ("min_decode_speedup", "decode speedup floor (default: none)"),
    "--max-kv-bytes-ratio": ("max_kv_bytes_ratio", "KV bytes/token vs reference (default: none)"),
    "--min-top1": ("min_top1", "8-bit profile: top-1 agreement floor (default 0.98)"),
    "--cross-path-tol-8bit": (
        "cross_path_tol_8bit",
        "8-bit profile: decoded vs teacher-forced |Δ logprob| limit (default 0.75)",
    ),
    "--cross-path-tol-16bit-model": (
        "cross_path_tol_16bit_model",
        "16-bit profile, bf16/fp16 model: decoded vs teacher-forced |Δ logprob| limit "
        "(default 0.5)",
    ),
    "--mcnemar-alpha": (
        "mcnemar_alpha",
        "8-bit profile: MMLU flips fail below this McNemar p (default 0.05)",
    ),
}


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def name_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_validate_args(p: argparse.ArgumentParser) -> None:
    """Mode, backends, output, remote servers, sizes and thresholds."""
    p.add_argument(
        "mode", choices=sorted(PRESETS), help="preset sizes: quick (minutes on CPU) or full"
    )
    p.add_argument(
        "--backends",
        type=name_list,
        default=None,
        help="comma-separated attention backends; the first is the reference "
        "(default: torch,sage_attn, plus triton on a GPU when registered); name@dtype runs "
        "that entry over the model in its own dtype, e.g. torch@float32,torch,sage_attn "
        "--dtype bfloat16 compares both bf16 backends with exact fp32 attention",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"output directory (default: {DEFAULT_OUT_ROOT}/<date>-<time>-<mode>, untracked)",
    )
    p.add_argument(
        "--url",
        type=name_list,
        default=None,
        help="validate running servers instead (comma-separated base URLs; the first is the "
        "reference); --model-path must name their model, for its tokenizer",
    )
    p.add_argument(
        "--remote-api",
        choices=("auto", "sglang", "openai"),
        default="auto",
        help="--url: use SGLang's /generate where a server has it (auto), insist on it "
        "(sglang), or use OpenAI's /v1 only (openai: fewer sections)",
    )
    p.add_argument("--remote-api-key", default=None, help="--url: bearer token for the servers")
    p.add_argument(
        "--sections",
        type=name_list,
        default=REPORT_SECTIONS,
        help=f"comma-separated subset of: {','.join(REPORT_SECTIONS)}",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the intervals")
    p.add_argument("--seed", type=int, default=0, help="MMLU subset and bootstrap seed")
    sizes = p.add_argument_group("sizes (override the preset)")
    for group in CONTEXT_GROUPS:
        sizes.add_argument(f"--{group}-len", type=int, default=None, help=f"{group} window tokens")
        sizes.add_argument(
            f"--{group}-windows", type=int, default=None, help=f"{group} windows (0: skip)"
        )
    for flag, (_, kind, help_text) in _SIZE_FLAGS.items():
        sizes.add_argument(flag, type=kind or int_list, default=None, help=help_text)
    limits = p.add_argument_group("thresholds of the verdicts")
    limits.add_argument(
        "--verdict-profile",
        choices=PROFILE_CHOICES,
        default="auto",
        help="bars the backends are judged by: auto (each its own: 16-bit backends by "
        "SGLang's per-token rule, 8-bit ones by quantized-attention bars), or one forced on "
        "all (labelled where it is not the backend's own)",
    )
    for flag, (_, help_text) in _THRESHOLD_FLAGS.items():
        limits.add_argument(flag, type=float, default=None, help=help_text)


def _window_overrides(args: argparse.Namespace) -> dict[str, WindowGroup | None]:
    out: dict[str, WindowGroup | None] = {}
    preset = PRESETS[args.mode]
    for group in CONTEXT_GROUPS:
        length, count = getattr(args, f"{group}_len"), getattr(args, f"{group}_windows")
        if length is None and count is None:
            continue
        base = preset.group(group)
        out[group] = WindowGroup(length or base.length, base.count if count is None else count)
    return out


def validate_config_from_args(
    args: argparse.Namespace, backends: tuple[str, ...]
) -> ValidateConfig:
    """The run's config; ValueError on bad sizes or thresholds."""
    overrides: dict[str, object] = {
        field: getattr(args, flag[2:].replace("-", "_"))
        for flag, (field, _, _) in _SIZE_FLAGS.items()
    }
    overrides |= _window_overrides(args)
    limits = {
        field: getattr(args, flag[2:].replace("-", "_"))
        for flag, (field, _) in _THRESHOLD_FLAGS.items()
        if getattr(args, flag[2:].replace("-", "_")) is not None
    }
    return ValidateConfig(
        mode=args.mode,
        backends=backends,
        sizes=sizes_with(args.mode, overrides),
        thresholds=Thresholds(**limits),
        sections=tuple(args.sections),
        confidence=args.confidence,
        seed=args.seed,
        verdict_profile=args.verdict_profile,
    )
