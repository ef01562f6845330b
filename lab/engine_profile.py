"""Spawn targets for `lab/serve_variant.py`'s engine process: the engine under cProfile, one
profile per kind of step, or with lab switches (Triton's launches made directly; K/V stores
inside the piecewise graphs off). (Issue 16: where do sage_attn's mixed steps spend their
host time inside the server's engine process?).

Under 32 streaming clients sage_attn's mixed steps took 15.6-17.7 ms in the engine process
with ~0 device wait, against 11.3-12.4 ms for the engine alone (BENCHMARKS.md, "The engine
in a process of its own"). `lab/serve_variant.py --engine-profile OUT` spawns the engine
process through `run_profiled` below: every `engine.step()` runs under a fresh
`cProfile.Profile`, whose statistics are added to its kind's (decode, mixed, prefill); when
the server stops, OUT.txt gets each kind's steps, mean wall time (inflated by the profiler)
and top functions by own and cumulative time, and OUT-<kind>.pstats the raw statistics.
The profiler slows Python several-fold: read the shares, not the times, and take ITL from
a run without it.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from typing import Any

ENV = "SAGESERVE_ENGINE_PROFILE"  # the output path's stem, set by serve_variant
DIRECT_LAUNCH_ENV = "SAGESERVE_LAB_DIRECT_LAUNCH"  # "on" / "off", set by serve_variant
PIECE_STORE_ENV = "SAGESERVE_LAB_PIECE_STORE"  # "on" / "off", set by serve_variant
TOP = 45


class _ByKind:
    def __init__(self) -> None:
        self.stats: dict[str, pstats.Stats] = {}
        self.walls: dict[str, list[float]] = {}

    def add(self, kind: str, profile: cProfile.Profile, wall: float) -> None:
        if kind in self.stats:
            self.stats[kind].add(profile)
        else:
            self.stats[kind] = pstats.Stats(profile)
        self.walls.setdefault(kind, []).append(wall)

    def write(self, stem: str) -> None:
        out = io.StringIO()
        for kind, stats in sorted(self.stats.items()):
            walls = self.walls[kind]
            out.write(f"=== {kind}: {len(walls)} steps, mean {sum(walls) / len(walls) * 1e3:.2f} "
                      "ms wall under the profiler\n")  # fmt: skip
            stats.dump_stats(f"{stem}-{kind}.pstats")
            for order in ("tottime", "cumulative"):
                out.write(f"--- by {order}\n")
                stats.stream = out
                stats.sort_stats(order).print_stats(TOP)
        with open(f"{stem}.txt", "w") as f:
            f.write(out.getvalue())


def run_profiled(*args: Any) -> None:
    """`run_engine_process(*args)` with every step profiled; the spawn target."""
    from sageserve.server import engine_core, engine_process

    by_kind = _ByKind()
    real_step = engine_core.EngineCore._step

    def profiled_step(self: engine_core.EngineCore, report: engine_core.Report) -> None:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        try:
            real_step(self, report)
        finally:
            profile.disable()
        kind = report.step.kind if report.step is not None else "failed"
        by_kind.add(kind, profile, time.perf_counter() - start)

    engine_core.EngineCore._step = profiled_step  # type: ignore[method-assign]
    try:
        engine_process.run_engine_process(*args)
    finally:
        by_kind.write(os.environ[ENV])


def run_with_switches(*args: Any) -> None:
    """`run_engine_process(*args)` with the switches serve_variant asked for (a spawned
    process imports every module afresh, with its defaults): `kernel_launch.ENABLED`, and
    K/V stores inside the piecewise graphs or not; the spawn target."""
    from sageserve.server import engine_process

    direct, piece_store = os.environ.get(DIRECT_LAUNCH_ENV), os.environ.get(PIECE_STORE_ENV)
    if direct is not None:
        from sageserve import kernel_launch

        kernel_launch.ENABLED = direct == "on"
    if piece_store == "off":
        disable_piece_stores()
    print(f"engine process: direct launches {direct or 'as served'}, piece stores "
          f"{piece_store or 'as served'}", flush=True)  # fmt: skip
    engine_process.run_engine_process(*args)


def disable_piece_stores() -> None:
    """Every backend stores K/V with its attention, eagerly, in the piecewise graphs' steps
    (the base class's `piece_store`, None), as before the stores moved into the pieces."""
    from sageserve.attention.base import AttentionBackend
    from sageserve.attention.sage_attn.backend import SageAttentionBackend
    from sageserve.attention.triton_attn.backend import TritonBackend

    for cls in (TritonBackend, SageAttentionBackend):
        cls.piece_store = AttentionBackend.piece_store  # type: ignore[method-assign]
