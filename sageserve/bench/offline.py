"""`sageserve bench offline`: the engine's speed over a grid of batch x input x output, per
attention backend, without HTTP (SGLang's `bench_one_batch` plays this part).

An engine is a backend with the fused layer kernels on (its name) or off (name+unfused),
the small-batch GEMV on or off (+cublas), the overlap schedule on or off (+no-overlap), and
the prefill cap while decoding at the engine's default or off (+no-cap; it matters to the
whole-batch pass, `--whole-batch`).
The weights load once; each round builds every engine in turn (A, B, A, B ...),
warms it (one untimed pass of every batch x input length, two output tokens, so Triton's
prefill kernels are compiled before timing; decode graphs were captured at build), then
times every point once (`offline_measure.run_point`). The device copy bandwidth is measured
in the same run, and every point gets its decode bound and the fraction of it reached.
Writes one JSON (figures per round and their median/min/max, engine facts, device,
versions, date, command) and a Markdown table; exit 0, or 1 when a point could not run
(listed under "problems"); bad flags exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sageserve.attention.registry import backend_names
from sageserve.bench.offline_measure import (
    SAMPLING,
    GridPoint,
    decode_bound,
    run_point,
    summarize,
)
from sageserve.bench.run_record import (
    default_out,
    device_info,
    software,
    write_json,
)
from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.info import MemoryUsage
from sageserve.engine_args import engine_config_from_args
from sageserve.models.loader import LoadedModel, load_model


class EngineVariant(NamedTuple):
    """One engine of a round: the backend and its switches."""

    backend: str
    fused_layers: bool
    overlap: bool
    prefill_cap: bool
    graph_sampling: bool
    fused_gemv: bool

    def config(self, base: EngineConfig) -> EngineConfig:
        """`base` with this engine's backend and switches (prefill cap off: 0 tokens)."""
        scheduler = base.scheduler
        if not self.prefill_cap:
            scheduler = replace(scheduler, max_prefill_tokens_while_decoding=0)
        graphs = replace(base.cuda_graph, disable_sampling=not self.graph_sampling)
        return replace(base, attention_backend=self.backend, fused_layers=self.fused_layers,
                       fused_gemv=self.fused_gemv, overlap_schedule=self.overlap,
                       scheduler=scheduler, cuda_graph=graphs)  # fmt: skip


@dataclass(frozen=True)
class OfflineBenchConfig:
    """The grid and the rounds; validates itself (ValueError names the valid choices)."""

    backends: tuple[str, ...]
    fused_layers: tuple[bool, ...]
    overlap: tuple[bool, ...]
    batch_sizes: tuple[int, ...]
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    rounds: int
    seed: int
    prefill_cap: tuple[bool, ...] = (True,)
    whole_batch: bool = False
    sampling: str = "greedy"
    graph_sampling: tuple[bool, ...] = (True,)
    fused_gemv: tuple[bool, ...] = (True,)

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in backend_names()]
        if bad or not self.backends:
            raise ValueError(f"--backends {bad}: choose from {', '.join(backend_names())}")
        sizes = {"--batch-sizes": self.batch_sizes, "--input-lens": self.input_lens}
        for flag, values in sizes.items():
            if not values or min(values) < 1:
                raise ValueError(f"{flag} must be positive integers, got {values}")
        if not self.output_lens or min(self.output_lens) < 2:
            raise ValueError(f"--output-lens must be >= 2 (one prefill token, then decode steps), "
                             f"got {self.output_lens}")  # fmt: skip
        switches = (("--fused-layers", self.fused_layers), ("--overlap", self.overlap),
                    ("--prefill-cap", self.prefill_cap),
                    ("--graph-sampling", self.graph_sampling),
                    ("--fused-gemv", self.fused_gemv))  # fmt: skip
        for flag, values in switches:
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{flag} takes on, off, or on,off")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"--sampling {self.sampling!r}: choose from {', '.join(SAMPLING)}")

    def engines(self) -> list[EngineVariant]:
        """Every engine of a round, in build order. Without the fused layers there is no
        GEMV: such engines appear once, GEMV off."""
        switches = (self.fused_layers, self.overlap, self.prefill_cap, self.graph_sampling,
                    self.fused_gemv)  # fmt: skip
        engines = [EngineVariant(*e) for e in itertools.product(self.backends, *switches)]
        engines = [e._replace(fused_gemv=e.fused_gemv and e.fused_layers) for e in engines]
        return list(dict.fromkeys(engines))

    def points(self) -> list[GridPoint]:
        sizes = itertools.product(self.batch_sizes, self.input_lens, self.output_lens)
        return [GridPoint(*size) for size in sizes]


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    """The grid flags of `sageserve bench offline` (engine flags are added by the CLI)."""
    add = parser.add_argument
    add("--backends", default=None,
        help=f"attention backends to compare, comma-separated, of: {','.join(backend_names())} "
        "(default: triton,sage_attn on CUDA, torch on CPU)")  # fmt: skip
    add("--fused-layers", default="on",
        help="on, off, or on,off (each backend with and without fused layer kernels)")  # fmt: skip
    add("--overlap", default="on",
        help="on, off, or on,off (each backend with and without the overlap schedule)")  # fmt: skip
    add("--prefill-cap", default="on",
        help="on, off, or on,off: the prefill cap while decoding at the engine's default "
        "(or --max-prefill-tokens-while-decoding), or off")  # fmt: skip
    add("--sampling", default="greedy",
        help=f"the requests' sampling, of: {', '.join(SAMPLING)} (top-p: temperature 0.8, "
        "top-p 0.95, seeded)")  # fmt: skip
    add("--graph-sampling", default="on",
        help="on, off, or on,off: decode steps sampled in the CUDA graphs, or by the eager "
        "sampler after the replay (--disable-cuda-graph-sampling)")  # fmt: skip
    add("--fused-gemv", default="on",
        help="on, off, or on,off: decode projections of 1-4 rows by the Triton GEMV with "
        "programmatic dependent launch (sm_90+, fused layers on), or by cuBLAS "
        "(--disable-fused-gemv)")  # fmt: skip
    add("--whole-batch", action="store_true",
        help="also time each point as LLM.generate runs it: fresh prompts queued at once, "
        "decoding beside the rest's prefill (generate_s, generate_tok_s)")  # fmt: skip
    add("--batch-sizes", default="1,64", help="requests decoded together")
    add("--input-lens", default="512,8192", help="prompt tokens per request")
    add("--output-lens", default="128", help="generated tokens per request (>= 2)")
    add("--rounds", type=int, default=2, help="engines built per backend, alternated")
    add("--bench-seed", type=int, default=0, help="seed of the random prompts")
    add("--out", default=None,
        help="JSON path (default sageserve-reports/offline-<card>-<date>-<time>.json, "
        "untracked); Markdown goes next to it (.md) and to stdout")  # fmt: skip


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in text.split(",") if word.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _switches(flag: str, text: str) -> tuple[bool, ...]:
    values = {"on": True, "off": False}
    words = _words(text)
    if not words or any(w not in values for w in words):
        raise ValueError(f"{flag} takes on, off, or on,off; got {text!r}")
    return tuple(values[w] for w in words)


def config_from_args(args: argparse.Namespace, device: torch.device) -> OfflineBenchConfig:
    default = "triton,sage_attn" if device.type == "cuda" else "torch"
    return OfflineBenchConfig(
        backends=_words(args.backends or default),
        fused_layers=_switches("--fused-layers", args.fused_layers),
        overlap=_switches("--overlap", args.overlap),
        batch_sizes=_ints("--batch-sizes", args.batch_sizes),
        input_lens=_ints("--input-lens", args.input_lens),
        output_lens=_ints("--output-lens", args.output_lens),
        rounds=args.rounds,
        seed=args.bench_seed,
        prefill_cap=_switches("--prefill-cap", args.prefill_cap),
        whole_batch=args.whole_batch,
        sampling=args.sampling,
        graph_sampling=_switches("--graph-sampling", args.graph_sampling),
        fused_gemv=_switches("--fused-gemv", args.fused_gemv),
    )


def run_benchmark(
    cfg: OfflineBenchConfig, base: EngineConfig, out: Path | None
) -> tuple[dict[str, Any], Path]:
    """The whole run; the result is written to `out` after every engine and at the end."""
    from sageserve.bench.kernels_timing import COPY_BYTES, Timer, copy_bandwidth

    if not base.cache.enable_prefix_cache:
        raise ValueError("bench offline needs the prefix cache (drop --disable-prefix-cache): "
                         "its decode pass reuses the pages of its prefill pass")  # fmt: skip
    if True in cfg.prefill_cap and base.scheduler.max_prefill_tokens_while_decoding == 0:
        raise ValueError("--prefill-cap on with --max-prefill-tokens-while-decoding 0: "
                         "give the cap a size, or use --prefill-cap off")  # fmt: skip
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    device = base.torch_device()
    out = out or default_out("offline", device_info(device), now.strftime("%Y-%m-%d-%H%M%S"))
    result = _result_header(cfg, base, now)
    result["copy_bandwidth"] = copy_bandwidth(Timer(device, 2, 5, 20.0), COPY_BYTES[device.type])
    loaded = load_model(base.model_path, load_format=base.load_format, dtype=base.dtype,
                        device=device, seed=base.seed)  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.seed)
    for round_index in range(cfg.rounds):
        for engine in cfg.engines():
            _run_engine(cfg, engine.config(base), loaded, generator, result, round_index)
            write_json(result, out)
    _finish_rows(result)
    result["complete"] = True
    result["wall_s"] = time.monotonic() - started
    write_json(result, out)
    return result, out


def _result_header(
    cfg: OfflineBenchConfig, base: EngineConfig, now: datetime.datetime
) -> dict[str, Any]:
    return {
        "benchmark": "sageserve bench offline",
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(["sageserve", *sys.argv[1:]]),
        "machine": {"hostname": platform.node(), "platform": platform.platform()},
        "device": device_info(base.torch_device()),
        "software": software(),
        "settings": asdict(cfg),
        "engine_config": asdict(base),
        "method": _method(),
        "engines": {},
        "rows": {},
        "problems": [],
        "complete": False,
    }


def _run_engine(
    cfg: OfflineBenchConfig,
    config: EngineConfig,
    loaded: LoadedModel,
    generator: torch.Generator,
    result: dict[str, Any],
    round_index: int,
) -> None:
    """Build one engine, warm it, time every point that fits it once."""
    name = engine_name(config)
    build_start = time.monotonic()
    with Engine(config, loaded) as engine:
        result["engines"].setdefault(name, {"info": asdict(engine.info), "build_s": []})
        result["engines"][name]["build_s"].append(time.monotonic() - build_start)
        points = [p for p in cfg.points() if _fits(p, engine, name, result, round_index)]
        _warm_up(engine, points, generator, cfg)
        for point in points:
            row = result["rows"].setdefault(f"{name}/{point.key}", _new_row(name, point))
            sampling = SAMPLING[cfg.sampling]
            row["runs"].append(run_point(engine, point, generator, cfg.whole_batch, sampling))
            print(_progress(row, round_index), flush=True)


def engine_name(config: EngineConfig) -> str:
    """The backend, then what differs from the defaults: "+unfused", "+cublas",
    "+no-overlap", "+no-cap", "+eager-sampling"."""
    name = config.attention_backend
    name += "" if config.fused_layers else "+unfused"
    name += "" if config.fused_gemv or not config.fused_layers else "+cublas"
    name += "" if config.overlap_schedule else "+no-overlap"
    name += "+no-cap" if config.scheduler.max_prefill_tokens_while_decoding == 0 else ""
    return name + ("+eager-sampling" if config.cuda_graph.disable_sampling else "")


def _fits(
    point: GridPoint, engine: Engine, name: str, result: dict[str, Any], round_index: int
) -> bool:
    """False (and a problem recorded, once) when the engine cannot hold the point."""
    info = engine.info
    reason = None
    if point.input_len + point.output_len > info.context_length:
        reason = f"input + output exceed the context length {info.context_length}"
    elif point.tokens_needed() > info.pool_capacity_tokens:
        reason = (f"needs {point.tokens_needed()} KV tokens, the pool holds "
                  f"{info.pool_capacity_tokens}")  # fmt: skip
    elif point.batch > info.max_running_requests:
        reason = f"batch above --max-running-requests {info.max_running_requests}"
    if reason is not None and round_index == 0:
        result["problems"].append(f"{name}/{point.key} skipped: {reason}")
    return reason is None


def _warm_up(
    engine: Engine, points: list[GridPoint], generator: torch.Generator, cfg: OfflineBenchConfig
) -> None:
    """One untimed pass of every batch x input length with two output tokens."""
    shapes = dict.fromkeys((p.batch, p.input_len) for p in points)
    for batch, input_len in shapes:
        point = GridPoint(batch, input_len, 2)
        run_point(engine, point, generator, cfg.whole_batch, SAMPLING[cfg.sampling])


def _new_row(engine: str, point: GridPoint) -> dict[str, Any]:
    return {"engine": engine, **asdict(point), "runs": []}


def _finish_rows(result: dict[str, Any]) -> None:
    """Median/min/max over rounds, the decode bound and the fraction of it reached."""
    copy = result["copy_bandwidth"]["gb_per_s"]
    for row in result["rows"].values():
        memory = result["engines"][row["engine"]]["info"]["memory"]
        point = GridPoint(row["batch"], row["input_len"], row["output_len"])
        row["summary"] = summarize(row["runs"])
        row["bound"] = decode_bound(point, MemoryUsage(**memory), copy)
        decode = row["summary"]["decode_tok_s"]["median"]
        row["fraction_of_bound"] = decode / row["bound"]["bound_tok_s"]


def _progress(row: dict[str, Any], round_index: int) -> str:
    run = row["runs"][-1]
    return (
        f"round {round_index + 1} {row['engine']:>10} b{row['batch']} in{row['input_len']} "
        f"out{row['output_len']}: prefill {run['prefill_s']:.3f} s, decode "
        f"{run['decode_tok_s']:.1f} tok/s ({run['decode_step_ms']:.2f} ms/step)"
    )


def _method() -> dict[str, str]:
    from sageserve.bench import offline_measure

    return {
        "point": offline_measure.__doc__.strip(),
        "rounds": "weights loaded once; per round every engine (backend x fused layers x "
        "overlap x prefill cap x graph sampling x fused GEMV) in "
        "turn (A, B, A, B ...), each warmed by an untimed pass of every batch x input "
        "length (2 output tokens); figures are median [min, max] over rounds",
        "copy_bandwidth": "dst.copy_(src) of one uint8 buffer on the device, (bytes read + "
        "written) / time, median of 5 samples, measured once at the start of the run",
    }


def run(args: argparse.Namespace) -> int:
    """`sageserve bench offline`: 0 when every point ran, 1 when one could not."""
    from sageserve.bench.offline_report import format_markdown

    base = engine_config_from_args(args)
    cfg = config_from_args(args, base.torch_device())
    result, out = run_benchmark(cfg, base, Path(args.out) if args.out else None)
    markdown = format_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['wall_s']:.0f} s")
    return 1 if result["problems"] else 0
