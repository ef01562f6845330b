"""What `sageserve validate` measures and how much of it: sizes per section, and thresholds.

`PRESETS` holds the `quick` and `full` sizes; every size can be overridden by a flag. A size
of 0 (e.g. no long-context windows) means the part is not run, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

CONTEXT_GROUPS = ("short", "medium", "long")
# --verdict-profile: each backend's own (auto), or one forced on all (profiles.py).
PROFILE_CHOICES = ("auto", "16bit", "8bit")
REPORT_SECTIONS = (
    "logprobs",
    "agreement",
    "perplexity",
    "mmlu",
    "throughput",
    "memory",
    "determinism",
)


@dataclass(frozen=True)
class WindowGroup:
    """`count` teacher-forced windows of `length` tokens (count 0: the group is not run)."""

    length: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 0 or (self.count > 0 and self.length < 2):
            raise ValueError(f"a window group needs count >= 0 and length >= 2, got {self}")


@dataclass(frozen=True)
class Sizes:
    """How much each section measures (per backend)."""

    logprob_prompts: int = 2
    logprob_prompt_len: int = 48
    logprob_new_tokens: int = 8
    short: WindowGroup = WindowGroup(512, 2)
    medium: WindowGroup = WindowGroup(2048, 1)
    long: WindowGroup = WindowGroup(8192, 0)
    prefix_len: int = 512
    suffix_len: int = 64
    ppl_group: str = "medium"
    mmlu_per_subject: int = 1
    mmlu_subjects: int = 0  # 0: every subject; N: the first N in alphabetical order
    throughput_input_lens: tuple[int, ...] = (16, 128, 512)
    throughput_output_lens: tuple[int, ...] = (16,)
    throughput_concurrency: tuple[int, ...] = (1, 4)
    throughput_repeats: int = 2
    determinism_runs: int = 3
    determinism_prompt_len: int = 200  # whole pages at every page size up to 128: a cache hit
    determinism_new_tokens: int = 16
    determinism_batch: int = 4
    remote_top_n: int = 20

    def __post_init__(self) -> None:
        if self.ppl_group not in CONTEXT_GROUPS:
            raise ValueError(
                f"ppl_group={self.ppl_group!r}; choose one of: {', '.join(CONTEXT_GROUPS)}"
            )
        positive = (
            "logprob_prompt_len",
            "throughput_repeats",
            "determinism_prompt_len",
            "remote_top_n",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("throughput_input_lens", "throughput_output_lens", "throughput_concurrency"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must hold values >= 1, got {getattr(self, name)}")
        if self.determinism_runs and self.determinism_runs < 2:
            raise ValueError("determinism_runs must be 0 (off) or >= 2")

    def group(self, name: str) -> WindowGroup:
        return getattr(self, name)


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits of the verdicts. None: the figure is reported without a verdict."""

    logprob_delta: float = 5e-2
    logprob_delta_quantile: float = 0.99
    mean_kl: float = 2e-3
    ppl_delta_rel: float = 5e-3
    consistency_tol: float = 1e-4
    determinism_logprob_tol: float | None = None
    max_mmlu_flip_rate: float | None = None
    min_decode_speedup: float | None = None
    max_kv_bytes_ratio: float | None = None
    # The 8-bit profile's own bars (profiles.py).
    min_top1: float = 0.98
    mcnemar_alpha: float = 0.05
    # 8-bit profile: |Δ logprob| allowed between a decode step and teacher forcing. They take
    # other GEMM shapes, where INT8 codes flip (measured max 0.38: tests/int8_flips.py).
    cross_path_tol_8bit: float = 0.75
    # The same for a 16-bit backend whose model runs in bf16 or fp16: its decode and prefill
    # GEMMs of other shapes round differently. Exact attention on SmolLM2 in bf16 moved up
    # to 0.25 (H100, BENCHMARKS.md 2026-12-06); a wrong position or cache moves several.
    cross_path_tol_16bit_model: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.logprob_delta_quantile <= 1:
            raise ValueError(
                f"logprob_delta_quantile must be in (0, 1], got {self.logprob_delta_quantile}"
            )
        for name in ("logprob_delta", "mean_kl", "ppl_delta_rel", "consistency_tol"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("cross_path_tol_8bit", "cross_path_tol_16bit_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_top1", "mcnemar_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")

    def logprob_tols(self, profile: str, model_dtype: str = "float32") -> tuple[float, float]:
        """(prompt, output) tolerances of returned logprobs against teacher forcing: prompt
        positions take the same path (exact); output positions are decoded, within
        logprob_delta (16-bit profile, fp32 model), cross_path_tol_16bit_model (16-bit
        profile, bf16 or fp16 model) or cross_path_tol_8bit (8-bit profile, any model)."""
        if profile == "8bit":
            return self.consistency_tol, self.cross_path_tol_8bit
        if model_dtype in ("bfloat16", "float16"):
            return self.consistency_tol, max(self.logprob_delta, self.cross_path_tol_16bit_model)
        return self.consistency_tol, self.logprob_delta


@dataclass(frozen=True)
class ValidateConfig:
    """One validation run. backends[0] is the reference every other backend is compared with.

    labels: a unique name per entry of `backends` (a backend named twice gets "name#2"),
    so a backend can be compared with itself.
    """

    mode: str
    backends: tuple[str, ...]
    sizes: Sizes = field(default_factory=Sizes)
    thresholds: Thresholds = field(default_factory=Thresholds)
    sections: tuple[str, ...] = REPORT_SECTIONS
    confidence: float = 0.95
    seed: int = 0
    verdict_profile: str = "auto"  # profiles.PROFILE_CHOICES

    def __post_init__(self) -> None:
        if self.verdict_profile not in PROFILE_CHOICES:
            raise ValueError(
                f"--verdict-profile {self.verdict_profile!r}: choose from "
                f"{', '.join(PROFILE_CHOICES)}"
            )
        if len(self.backends) < 1:
            raise ValueError("--backends needs at least one backend")
        unknown = [s for s in self.sections if s not in REPORT_SECTIONS]
        if unknown:
            raise ValueError(
                f"unknown sections {unknown}; choose from: {', '.join(REPORT_SECTIONS)}"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        seen: dict[str, int] = {}
        out = []
        for name in self.backends:
            seen[name] = seen.get(name, 0) + 1
            out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return tuple(out)

    @property
    def reference(self) -> str:
        return self.labels[0]

    def runs(self, section: str) -> bool:
        return section in self.sections


QUICK = Sizes()
FULL = Sizes(
    logprob_prompts=4,
    logprob_prompt_len=128,
    logprob_new_tokens=32,
    short=WindowGroup(512, 8),
    medium=WindowGroup(2048, 4),
    long=WindowGroup(8192, 2),
    prefix_len=2048,
    suffix_len=512,
    mmlu_per_subject=10,
    throughput_input_lens=(32, 512, 2048),
    throughput_output_lens=(16, 128),
    throughput_concurrency=(1, 4, 16),
    throughput_repeats=3,
    determinism_runs=5,
    determinism_prompt_len=256,
    determinism_new_tokens=64,
    determinism_batch=8,
)
PRESETS: dict[str, Sizes] = {"quick": QUICK, "full": FULL}


def sizes_with(preset: str, overrides: dict[str, Any]) -> Sizes:
    """The preset's sizes with the given fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown mode {preset!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
