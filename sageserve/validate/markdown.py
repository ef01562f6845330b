"""report.md: the report's numbers as Markdown tables, one part per section."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sageserve.validate.machine_load import busy_warning

_STATUS = {
    "pass": "PASS",
    "fail": "FAIL",
    "info": "info",
    "not_run": "not run",
    "unsupported": "unsupported",
}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:{spec}}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:{spec}}, {v[1]:{spec}}]"
    return str(v)


def _cell(text: str) -> str:
    """A table cell: a | inside it (as in |Δ logprob|) would end the cell."""
    return text.replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(_fmt(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(section: dict[str, Any]) -> str:
    v = section["verdict"]
    out = [f"**Verdict: {_STATUS[v['status']]}**" + (f" — {v['reason']}" if v["reason"] else "")]
    if v["checks"]:
        rows = [
            [
                c["name"],
                c["value"],
                c["limit"],
                _STATUS["pass" if c["passed"] else "fail"] if c["passed"] is not None else "—",
            ]
            for c in v["checks"]
        ]
        out.append(table(["check", "measured", "limit", "result"], rows))
    return "\n\n".join(out)


def _logprobs(r: dict[str, Any]) -> str:
    rows = [
        [
            lb,
            x["prompt_positions"],
            x["output_positions"],
            x["num_failures"],
            x["max_prompt_vs_teacher_forced"],
            x["max_output_vs_teacher_forced"],
        ]
        for lb, x in r["backends"].items()
    ]
    head = [
        "backend",
        "prompt positions",
        "output positions",
        "failures",
        "max |prompt − teacher-forced|",
        "max |output − teacher-forced|",
    ]
    notes = [f"- {lb}: {f}" for lb, x in r["backends"].items() for f in x["failures"]]
    notes += [f"- {lb}: {n}" for lb, x in r["backends"].items() for n in x.get("notes", [])]
    notes += [
        f"- {lb}: checked through {', '.join(x['apis'])}"
        for lb, x in r["backends"].items()
        if "apis" in x
    ]
    return "\n".join([f"API: {r['api']}, top-{r['top_n']}.", "", table(head, rows), "", *notes])


def _agreement(r: dict[str, Any]) -> str:
    rows = []
    for lb, groups in r["backends"].items():
        for g, s in groups.items():
            rows.append(
                [
                    lb,
                    g,
                    s["n_tokens"],
                    s["mean_kl"],
                    s["mean_kl_ci"],
                    s["p99_kl"],
                    s["max_kl"],
                    s["top1_agreement"],
                    s["mean_abs_logprob_delta"],
                    s["p99_abs_logprob_delta"],
                    s["max_abs_logprob_delta"],
                    s["frac_within_logprob_delta"],
                ]
            )
    head = [
        "backend",
        "context",
        "tokens",
        "mean KL",
        "mean KL 95% CI",
        "p99 KL",
        "max KL",
        "top-1 agree",
        "mean |Δlp|",
        "p99 |Δlp|",
        "max |Δlp|",
        "share within limit",
    ]
    wins = table(
        ["group", "index", "token offset", "tokens"],
        [[w["group"], w["index"], w["token_offset"], w["tokens"]] for w in r["windows"]],
    )
    skipped = ", ".join(r["groups_not_run"]) or "none"
    parts = [table(head, rows), *_over_floors(r), f"Context groups not run (size 0): {skipped}."]
    return "\n\n".join([*parts, wins])


def _over_floors(r: dict[str, Any]) -> list[str]:
    """What each backend with a dtype floor adds to it (floors.py); [] when none has one."""
    rows = [
        [lb, g, s["floor"], s["excess_mean_kl"], s["excess_mean_kl_ci"], s["top1_vs_floor"],
         s["top1_vs_floor_ci"], s["frac_within_vs_floor"]]
        for lb, groups in r["backends"].items()
        for g, s in groups.items()
        if "floor" in s
    ]  # fmt: skip
    if not rows:
        return []
    head = ["backend", "context", "floor", "excess mean KL", "95% CI", "top-1 vs floor",
            "95% CI", "share |lp − lp floor| within limit"]  # fmt: skip
    return ["Over the dtype floor (what the backend adds to exact attention in its dtype):",
            table(head, rows)]  # fmt: skip


def _perplexity(r: dict[str, Any]) -> str:
    rows = [
        [lb, x["tokens"], x["perplexity"], x.get("delta_rel"), x.get("delta_rel_ci")]
        for lb, x in r["backends"].items()
    ]
    head = ["backend", "tokens", "perplexity", "Δ rel", "Δ rel 95% CI"]
    note = (
        f"Windows: group {r['group']}, {r['window_tokens']} tokens, offsets {r['token_offsets']}."
    )
    if any("floor" in x for x in r["backends"].values()):  # dtype floors (floors.py)
        head += ["floor", "Δ rel vs floor", "Δ vs floor 95% CI"]
        for row, x in zip(rows, r["backends"].values(), strict=True):
            row += [x.get("floor"), x.get("delta_rel_vs_floor"), x.get("delta_rel_vs_floor_ci")]
    return note + "\n\n" + table(head, rows)


def _mmlu(r: dict[str, Any]) -> str:
    rows = [
        [
            lb,
            x["questions"],
            x["accuracy"],
            x["accuracy_ci"],
            x.get("flip_rate"),
            x.get("flip_rate_ci"),
            x.get("mean_option_kl"),
            x.get("mcnemar_p"),
        ]
        for lb, x in r["backends"].items()
    ]
    note = f"{r['questions']} questions, {r['subjects']} subjects ({r['per_subject']} per subject)."
    head = ["backend", "questions", "accuracy", "95% CI", "flip rate", "flip 95% CI", "option KL",
            "McNemar p"]  # fmt: skip
    if any("floor" in x for x in r["backends"].values()):  # dtype floors (floors.py)
        head += ["floor", "flip rate vs floor", "McNemar p vs floor"]
        for row, x in zip(rows, r["backends"].values(), strict=True):
            against = x.get("vs_floor", {})
            row += [x.get("floor"), against.get("flip_rate"), against.get("mcnemar_p")]
    return note + "\n\n" + table(head, rows)


def _spread(s: dict[str, Any]) -> str:
    return f"{s['median']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"


def _throughput(r: dict[str, Any]) -> str:
    rows = []
    for lb, cases in r["backends"].items():
        for key, s in cases.items():
            up = r["speedup_vs_reference"].get(lb, {}).get(key, {})
            rows.append(
                [
                    lb,
                    key,
                    _spread(s["ttft_s"]),
                    _spread(s["decode_tok_s_per_request"]),
                    _spread(s["output_tok_s"]),
                    _spread(s["total_tok_s"]),
                    up.get("decode"),
                    s["rounds"],
                ]
            )
    head = [
        "backend",
        "case",
        "TTFT s",
        "decode tok/s/request",
        "output tok/s",
        "total tok/s",
        "decode speedup",
        "rounds",
    ]
    load = r.get("machine_load") or {}
    if not load.get("busy"):
        return table(head, rows)
    return f"**Warning:** {busy_warning(load)}.\n\n{table(head, rows)}"


def _memory(r: dict[str, Any]) -> str:
    def mib(n: int | None) -> float | None:
        return None if n is None else n / 2**20

    rows = []
    for lb, x in r["backends"].items():
        peak = x.get("peak") or {}
        rows.append(
            [
                lb,
                mib(x.get("weights_bytes")),
                x.get("kv_dtype"),
                x.get("kv_bytes_per_token"),
                x.get("pool_capacity_tokens"),
                mib(x.get("pool_bytes")),
                x.get("tokens_per_gib"),
                peak.get("kind"),
                mib(peak.get("peak_bytes")),
            ]
        )
    head = [
        "backend",
        "weights MiB",
        "KV dtype",
        "KV bytes/token",
        "pool tokens",
        "pool MiB",
        "tokens per GiB",
        "peak kind",
        "peak MiB",
    ]
    return table(head, rows)


def _determinism(r: dict[str, Any]) -> str:
    rows = []
    for lb, x in r["backends"].items():
        named = [(f"repeat {i + 2} vs 1", d) for i, d in enumerate(x["repeats"])]
        named += [
            (f"alone vs batch of {x['alone_vs_batch']['batch']}", x["alone_vs_batch"]),
            ("cache miss vs hit", x["cache_miss_vs_hit"]),
        ]
        for name, d in named:
            rows.append(
                [
                    lb,
                    name,
                    d["identical_tokens"],
                    d["first_token_diff"],
                    d["first_logprob_diff"],
                    d["max_logprob_delta"],
                    d["cached_tokens"],
                ]
            )
    head = [
        "backend",
        "comparison",
        "same tokens",
        "first token diff",
        "first logprob diff",
        "max |Δ logprob|",
        "cached tokens (a, b)",
    ]
    return table(head, rows)


_RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "logprobs": _logprobs,
    "agreement": _agreement,
    "perplexity": _perplexity,
    "mmlu": _mmlu,
    "throughput": _throughput,
    "memory": _memory,
    "determinism": _determinism,
}


def _profiles(settings: dict[str, Any]) -> str:
    """Which bars judged each backend, and the thresholds they used."""
    choices = settings.get("verdict_profiles") or {}
    rows = [[label, c["backend"], c["profile"], c["note"] or "its own", c["rules"]]
            for label, c in choices.items()]  # fmt: skip
    limits = ", ".join(f"{k} {v}" for k, v in settings["thresholds"].items() if v is not None)
    head = ["backend", "attention", "profile", "chosen", "rules"]
    return (
        f"Verdict profiles (`--verdict-profile {settings.get('verdict_profile', 'auto')}`):"
        f"\n\n{table(head, rows)}\n\nThresholds: {limits}."
    )


def render(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    st = report["settings"]
    parts = [
        f"# sageserve validate ({report['mode']}): {'PASS' if report['passed'] else 'FAIL'}",
        f"{report['date']} — `{report['command']}`",
        f"Model: {st.get('model')}; backends: {', '.join(st['backends'])} "
        f"(reference: {st['reference']}); machine: {report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads, GPU: {report['machine']['gpu']}",
        table(
            ["section", "verdict"],
            [[n, _STATUS[s["verdict"]["status"]]] for n, s in report["sections"].items()],
        ),
        _profiles(st),
    ]
    for name, section in report["sections"].items():
        parts.append(f"## {name}")
        if section.get("method"):
            parts.append(f"Method: {section['method']}.")
        parts.append(_verdict(section))
        if section["results"] and name in _RENDER:
            parts.append(_RENDER[name](section["results"]))
    parts += [f"![{p}]({p})" for p in report.get("plots", [])]
    return "\n\n".join(parts) + "\n"
