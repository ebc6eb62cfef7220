"""fp8lab bench -c CONFIG --recipes bf16,fp8-tensorwise,fp8-rowwise[:filter_mode=auto] [--layers] [--vs-plain]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = 45  # after doctor (is it set up?), before advise (what would it gain?)
TAKES_OVERRIDES = True  # unknown --section.key=value arguments are config overrides


def register(sub) -> None:
    b = sub.add_parser(
        "bench", help="measure each recipe's training-step throughput side by side",
        description="Steady-state throughput of the real training step (forward, loss, backward, clip, "
                    "optimizer) per recipe, on the same model, weights and batch, each recipe in its own "
                    "process: tokens/s (median and spread), TFLOP/s, MFU, peak memory and the speedup over "
                    "bf16 measured in the same run. Warm-up (compile) is reported separately as startup.",
        epilog="Any config key can be overridden as --section.key=value, e.g. --data.micro_batch_size=32 "
               "--model.preset=1b. Exit status: 0 when every supported recipe ran, 1 when one failed, "
               "2 for bad input.")
    b.add_argument("-c", "--config", help="TOML config file (e.g. configs/demo.toml); defaults when omitted")
    b.add_argument("--recipes", default="bf16,fp8-tensorwise,fp8-rowwise",
                   help="comma-separated recipes to measure; RECIPE:KEY=VALUE sets precision.filter_mode, "
                        "filter_gpu or compile for that row alone, e.g. fp8-rowwise:filter_mode=auto "
                        "(default: %(default)s)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per recipe (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first, compile included; reported as startup (default: %(default)s)")
    b.add_argument("--layers", action="store_true",
                   help="also time each distinct linear shape's forward + backward in bf16 vs each FP8 recipe")
    b.add_argument("--vs-plain", action="store_true",
                   help="also run a plain PyTorch + TorchAO loop (src/fp8lab/bench/plain_loop.py) per recipe at the "
                        "same shapes, alternating with fp8lab's, and report fp8lab/plain (needs "
                        "train.grad_accum_steps=1)")
    b.add_argument("--find-batch", action="store_true",
                   help="instead: per recipe, the largest data.micro_batch_size that fits this GPU, from the memory "
                        "model's guess and real steps until one runs out of memory (CUDA only)")
    b.add_argument("--random-data", action="store_true",
                   help="random tokens (cached) instead of data.path: no prepared data set needed")
    b.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="per recipe: a recipe running longer is killed and reported as failed")
    b.add_argument("--json", action="store_true", help="print the result as JSON (and nothing else) on stdout")
    b.add_argument("--out", type=Path, metavar="FILE.json", help="also write the JSON result to this file")
    b.add_argument("--md", type=Path, metavar="FILE.md", help="also write the tables as markdown to this file")
    b.set_defaults(fn=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from rich.console import Console

    from fp8lab.bench.bench_text import to_markdown
    from fp8lab.bench.find_batch import find_batch_lines
    from fp8lab.bench.step_bench import BenchOptions, exit_code, parse_recipes, run_bench
    from fp8lab.config import parse_overrides
    from fp8lab.fsutil import atomic_write
    from fp8lab.ui import console

    opts = BenchOptions(config=args.config, overrides=parse_overrides(rest), recipes=parse_recipes(args.recipes),
                        warmup=args.warmup, steps=args.steps, layers=args.layers, random_data=args.random_data,
                        timeout_s=args.timeout, vs_plain=args.vs_plain, find_batch=args.find_batch)
    # With --json, stdout carries the JSON alone: progress goes to stderr.
    talk = Console(stderr=True, highlight=False, soft_wrap=True) if args.json else console
    result = run_bench(opts, progress=lambda line: talk.print(f"[dim]bench[/] {line}"))
    text = json.dumps(result, indent=1)
    found = "find_batch" in result
    md = ("\n".join(find_batch_lines(result)) + "\n" if found else to_markdown(result)) if args.md or found else None
    for path, content in ((args.out, text), (args.md, md)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, content)
    if args.json:
        print(text)
    elif found:
        console.print(md, markup=False, highlight=False)
    else:
        render(result)
    return 0 if found else exit_code(result)


def render(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from fp8lab.bench.bench_text import headline, layer_table_rows, mfu_basis, table_rows
    from fp8lab.ui import console

    console.print(f"[bold]{headline(result)}[/]")
    head, rows = table_rows(result)
    t = Table(title="per recipe: the training step (median over the timed steps; vs bf16 measured in this run)")
    left = ("recipe", "status", "FP8 linears", "note")
    for col in head:
        t.add_column(col, justify="left" if col in left else "right", overflow="fold")
    for row in rows:
        style = {"unsupported": "yellow", "failed": "bold red"}.get(row[1])
        t.add_row(*map(escape, row), style=style)
    console.print(t)
    if result["layers"] is not None:
        head, rows = layer_table_rows(result)
        lt = Table(title="per linear shape")
        for col in head:
            lt.add_column(col, justify="left" if col in ("linear", "recipe") else "right", overflow="fold")
        for row in rows:
            lt.add_row(*map(escape, row))
        console.print(lt if rows else "per linear shape: no FP8 recipe ran, nothing to compare")
        console.print(f"[dim]{result['layers']['what']}[/]")
    if result.get("plain"):
        console.print(f"[dim]plain: {escape(result['plain']['what'])}[/]")
    console.print(f"memory: {result['memory']}; {mfu_basis(result)}")
    for note in result["notes"]:
        loud, note = "NOT representative" in note, escape(note)  # free text, not markup
        console.print(f"[bold yellow]note:[/] [bold]{note}[/]" if loud else f"[yellow]note:[/] {note}")
