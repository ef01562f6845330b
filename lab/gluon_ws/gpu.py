"""GPU mode of the equal-length kernel: check (NaN-poisoned outputs, vs fp32, the v2
probe, the Triton kernel), then time alternated with them and cuDNN."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import triton

from lab.gluon_prefill_probe import HEAD_DIM, _accuracy, _build, _runners, gluon_prefill
from lab.gluon_ws.equal import gluon_ws_prefill
from sageserve.bench.kernels_timing import balanced_order

# ----------------------------------------------------------------------------- GPU mode


WS_VARIANTS = {"gluon_ws": False, "gluon_ws_persistent": True}  # name -> persistent grid


def _runners_ws(case, caches, table, causal: bool, stages: int,
                variants: list[str]) -> dict[str, Callable]:  # fmt: skip
    """name -> fn(out): this kernel's variants (one program per work item, persistent), the
    v2 probe kernel, the Triton kernel, cuDNN SDPA."""
    runners = _runners(case, caches, table, causal)  # gluon (v2), triton_sage_fp8, sdpa_cudnn

    def ws(persistent: bool) -> Callable:
        def run_ws(out):
            gluon_ws_prefill(case.q, *caches, table, case.seq, out, causal=causal, stages=stages,
                             persistent=persistent)  # fmt: skip

        return run_ws

    def gluon_v2(out):
        gluon_prefill(case.q, *caches, table, case.seq, out, causal=causal)

    chosen = {name: ws(WS_VARIANTS[name]) for name in variants}
    return chosen | {"gluon_v2": gluon_v2, "triton_sage_fp8": runners["triton_sage_fp8"],
                     "sdpa_cudnn": runners["sdpa_cudnn"]}  # fmt: skip


def _checked_run(fn: Callable, like: torch.Tensor) -> torch.Tensor:
    """Run fn into an output poisoned with NaN; assert every element was written finite."""
    out = torch.full_like(like, float("nan"))
    fn(out)
    torch.cuda.synchronize()
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).nonzero()[:4].tolist()
        raise AssertionError(f"non-finite output, first at [token, head, dim] {bad}")
    return out


def _time(runners: dict[str, Callable], like: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per runner, alternating runners round by round (do_bench, rep 50 ms) in
    `balanced_order`: in a fixed order the first runner always followed cuDNN's, the most
    power-hungry kernel."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(rounds):
        for name in balanced_order(list(runners), round_index):
            fn = runners[name]
            out = torch.full_like(like, float("nan"))
            times[name].append(triton.testing.do_bench(lambda f=fn, o=out: f(o), rep=50))
            if not bool(torch.isfinite(out).all()):  # the timed launches wrote it too
                raise AssertionError(f"{name}: non-finite output while timing")
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _bench_shape(case, caches, table, causal: bool, rounds: int, stages: int,
                 variants: list[str]) -> list[dict]:  # fmt: skip
    """Check every runner (poisoned outputs, finite, vs fp32, vs the v2 probe), then time."""
    seq, runners = case.seq, _runners_ws(case, caches, table, causal, stages, variants)
    outs = {name: _checked_run(fn, case.q) for name, fn in runners.items()}
    first = slice(0, seq)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t[first].float().transpose(0, 1) for t in (case.q, case.k, case.v)), is_causal=causal
    ).transpose(0, 1)
    ms = _time(runners, case.q, rounds)
    flops = 4 * case.q.shape[0] * seq * case.q.shape[1] * HEAD_DIM / (2 if causal else 1)
    rows = []
    for name in runners:
        row = {"seq": seq, "causal": causal, "variant": name, "ms": ms[name],
               "tops": flops / ms[name] / 1e9, "vs_fp32": _accuracy(outs[name][first], exact),
               "vs_gluon_v2": _accuracy(outs[name], outs["gluon_v2"]),
               "vs_triton_sage_fp8": _accuracy(outs[name], outs["triton_sage_fp8"])}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        vs_v2 = row["vs_gluon_v2"]
        if row["variant"] in variants and vs_v2["cosine"] < 0.9999:  # same numerics as v2
            raise AssertionError(f"{row['variant']} disagrees with the v2 probe at seq {seq}, "
                                 f"causal {causal}: {vs_v2}")  # fmt: skip
    return rows


def run(seqs: list[int], rounds: int, stages: int, variants: list[str],
        masks: list[bool]) -> list[dict]:  # fmt: skip
    """Check against the v2 probe, the Triton kernel and fp32 attention, then time."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in seqs:
        case, caches, table = _build(seq, gen)
        for causal in masks:
            rows += _bench_shape(case, caches, table, causal, rounds, stages, variants)
    return rows
