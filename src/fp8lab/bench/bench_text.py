"""`fp8lab bench` as text: the per-recipe and per-layer tables (console and markdown) and
the headline, from the result dict of step_bench.run_bench."""

from __future__ import annotations

from fp8lab.precision.convert import groups_text
from fp8lab.ui import fmt as _f


def fp8_linears(r: dict) -> str:
    """The recipe's converted linears ('7/8: wq wk wv wo w1 w2 w3'; precision.convert.groups_text)."""
    groups = r.get("fp8_linears")
    return str(r["converted"]) if groups is None else groups_text(groups)  # None: a row of an older bench


PLAIN_HEAD = ["plain tok/s (vs its bf16)", "fp8lab/plain", "vs plain bf16"]


def plain_cells(r: dict) -> list[str]:
    """The --vs-plain columns of one row: the plain loop's tokens/s (or why none) and its speedup
    over its own bf16, fp8lab over the plain loop, fp8lab over the plain bf16 loop."""
    p = r.get("plain")
    if p is None:
        return ["-"] * len(PLAIN_HEAD)
    if p["status"] == "ok":
        tps = f"{p['tokens_per_s']:,.0f} ({_f(r.get('plain_speedup_vs_bf16'), '.2f', 'x')})"
    else:
        tps = f"{p['status']}: {p['reason']}"
    return [tps, _f(r.get("vs_plain"), ".3f"), _f(r.get("vs_plain_bf16"), ".2f", "x")]


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The per-recipe table as (header, rows) of text, for the console and for markdown; the
    plain loop's columns come after the note, with --vs-plain only."""
    vs_plain = bool(result.get("plain"))
    head = ["recipe", "status", "tokens/s", "vs bf16", "spread (min-max, IQR)", "step ms", "TFLOP/s", "MFU",
            "peak mem GB", "predicted GB", "FP8 linears", "startup s", "note"] + (PLAIN_HEAD if vs_plain else [])
    out = []
    for r in result["recipes"]:
        extra = plain_cells(r) if vs_plain else []
        if r["status"] != "ok":
            out.append([r["recipe"], r["status"], *["-"] * 10, r["reason"], *extra])
            continue
        spread = f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}, {r['iqr_pct']:.1f}%"
        note = "EMULATED (see note)" if r["emulated"] else ""
        if r["skipped_steps"]:
            note = f"{r['skipped_steps']} non-finite steps skipped the optimizer; " + note
        out.append([r.get("label") or r["recipe"], "ok", f"{r['tokens_per_s']:,.0f}",
                    _f(r.get("speedup_vs_bf16"), ".2f", "x"), spread,
                    f"{r['step_time_s'] * 1e3:,.1f}", f"{r['tflops']:.3g}", _f(r["mfu"], ".1%"),
                    f"{r['mem_peak_gb']:.2f}", _f(r.get("mem_predicted_gb"), ".2f"), fp8_linears(r),
                    f"{r['startup_s']:.1f}", note, *extra])
    return head, out


def layer_table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    head = ["linear", "m x k x n", "count", "recipe", "bf16 ms", "recipe ms", "bf16/recipe", "converted in step"]
    out = []
    for r in (result["layers"] or {}).get("rows", []):
        out.append([", ".join(r["names"]), f"{r['m']}x{r['k']}x{r['n']}", str(r["count"]), r["recipe"],
                    _f(r["bf16_ms"], ".3f"), _f(r["recipe_ms"], ".3f"),
                    _f(r["ratio"], ".2f", "x") if "error" not in r else "failed: " + r["error"],
                    f"{r['converted']}/{r['count']}"])
    return head, out


def mfu_basis(result: dict) -> str:
    """What MFU divides by in this result, in words."""
    peaks = {r.get("label") or r["recipe"]: r["mfu_peak_tflops"] for r in result["recipes"] if r.get("mfu_peak_tflops")}
    said = ", ".join(f"{name} {peak:g}" for name, peak in peaks.items())
    return ("MFU against the dense peak of each recipe's fastest math (bf16 for bf16, FP8 for FP8 recipes)"
            + (f": {said} TFLOP/s" if said else " (unknown here: -)"))


def headline(result: dict) -> str:
    r = result
    params = f" ({r['params'] / 1e6:,.1f}M params)" if r["params"] else ""
    accum = f" x {r['grad_accum_steps']} micro-batches" if r["grad_accum_steps"] > 1 else ""
    compiled = "" if r["compiled"] is None else f", compile {'on' if r['compiled'] else 'off'}"
    return (f"fp8lab bench: {r['model']['preset']}{params} on {r['device']}, {r['tokens_per_step']:,} tokens/step "
            f"({r['micro_batch_size']} x {r['seq_len']}{accum}){compiled}, {r['warmup_steps']} warm-up + "
            f"{r['timed_steps']} timed steps, {r['timing']}")


def to_markdown(result: dict) -> str:
    def md(head: list[str], rows: list[list[str]]) -> list[str]:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)]

    v = result["versions"]
    lines = [f"# {headline(result)}", "",
             f"torch {v['torch']}, torchao {v['torchao']}, CUDA {v['cuda']}, Python {v['python']}; "
             f"memory: {result['memory']}; {mfu_basis(result)}", "", *md(*table_rows(result))]
    if result.get("plain"):
        lines += ["", f"Plain: {result['plain']['what']}."]
    if result["layers"] is not None:
        lines += ["", f"Per linear shape: {result['layers']['what']}.", "", *md(*layer_table_rows(result))]
    steps = {r.get("label") or r["recipe"]: r["step"] for r in result["recipes"] if r.get("step")}
    lines += [""] + [f"- {name} step: {s}" for name, s in steps.items()] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"
