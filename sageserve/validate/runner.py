"""Local validation: the model loaded once per dtype, an engine per backend built one at a time.

Per backend (the reference first) one phase runs logprob checks, teacher-forced agreement
windows, the prefix-cache case, MMLU and determinism, with its peak memory measured around
it; then throughput alternates the backends over rounds. An entry `name@dtype` runs its
backend over the model in that dtype (backend_spec.py), the others in the run's dtype.
`run_local` returns the raw results; `sections.py` turns them into the report's sections
and verdicts.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.models.loader import LoadedModel, load_model
from sageserve.validate import agreement, determinism, logprob_check, memory, mmlu, throughput
from sageserve.validate.backend_spec import parse_backend_spec
from sageserve.validate.config import CONTEXT_GROUPS, ValidateConfig
from sageserve.validate.data import MMLUQuestion, britannica_text, mmlu_questions, stratified_subset
from sageserve.validate.machine_load import LoadSampler
from sageserve.validate.profiles import ProfileChoice
from sageserve.validate.workload import TextSource, built_engine


@dataclass
class Plan:
    """The exact inputs every backend gets (identical tokens for all)."""

    logprob_prompts: list[list[int]]
    windows: list[agreement.Window]
    prefix: list[int]
    suffix: list[int]
    prefix_offset: int
    questions: list[MMLUQuestion]
    det_prompt: list[int]
    det_others: list[list[int]]


@dataclass
class LocalResults:
    """Raw measurements per backend label (see each section module for the fields)."""

    plan: Plan
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    logprobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, agreement.BackendScores] = field(default_factory=dict)
    mmlu: dict[str, torch.Tensor] = field(default_factory=dict)
    determinism: dict[str, dict[str, Any]] = field(default_factory=dict)
    throughput: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    machine_load: dict[str, Any] = field(default_factory=dict)  # during throughput
    model_source: str = ""
    dtypes: dict[str, str] = field(default_factory=dict)  # label -> its model's dtype


def _subjects(limit: int) -> list[MMLUQuestion]:
    """Every MMLU question, or those of the first `limit` subjects alphabetically."""
    questions = mmlu_questions()
    if limit <= 0:
        return questions
    keep = set(sorted({q.subject for q in questions})[:limit])
    return [q for q in questions if q.subject in keep]


def make_plan(cfg: ValidateConfig, text: TextSource) -> Plan:
    """Cut every section's tokens from the text, distinct spans for the scored ones."""
    s = cfg.sizes
    prompts = [text.take(s.logprob_prompt_len)[1] for _ in range(s.logprob_prompts)]
    windows = []
    for group in CONTEXT_GROUPS:
        g = s.group(group)
        for i in range(g.count if cfg.runs("agreement") or cfg.runs("perplexity") else 0):
            offset, ids = text.take(g.length)
            windows.append(agreement.Window(group, i, offset, ids))
    offset, ids = text.take(s.prefix_len + s.suffix_len) if s.prefix_len else (0, [])
    questions = []
    if cfg.runs("mmlu") and s.mmlu_per_subject > 0:
        questions = stratified_subset(_subjects(s.mmlu_subjects), s.mmlu_per_subject, cfg.seed)
    n = s.determinism_prompt_len
    return Plan(
        logprob_prompts=prompts,
        windows=windows,
        prefix=ids[: s.prefix_len],
        suffix=ids[s.prefix_len :],
        prefix_offset=offset,
        questions=questions,
        det_prompt=text.cycled(0, n),
        det_others=[text.cycled((i + 1) * 7919, n + 3 * i) for i in range(s.determinism_batch - 1)],
    )


def _phase_units(cfg: ValidateConfig, plan: Plan) -> int:
    return len(plan.logprob_prompts) + len(plan.windows) + 2 + len(plan.questions)


def _backend_phase(
    cfg: ValidateConfig,
    engine: Engine,
    label: str,
    store: agreement.ReferenceStore,
    res: LocalResults,
    tols: tuple[float, float],
) -> None:
    """Every per-backend section on one engine; tols: (prompt, output) logprob tolerances."""
    plan, s, is_ref = res.plan, cfg.sizes, label == cfg.reference
    if cfg.runs("determinism") and s.determinism_runs:
        _check_determinism_fills_a_page(len(plan.det_prompt), engine.info.page_size)
    bar = tqdm(total=_phase_units(cfg, plan), desc=f"validate {label}", file=sys.stderr)
    with bar:
        if cfg.runs("logprobs"):
            bar.set_postfix_str("logprobs")
            parts = []
            for p in plan.logprob_prompts:
                parts.append(logprob_check.check_prompt(engine, p, s.logprob_new_tokens, tols))
                bar.update(1)
            res.logprobs[label] = logprob_check.merge(parts).to_dict()
        scores = res.scores.setdefault(label, agreement.BackendScores())
        bar.set_postfix_str("teacher-forced windows")
        for w in plan.windows:
            agreement.score_window(engine, w, store, is_ref, scores)
            bar.update(1)
        if cfg.runs("agreement") and plan.prefix:
            bar.set_postfix_str("prefix-cache hit")
            agreement.score_prefix_hit(engine, plan.prefix, plan.suffix, store, is_ref, scores)
        bar.update(1)
        if plan.questions:
            bar.set_postfix_str("mmlu")
            res.mmlu[label] = mmlu.score_questions(engine, plan.questions, bar)
        if cfg.runs("determinism") and s.determinism_runs:
            bar.set_postfix_str("determinism")
            res.determinism[label] = determinism.determinism_checks(
                engine,
                plan.det_prompt,
                plan.det_others,
                s.determinism_runs,
                s.determinism_new_tokens,
            )
        bar.update(1)


def _check_determinism_fills_a_page(prompt_len: int, page_size: int) -> None:
    """ValueError when the determinism prompt caches no page (its last token is always
    recomputed), so that its cache-hit run would compare nothing."""
    if prompt_len - 1 < page_size:
        raise ValueError(
            f"--determinism-prompt-len {prompt_len} fills no whole page of this backend's "
            f"{page_size} tokens, so its cache-hit run would have nothing cached; use at "
            f"least {page_size + 1} (or --page-size {max(1, prompt_len - 1)})"
        )


def _throughput(
    cfg: ValidateConfig,
    base: EngineConfig,
    models: ModelsByDtype,
    text: TextSource,
    res: LocalResults,
) -> None:
    """Alternate the backends over rounds, each round on a fresh engine (prefix cache off)."""
    s = cfg.sizes
    grid = throughput.cases(
        s.throughput_input_lens, s.throughput_output_lens, s.throughput_concurrency
    )
    total = s.throughput_repeats * len(cfg.labels) * len(grid)
    load = LoadSampler()
    with tqdm(total=total, desc="validate throughput", file=sys.stderr) as bar:
        for r in range(s.throughput_repeats):
            for label, backend, config in entries(cfg, base):
                with built_engine(
                    config, backend, models.get(config), prefix_cache=False
                ) as engine:
                    throughput.warm_up(engine)
                    for i, case in enumerate(grid):
                        bar.set_postfix_str(f"{label} {case.key}")
                        run = throughput.run_case(engine, case, text, offset=(r * 31 + i) * 4099)
                        res.throughput.setdefault(label, {}).setdefault(case.key, []).append(run)
                        load.sample()
                        bar.update(1)
    load.warn_if_busy()
    res.machine_load = load.to_dict()


def load(base: EngineConfig) -> LoadedModel:
    """The model, once, on the engine config's device and dtype."""
    return load_model(
        base.model_path,
        load_format=base.load_format,
        dtype=base.dtype,
        device=base.torch_device(),
        seed=base.seed,
    )


class ModelsByDtype:
    """The model loaded once per dtype that an entry asks for (weights shared by every
    engine of that dtype)."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedModel] = {}

    def get(self, config: EngineConfig) -> LoadedModel:
        """The model in config.dtype ("auto" and the dtype it resolves to are one entry)."""
        if config.dtype not in self._loaded:
            loaded = load(config)
            named = str(loaded.dtype).removeprefix("torch.")
            self._loaded[config.dtype] = self._loaded.setdefault(named, loaded)
        return self._loaded[config.dtype]


def entries(cfg: ValidateConfig, base: EngineConfig) -> list[tuple[str, str, EngineConfig]]:
    """(label, attention backend, engine config) per --backends entry, in order; an entry's
    own dtype (`name@dtype`) replaces the run's."""
    out = []
    for label, spec in zip(cfg.labels, cfg.backends, strict=True):
        parsed = parse_backend_spec(spec)
        out.append((label, parsed.backend, replace(base, dtype=parsed.model_dtype(base.dtype))))
    return out


def run_local(
    cfg: ValidateConfig, base: EngineConfig, profiles: dict[str, ProfileChoice]
) -> LocalResults:
    """Every local section's raw measurements (see LocalResults); each backend's returned
    logprobs are checked with its profile's tolerances."""
    models = ModelsByDtype()
    loaded = models.get(base)
    if loaded.tokenizer is None:
        raise ValueError("validate needs a model with a tokenizer (it scores real text)")
    text = TextSource(loaded.tokenizer.encode(britannica_text(), add_special_tokens=False))
    given = base.model_path or DEFAULT_MODEL
    res = LocalResults(make_plan(cfg, text), model_source=f"{given}: {loaded.source}")
    with tempfile.TemporaryDirectory(prefix="sageserve_validate_") as tmp:
        store = agreement.ReferenceStore(Path(tmp))
        for label, backend, config in entries(cfg, base):
            with (
                memory.PeakMemory(base.torch_device()) as peak,
                built_engine(config, backend, models.get(config)) as engine,
            ):
                res.memory[label] = asdict(engine.info.memory)
                res.dtypes[label] = engine.info.dtype
                tols = cfg.thresholds.logprob_tols(profiles[label].profile, engine.info.dtype)
                _backend_phase(cfg, engine, label, store, res, tols)
            res.memory[label]["peak"] = peak.to_dict()
    if cfg.runs("throughput"):
        _throughput(cfg, base, models, text, res)
    return res
