"""What the user sees: the console every command prints to (rich), the logger that routes
library warnings to it, number formatting for table cells, the training progress bar with
ETA (on a terminal) or a line every N steps (in logs), and the table of run summaries.
A leaf: it knows nothing of training; callers hand it plain records."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Logs and CI capture are not terminals; rich would wrap them at 80 columns.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def setup_logging() -> None:
    """Route the `fp8lab` logger (e.g. the emulation warning from convert()) to the console."""
    log = logging.getLogger("fp8lab")
    if not log.handlers:
        log.addHandler(RichHandler(console=console, show_time=False, show_path=False))
        log.setLevel(logging.INFO)
        log.propagate = False


def fmt(v, spec: str, suffix: str = "") -> str:
    """A number for a table cell; '-' where there is none."""
    return "-" if v is None else format(v, spec) + suffix


class TrainProgress:
    def __init__(self, *, total: int, start: int, mode: str, log_interval: int):
        self.log_interval = log_interval
        self.quiet = mode == "quiet"  # another rank than 0 under torchrun: rank 0 speaks
        self.bar = None
        if mode == "on" or (mode == "auto" and console.is_terminal):
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, rec: dict) -> None:
        info = (f"loss {fmt(rec['loss'], '.4f')}  lr {rec['lr']:.2e}  "
                f"{fmt(rec['tokens_per_s'], ',.0f')} tok/s")
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=info)
        elif rec["step"] % self.log_interval == 0 or "eval_loss" in rec:
            extra = f"  eval {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
            console.print(f"step {rec['step']:>6}  {info}  mfu {fmt(rec['mfu'], '.1%')}{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def summary_table(summaries: list[dict], *, title: str = "fp8lab runs") -> Table:
    """One row per run: the figures a BF16-vs-FP8 decision starts from, and where each run
    stands (finished, stopped-by-guard, running, stopped, killed)."""
    t = Table(title=title)
    for col in ("run", "recipe", "status", "steps", "train loss", "eval loss", "tok/s", "vs first", "peak mem GB",
                "FP8 linears"):
        t.add_column(col, justify="right" if col not in ("run", "recipe", "status") else "left",
                     overflow="fold", no_wrap=col != "run")
    base = summaries[0].get("tokens_per_s_median") if summaries else None
    for s in summaries:
        tps = s.get("tokens_per_s_median")
        ratio = f"{tps / base:.2f}x" if tps and base else "-"
        total = s.get("total_steps")
        steps = f"{s['steps']}/{total}" if total and total != s["steps"] else str(s["steps"])
        status = s.get("status", "finished") + (f" (pid {s['pid']})" if s.get("pid") else "")
        t.add_row(
            s.get("run_dir", "-"), (s.get("label") or s["recipe"]) + (" (emulated)" if s.get("emulated") else ""),
            status, steps, fmt(s.get("final_train_loss"), ".4f"), fmt(s.get("final_eval_loss"), ".4f"),
            fmt(tps, ",.0f"), ratio, fmt(s.get("mem_peak_gb"), ".2f"),
            str(s["conversion"]["num_converted"]) if s.get("conversion") else "-",
        )
    return t
