"""Rendering benchmark results: a rich table for the terminal, markdown for BENCHMARKS.md, JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ..console import console as default_console

COLUMNS = ("backend", "batch", "p50 ms", "p95 ms", "lesions/s", "speed-up", "encoders ms", "fusion ms",
           "floor ms", "× floor", "peak MB", "max Δp", "argmax agree", "checked")


def _f(v, fmt="{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _flops(v: float) -> str:
    return f"{v / 1e9:.2f} GFLOP" if v >= 1e8 else f"{v / 1e6:.2f} MFLOP"


def rows(result: dict) -> list[list[str]]:
    out = []
    for name, rec in result["backends"].items():
        if not rec.get("ok"):
            err = rec.get("error", "?")
            out.append([name, "—", err[:110] if err.startswith("skipped") else f"failed: {err[:60]}",
                        *["" for _ in COLUMNS[3:]]])
            continue
        acc = rec.get("accuracy") or {}
        for bs, st in rec["batches"].items():
            out.append([name, bs, _f(st["p50_ms"]), _f(st.get("p95_ms")), _f(st["lesions_per_s"]),
                        _f(st.get("speedup"), "{:.2f}×"), _f(st.get("encoders_ms")), _f(st.get("fusion_ms")),
                        _f(st.get("floor_ms")), _f(st.get("x_floor"), "{:.2f}"), _f(st.get("peak_mem_mb"), "{:.0f}"),
                        _f(acc.get("max_prob_diff"), "{:.4f}"),
                        _f(acc.get("argmax_agreement") * 100 if acc else None, "{:.1f} %"),
                        str(acc.get("n", "—"))])
    return out


def header_lines(result: dict) -> list[str]:
    m = result["machine"]
    rates = result["matmul_gflops"]
    fl = result["flops"]
    enc = ", ".join(f"{k}: {v}" for k, v in result.get("encoders", {}).items())
    lines = [f"{result['name']} — {enc} — {result.get('params_m', 0):.1f} M params",
             f"{m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}), torch {m['torch']}, "
             f"{m['date_utc']}, device {m['device']}" + (f", load avg {m['loadavg_1m']:.2f}" if "loadavg_1m" in m else ""),
             "matmul 2048³: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items() if v),
             f"FLOPs per lesion: {_flops(fl['total'])} (encoders {_flops(sum(fl['encoders'].values()))}, "
             f"fusion {_flops(fl['fusion'])})"]
    if "preprocess" in result:
        p = result["preprocess"]
        lines.append(f"preprocessing (decode+resize+normalise, 1 process): {p['per_lesion_ms']:.1f} ms per lesion")
    if result.get("ceiling"):
        lines.append("speed-up ceiling over fp32 eager (its time ÷ the lowest floor of any precision): "
                     + ", ".join(f"batch {bs} {c['max_speedup']:.2f}× ({c['backend']})"
                                 for bs, c in result["ceiling"].items()))
    if result.get("accuracy_lesions"):
        line = f"accuracy vs fp32 eager on {result['accuracy_lesions']} lesions"
        gap = result.get("fp32_top1_top2_gap")
        if gap:
            line += (f"; fp32's top-1 minus top-2 probability: median {gap['0.5']:.4f}, 5th percentile "
                     f"{gap['0.05']:.4f} (a backend's Δp above that flips the argmax)")
        lines.append(line)
    return lines


def print_result(result: dict, console=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = console or default_console
    table = Table(title=result["name"], caption="\n".join(header_lines(result)[1:]))
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "backend" else "right", no_wrap=c == "backend")
    not_run = {n: rec.get("error", "?") for n, rec in result["backends"].items() if not rec.get("ok")}
    for r in rows(result):
        if r[0] not in not_run:
            table.add_row(*r)
    console.print(header_lines(result)[0])
    if not console.is_terminal:  # piped or logged (rich then assumes 80 columns): 14 columns would read "1…"
        from rich.console import Console

        console = Console(file=console.file, width=max(console.width, 180))
    console.print(table)
    for name, err in not_run.items():  # below the table: a long reason in one cell would stretch every row
        console.print(f"[yellow]{name}[/]: {escape(err if err.startswith('skipped') else 'failed: ' + err)}")


def markdown(result: dict) -> str:
    lines = [f"**{header_lines(result)[0]}**", ""] + [f"- {x}" for x in header_lines(result)[1:]] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c == "backend" else "---:" for c in COLUMNS) + "|")
    for r in rows(result):
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines) + "\n"


def save_json(results, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    return path
