"""Markdown tables of a `sageserve bench kernels` result, and the list of its problems."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _status_cell(row: dict[str, Any] | None) -> str | None:
    """The cell of a row that has no figure: not run / not supported / skipped / error."""
    if row is None:
        return "—"
    status = row.get("status")
    return {"ok": None, "not supported": "n/s", "skipped": "skipped"}.get(status, "error")


def _seq_label(seq: int) -> str:
    return f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)


def _prefill_tables(
    rows: list[dict[str, Any]], head_dim: int, causal: bool, total: int
) -> list[str]:
    rows = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == causal]
    if not rows:
        return []
    seqs = sorted({r["seq_len"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["seq_len"]): r for r in rows}
    header = ["variant", *(_seq_label(s) for s in seqs)]
    speed, acc = [], []
    for v in variants:
        speed.append([v, *(_tops_cell(cell.get((v, s))) for s in seqs)])
        acc.append([v, *(_accuracy_cell(cell.get((v, s))) for s in seqs)])
    kind = "causal" if causal else "non-causal"
    first = rows[0]
    title = (f"### Prefill, head_dim {head_dim}, {kind}: TOPS ({first['q_heads']} query / "
             f"{first['kv_heads']} KV heads, batch = max(1, {total} // seq), "
             f"{first['dtype']}, page {first['page_size']})")  # fmt: skip
    return [
        title, "", *_table(header, speed), "",
        f"Accuracy, head_dim {head_dim}, {kind}: cosine / relative L1 against fp64 (first "
        "sequence, every head)", "", *_table(header, acc), "",
    ]  # fmt: skip


def _tops_cell(row: dict[str, Any] | None) -> str:
    status = _status_cell(row)
    if status:
        return status
    text = _number(row["tops"])
    if "tops_without_store" in row:
        text += f" ({_number(row['tops_without_store'])})"
    return text


def _number(x: float) -> str:
    """Whole numbers for GPU figures; a few digits for the tiny CPU ones."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _accuracy_cell(row: dict[str, Any] | None) -> str:
    if row is None or "accuracy" not in row:
        return _status_cell(row) or "—"
    acc = row["accuracy"]
    return f"{acc['cosine']:.5f} / {acc['rel_l1']:.4f}"


def _decode_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    cell = {(r["variant"], r["batch"], r["context"]): r for r in rows}
    eight = [v for v in variants if v != "triton16"]
    has_base = "triton16" in variants
    header = ["batch × context"]
    for v in variants:
        header += [f"{v} µs", "GB/s", "of copy"]
    header += [f"{v} speedup" for v in eight if has_base]
    body = []
    for b, c in shapes:
        line = [f"{b} × {_seq_label(c)}"]
        for v in variants:
            line += _decode_cells(cell.get((v, b, c)))
        line += [_speedup_cell(cell.get((v, b, c))) for v in eight if has_base]
        body.append(line)
    first = rows[0]
    title = (
        f"### Decode, {first['q_heads']} query / {first['kv_heads']} KV heads, head_dim "
        f"{first['head_dim']}, page {first['page_size']}: one layer's decode attention"
    )
    return [title, "", *_table(header, body), ""]


def _decode_cells(row: dict[str, Any] | None) -> list[str]:
    status = _status_cell(row)
    if status:
        return [status, "", ""]
    frac = row.get("copy_bandwidth_fraction")
    return [f"{row['us']:.1f}", _number(row["gb_per_s"]), f"{frac:.0%}" if frac else ""]


def _speedup_cell(row: dict[str, Any] | None) -> str:
    if row is None or "speedup_vs_triton16" not in row:
        return _status_cell(row) or "—"
    return f"{row['speedup_vs_triton16']:.2f}×"


def _store_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys((r["tokens"], r["kv_heads"]) for r in rows))
    cell = {(r["variant"], r["tokens"], r["kv_heads"]): r for r in rows}
    header = ["tokens × KV heads", "step"]
    for v in variants:
        header += [f"{v} µs", "GB/s", "of copy", "bound µs"]
    body = []
    for t, h in shapes:
        layout = next(r["layout"] for r in rows if (r["tokens"], r["kv_heads"]) == (t, h))
        line = [f"{t} × {h}", layout]
        for v in variants:
            line += _store_cells(cell.get((v, t, h)))
        body.append(line)
    first = rows[0]
    title = (
        f"### KV store, head_dim {first['head_dim']}, page {first['page_size']}, "
        f"{first['dtype']}: one layer's new K/V written into the cache"
    )
    return [title, "", *_table(header, body), ""]


def _store_cells(row: dict[str, Any] | None) -> list[str]:
    status = _status_cell(row)
    if status:
        return [status, "", "", ""]
    frac = row.get("copy_bandwidth_fraction")
    bound = row.get("bound_us")
    return [f"{row['us']:.1f}", _number(row["gb_per_s"]), f"{frac:.0%}" if frac else "",
            f"{bound:.1f}" if bound else ""]  # fmt: skip


def format_markdown(result: dict[str, Any]) -> str:
    """Every table of the result, with the card, versions and method in a few lines."""
    dev, sw = result["device"], result["software"]
    lines = [
        f"## sageserve bench kernels — {dev['name']}, {result['date']}", "",
        f"torch {sw['torch']}, triton {sw['triton']}, CUDA {sw['cuda']}, cuDNN {sw['cudnn']}, "
        f"sageattention {sw['sageattention']}; dtype {result['settings']['dtype']}", "",
        f"`{result['command']}`", "",
    ]  # fmt: skip
    prefill = result.get("prefill", [])
    for head_dim in sorted({r["head_dim"] for r in prefill}):
        for causal in (True, False):
            lines += _prefill_tables(prefill, head_dim, causal, result["settings"]["total_tokens"])
    reasons = {f"{r['variant']}: {r['reason']}" for r in prefill if r.get("reason")}
    lines += [f"n/s {reason}" for reason in sorted(reasons)] + ([""] if reasons else [])
    if prefill:
        lines += [
            "TOPS = 4·B·H·N²·D / time (halved for causal). Our kernels (sage_*, triton16): "
            "time includes writing K/V into the paged cache; in parentheses the attention "
            "alone (total minus the store timed apart). n/s: not supported (see JSON).", "",
        ]  # fmt: skip
    copy = result.get("copy_bandwidth")
    lines += _decode_table(result.get("decode", []))
    if copy and result.get("decode"):
        lines += [
            f"GB/s: K/V bytes of the used pages (codes + scales for 8-bit) / time (CUDA "
            f"graph on GPU). Copy bandwidth: {copy['gb_per_s']:.0f} GB/s (device copy, read + "
            "write). Speedup: triton16 time / 8-bit time.", "",
        ]  # fmt: skip
    lines += _store_table(result.get("store", []))
    if copy and result.get("store"):
        lines += [
            "Store: decode steps timed as CUDA-graph replays on GPU, prefill steps eagerly. "
            "GB/s: bytes moved (K/V read, cache entries written, slot indices and the 8-bit "
            "store's mean and balance read) / time; bound µs: those bytes at the copy "
            f"bandwidth ({copy['gb_per_s']:.0f} GB/s).", "",
        ]  # fmt: skip
    problems = result.get("problems", [])
    lines += [f"Problems: {len(problems)}", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def problems(result: dict[str, Any]) -> list[str]:
    """Errors and failed checks, one line each (any makes the command exit 1)."""
    found = []
    for part in ("prefill", "decode", "store"):
        for row in result.get(part, []):
            where = _where(part, row)
            if row.get("status") == "error":
                found.append(f"{where}: {row.get('error')}")
            for name, ok in row.get("checks", {}).items():
                if ok is False:
                    found.append(f"{where}: check {name} failed")
            for key in ("graph_error", "store_error", "replica_error"):
                if key in row:
                    found.append(f"{where}: {key}: {row[key]}")
            if row.get("finite_after_timing") is False:
                found.append(f"{where}: non-finite output after timing")
    return found


def _where(part: str, row: dict[str, Any]) -> str:
    if part == "prefill":
        kind = "causal" if row["causal"] else "non-causal"
        return f"prefill {row['variant']} D{row['head_dim']} seq {row['seq_len']} {kind}"
    if part == "store":
        return f"store {row['variant']} tokens {row['tokens']} KV heads {row['kv_heads']}"
    return f"decode {row['variant']} batch {row['batch']} context {row['context']}"


def progress_line(part: str, row: dict[str, Any]) -> str:
    """One line per measured row, printed as the run goes."""
    where = _where(part, row)
    status = row.get("status")
    if status != "ok":
        return f"{where}: {status}: {row.get('reason') or row.get('error')}"[:300]
    acc = row.get("accuracy", {})
    cos = f"cos {acc['cosine']:.6f}" if acc else ""
    if part == "prefill":
        return f"{where}: {row['ms']:.3f} ms {row['tops']:.1f} TOPS {cos}"
    if part == "store":
        bound = f"bound {row['bound_us']:.1f} us"
        return f"{where}: {row['us']:.1f} us {row['gb_per_s']:.0f} GB/s ({bound})"
    return f"{where}: {row['us']:.1f} us {row['gb_per_s']:.0f} GB/s {cos}"
