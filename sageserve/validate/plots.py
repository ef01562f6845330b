"""PNG plots of a run (matplotlib, Agg backend: no display needed).

kl_histogram.png, logprob_delta_by_position.png, throughput_vs_input.png, memory.png;
each drawn only from numbers measured in the run, and only when there is something to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sageserve.validate.agreement import PREFIX_GROUP
from sageserve.validate.sections import PlotData

_KL_FLOOR = 1e-9  # KL is 0 for identical rows; log-scale bins need a positive floor
_POSITION_BINS = 32


def kl_histogram(data: PlotData, reference: str, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for label, groups in data.kl.items():
        if label == reference:
            continue
        kl = torch.cat(list(groups.values())).clamp_min(_KL_FLOOR).log10().numpy()
        ax.hist(kl, bins=60, histtype="step", label=label)
        drawn = True
    ax.set(
        xlabel=f"log10 KL(reference || backend) per token (floor {_KL_FLOOR:g})",
        ylabel="tokens",
        title=f"KL against {reference}, all teacher-forced tokens",
    )
    return _save(fig, ax, path, drawn)


def _binned_mean(windows: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Mean |Δ logprob| per position bin, averaged over windows of one length."""
    stacked = torch.stack(windows).mean(dim=0)
    bins = torch.tensor_split(stacked, min(_POSITION_BINS, stacked.numel()))
    centers, means, start = [], [], 0
    for b in bins:
        centers.append(start + (b.numel() - 1) / 2)
        means.append(b.mean().item())
        start += b.numel()
    return centers, means


def delta_by_position(data: PlotData, reference: str, path: Path) -> bool:
    """Mean |Δ logprob| by position, binned, per backend and context group."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for label, groups in data.delta_by_window.items():
        if label == reference:
            continue
        for group, windows in groups.items():
            if group == PREFIX_GROUP:
                continue  # its positions start after the cached prefix: not comparable here
            x, y = _binned_mean(windows)
            ax.plot(x, y, marker=".", label=f"{label} {group}")
            drawn = True
    ax.set(
        xlabel="position in window (scored token)",
        ylabel="mean |Δ logprob|",
        yscale="log",
        title=f"|Δ logprob| against {reference} by position",
    )
    return _save(fig, ax, path, drawn)


def throughput_plot(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for label, per_case in summary.items():
        series: dict[str, list[tuple[int, float, float]]] = {}
        for key, s in per_case.items():
            in_len, rest = key.removeprefix("in").split("-", 1)
            series.setdefault(rest, []).append(
                (int(in_len), s["decode_tok_s_per_request"]["median"], s["ttft_s"]["median"])
            )
        for rest, pts in series.items():
            pts.sort()
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1] for p in pts], marker="o", label=f"{label} {rest}")
            axes[1].plot(xs, [p[2] for p in pts], marker="o", label=f"{label} {rest}")
            drawn = True
    axes[0].set(xlabel="input tokens", ylabel="decode tok/s per request (median)", xscale="log")
    axes[1].set(xlabel="input tokens", ylabel="TTFT s (median)", xscale="log", yscale="log")
    if drawn:
        axes[1].legend(fontsize=6)
    return _save(fig, axes[0], path, drawn)


def memory_plot(per_backend: dict[str, dict[str, Any]], path: Path) -> bool:
    labels, rows = list(per_backend), list(per_backend.values())
    if not labels:
        return False
    # Remote servers report no peak (and other servers no byte figures at all).
    kinds = [k for k in ("weights_bytes", "pool_bytes", "peak") if all(k in r for r in rows)]
    if not kinds:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        vals = [_mib(_bytes(per_backend[lb], kind)) for lb in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=kind)
    ax.set_xticks([j + width for j in range(len(labels))], labels)
    ax.set(ylabel="MiB", title="memory per backend (peak: RSS on CPU, max allocated on CUDA)")
    return _save(fig, ax, path, True)


def _bytes(row: dict[str, Any], kind: str) -> int:
    return row[kind]["peak_bytes"] if kind == "peak" else row[kind]


def _mib(n: int) -> float:
    return n / 2**20


def _save(fig: Any, ax: Any, path: Path, drawn: bool) -> bool:
    if drawn:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def draw_all(sections: dict[str, Any], data: PlotData, reference: str, out: Path) -> list[str]:
    """Write every plot that has data; returns the file names written."""
    jobs = {
        "kl_histogram.png": lambda p: kl_histogram(data, reference, p),
        "logprob_delta_by_position.png": lambda p: delta_by_position(data, reference, p),
        "throughput_vs_input.png": lambda p: throughput_plot(
            sections["throughput"]["results"].get("backends", {}), p
        ),
        "memory.png": lambda p: memory_plot(sections["memory"]["results"].get("backends", {}), p),
    }
    return [name for name, draw in jobs.items() if draw(out / name)]
