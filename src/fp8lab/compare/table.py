"""The comparison on the console: one row per recipe, the verdicts, where the report is."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from fp8lab.ui import console
from fp8lab.ui import fmt as _f

STYLE = {"baseline": "bold", "parity": "green", "worse": "red", "diverged": "bold red",
         "inconclusive": "yellow", "unsupported": "dim", "failed": "red"}


def print_summary(summary: dict) -> None:
    t = Table(title=f"fp8lab compare: {summary['steps']} steps x {summary['tokens_per_step']:,} tokens, "
                    f"{len(summary['seeds'])} seed(s), {summary['environment'].get('device') or '?'}")
    for col in ("recipe", "verdict", "tok/s", "vs bf16", "peak mem GB", "train loss", "eval loss", "gap", "FP8 linears"):
        t.add_column(col, justify="left" if col in ("recipe", "verdict", "FP8 linears") else "right")
    for r in summary["results"]:
        style = STYLE.get(r["verdict"], "")
        name = escape(r.get("label") or r["recipe"]) + (" (emulated)" if r.get("emulated") else "")
        t.add_row(name, f"[{style}]{r['verdict']}[/]",
                  _f(r["tokens_per_s"], ",.0f"), _f(r["speedup_vs_bf16"], ".2f") + ("x" if r["speedup_vs_bf16"] else ""),
                  _f(r["mem_peak_gb"], ".2f"), _f(r["final_train_loss"], ".4f"), _f(r["final_eval_loss"], ".4f"),
                  _f(r["loss_gap"], "+.4f"), escape(r.get("converted_layers") or "-"))
    console.print(t)
    for r in summary["results"]:
        if r["recipe"] != "bf16" or r["verdict"] != "baseline":
            reason = f" ({r['reason']})" if r.get("reason") and r["verdict"] in ("unsupported", "failed") else ""
            name = escape(r.get("label") or r["recipe"])
            console.print(f"  [{STYLE.get(r['verdict'], '')}]{name}: {r['verdict']}[/] - "
                          + escape(r["verdict_detail"] + reason))  # free text, not markup
    console.print(f"  noise band: {escape(summary['noise']['how'])}")
    console.print(f"  checks: {escape(summary['checks']['detail'])}")
    if summary["environment"].get("emulated"):
        console.print("  [yellow]FP8 ran emulated on this device: its speed is NOT representative of FP8 hardware[/]")
    out = Path(summary["out"])
    console.print(f"[bold]report:[/] {out / 'report.html'} (and {out / 'report.md'}, {out / 'summary.json'})")
