"""The server's own step timings over a `bench serving` run: /metrics before and after.

A sageserve server counts each engine step call's wall time and the part of it spent
waiting for the device, by the kind of step launched (`sageserve_step_duration_seconds`,
`sageserve_step_device_wait_seconds`; `engine/step_timing.py`). Differencing two scrapes
gives the run's steps: whether its long inter-token gaps are long steps, and whether those
waited for the device (GPU-bound) or not (host-bound). Other servers have no such metrics:
then the run records none.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

DURATION = "sageserve_step_duration_seconds"
DEVICE_WAIT = "sageserve_step_device_wait_seconds"
GC_PAUSE = "sageserve_gc_pause_seconds"
QUANTILES = (50, 99)

# (sample name, kind, bucket bound or None) -> value
Samples = dict[tuple[str, str, float | None], float]


def scrape(url: str, headers: dict[str, str]) -> Samples | None:
    """The step histograms' samples from GET {url}/metrics (empty before the server's first
    step); None when the server does not answer 200 or has no step metrics."""
    try:
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse(response.text)


def parse(text: str) -> Samples | None:
    """The step histograms' samples of a Prometheus text exposition: empty before the
    server's first step, None when it has no such histograms."""
    samples: Samples = {}
    found = False
    for family in text_string_to_metric_families(text):
        if family.name not in (DURATION, DEVICE_WAIT, GC_PAUSE):
            continue
        found = found or family.name != GC_PAUSE
        for s in family.samples:
            le = s.labels.get("le")
            samples[(s.name, _kind(s.labels), float(le) if le is not None else None)] = s.value
    return samples if found else None


def _kind(labels: dict[str, str]) -> str:
    """A step histogram's kind; a collection's "process gen N"."""
    if "kind" in labels:
        return labels["kind"]
    return f"{labels['process']} gen {labels['generation']}"


def step_summary(before: Samples, after: Samples) -> dict[str, dict[str, Any]]:
    """Per kind of step, over the run: steps, mean wall and device-wait seconds, and the
    bucket bounds under which 50% and 99% of the steps' wall times fell."""
    summary = {}
    for kind, count in _counts_over_run(before, after, DURATION).items():
        row: dict[str, Any] = {
            "steps": int(count),
            "mean_s": _delta(before, after, f"{DURATION}_sum", kind) / count,
            "device_wait_mean_s": _delta(before, after, f"{DEVICE_WAIT}_sum", kind) / count,
        }
        buckets = _bucket_deltas(before, after, kind)
        for q in QUANTILES:
            row[f"p{q}_at_most_s"] = _bound_at(buckets, count * q / 100)
        summary[kind] = row
    return summary


def gc_summary(before: Samples, after: Samples) -> dict[str, dict[str, Any]]:
    """Per process and generation, the run's collections: count, total and mean seconds,
    and the bucket bound under which the longest fell."""
    summary = {}
    for kind, count in _counts_over_run(before, after, GC_PAUSE).items():
        total = _delta(before, after, f"{GC_PAUSE}_sum", kind)
        buckets = _bucket_deltas(before, after, kind, GC_PAUSE)
        summary[kind] = {
            "collections": int(count),
            "total_s": total,
            "mean_s": total / count,
            "max_at_most_s": _bound_at(buckets, count),
        }
    return summary


def format_gc(summary: dict[str, dict[str, Any]] | None) -> str:
    """One line: each process and generation's collections, total ms and longest bound."""
    if summary is None:
        return "server gc pauses: not reported by the server"
    parts = [
        f"{kind} {row['collections']} x {row['mean_s'] * 1e3:.2f} ms (total "
        f"{row['total_s'] * 1e3:.1f}, max <= {row['max_at_most_s'] * 1e3:g})"
        for kind, row in summary.items()
    ]
    return "server gc pauses: " + ("; ".join(parts) or "none")


def format_steps(summary: dict[str, dict[str, Any]] | None) -> str:
    """One line: each kind's steps, mean wall, mean device wait and p99 bound, in ms."""
    if not summary:
        return "server steps: not reported by the server"
    parts = [
        f"{kind} {row['steps']} x {row['mean_s'] * 1e3:.1f} ms (device wait "
        f"{row['device_wait_mean_s'] * 1e3:.1f}, p99 <= {row['p99_at_most_s'] * 1e3:.1f})"
        for kind, row in summary.items()
    ]
    return "server steps: " + "; ".join(parts)


def _counts_over_run(before: Samples, after: Samples, family: str) -> dict[str, float]:
    """A histogram family's observations over the run, by kind (kinds with none left out)."""
    name = f"{family}_count"
    kinds = sorted({kind for (n, kind, _) in after if n == name})
    counts = {kind: _delta(before, after, name, kind) for kind in kinds}
    return {kind: count for kind, count in counts.items() if count > 0}


def _delta(before: Samples, after: Samples, name: str, kind: str, le: float | None = None) -> float:
    key = (name, kind, le)
    return after.get(key, 0.0) - before.get(key, 0.0)


def _bucket_deltas(
    before: Samples, after: Samples, kind: str, family: str = DURATION
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count over the run), by bound."""
    name = f"{family}_bucket"
    bounds = sorted(le for (n, k, le) in after if n == name and k == kind and le is not None)
    return [(le, _delta(before, after, name, kind, le)) for le in bounds]


def _bound_at(buckets: list[tuple[float, float]], rank: float) -> float:
    """The smallest bucket bound whose cumulative count reaches rank."""
    return next(le for le, cumulative in buckets if cumulative >= rank)
