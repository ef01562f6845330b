"""Markdown for `sageserve bench offline`: one row per backend and point, then each backend's
decode rate against the first backend's."""

from __future__ import annotations

from typing import Any

HEADER = (
    "| engine | batch | input | output | prefill s | TTFT s | decode tok/s | ms/step | "
    "bound tok/s | of bound |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _spread(summary: dict[str, Any], name: str, digits: int) -> str:
    figure = summary[name]
    if summary["rounds"] == 1:
        return f"{figure['median']:.{digits}f}"
    return f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}, {figure['max']:.{digits}f}]"


def _row(row: dict[str, Any]) -> str:
    s = row["summary"]
    cells = [
        row["engine"], str(row["batch"]), str(row["input_len"]), str(row["output_len"]),
        _spread(s, "prefill_s", 3), _spread(s, "ttft_s", 3), _spread(s, "decode_tok_s", 1),
        _spread(s, "decode_step_ms", 2), f"{row['bound']['bound_tok_s']:.1f}",
        f"{row['fraction_of_bound']:.0%}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _ratios(result: dict[str, Any]) -> list[str]:
    engines = list(result["engines"])
    if len(engines) < 2:
        return []
    first, lines = engines[0], []
    for key, row in result["rows"].items():
        if row["engine"] == first:
            continue
        base = result["rows"].get(key.replace(row["engine"] + "/", first + "/", 1))
        if base is None:
            continue
        ratio = row["summary"]["decode_tok_s"]["median"] / base["summary"]["decode_tok_s"]["median"]
        bound = row["bound"]["bound_tok_s"] / base["bound"]["bound_tok_s"]
        lines.append(f"| {row['engine']} / {first} | {key.split('/', 1)[1]} | {ratio:.2f}x | "
                     f"{bound:.2f}x |")  # fmt: skip
    if not lines:
        return []
    head = "| engines | point | decode tok/s ratio | bound ratio |\n|---|---|---|---|"
    return ["", head, *lines]


def _whole_batch(result: dict[str, Any]) -> list[str]:
    """The whole-batch pass's table, when it ran (`--whole-batch`)."""
    rows = [r for r in result["rows"].values() if "generate_s" in r["summary"]]
    if not rows:
        return []
    head = ("| engine | batch | input | output | whole batch s | output tok/s |\n"
            "|---|---|---|---|---|---|")  # fmt: skip
    lines = [f"| {r['engine']} | {r['batch']} | {r['input_len']} | {r['output_len']} | "
             f"{_spread(r['summary'], 'generate_s', 3)} | "
             f"{_spread(r['summary'], 'generate_tok_s', 1)} |" for r in rows]  # fmt: skip
    return ["", "Whole batch, as `LLM.generate` runs it (fresh prompts queued at once):", "",
            head, *lines]  # fmt: skip


def format_markdown(result: dict[str, Any]) -> str:
    copy = result["copy_bandwidth"]
    device = result["device"]["name"]
    lines = [
        f"# sageserve bench offline: {device}, {result['date']}",
        "",
        f"Command: `{result['command']}`. Copy bandwidth {copy['gb_per_s']:.0f} GB/s "
        "(measured in this run). Figures: median [min, max] over "
        f"{result['settings']['rounds']} rounds, backends alternated. Bound: (step weight "
        "bytes + batch x (input + output/2) x KV bytes per token) / copy bandwidth.",
        "",
        HEADER,
        *(_row(row) for row in result["rows"].values()),
        *_ratios(result),
        *_whole_batch(result),
    ]
    if result["problems"]:
        lines += ["", "Problems:", *(f"- {p}" for p in result["problems"])]
    return "\n".join(lines) + "\n"
