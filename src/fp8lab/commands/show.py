"""fp8lab show RUN|COMPARISON|FOLDER ...: a table of runs (finished or not), or a comparison's."""

from __future__ import annotations

import json
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 20


DESCRIPTION = ("Each argument is a run directory, an `fp8lab compare --out` directory, or a folder holding runs "
               "(e.g. runs/): every run in it is listed with its status (finished, stopped-by-guard, running, "
               "stopped, killed), steps done of its total, last losses and tokens/s. An unfinished run is read from "
               "its metrics.")


def register(sub) -> None:
    s = sub.add_parser("show", help="table of runs (finished, running, stopped or killed), or of a comparison",
                       description=DESCRIPTION)
    s.add_argument("runs", nargs="+", help="run directories, comparison directories, or folders of runs")
    s.set_defaults(fn=run)


def _comparison(path: Path) -> dict | None:
    """A finished comparison's summary, or None when `path` is not one."""
    if not (path / "compare.json").is_file() or not (path / "summary.json").is_file():
        return None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except ValueError as e:
        raise FP8LabError(f"{path / 'summary.json'} is not valid JSON ({e})") from None
    return summary if "results" in summary else None


def _runs_under(folder: Path) -> list[Path]:
    from fp8lab.train.runinfo import is_run_dir

    inside = folder / "runs" if (folder / "compare.json").is_file() else folder  # an unfinished comparison
    return sorted(p for p in inside.iterdir() if p.is_dir() and is_run_dir(p)) if inside.is_dir() else []


def run(args, rest) -> int:
    from fp8lab.compare.table import print_summary
    from fp8lab.train.runinfo import describe_run, is_run_dir
    from fp8lab.ui import console, summary_table

    rows, comparisons = [], []
    for arg in args.runs:
        path = Path(arg)
        if not path.is_dir():
            raise FP8LabError(f"{path} is not a directory: give a run directory, a comparison or a folder of runs")
        if (summary := _comparison(path)) is not None:
            comparisons.append(summary | {"out": arg})
        elif is_run_dir(path):  # label rows by the path given here: summary.json keeps the path the run had then
            rows.append(describe_run(path) | {"run_dir": arg})
        elif found := _runs_under(path):
            rows += [describe_run(p) | {"run_dir": str(p)} for p in found]
        else:
            raise FP8LabError(f"{path} holds no fp8lab run (no config.toml in it or in its subfolders); "
                              "is it a run directory or a folder of runs?")
    if rows:
        console.print(summary_table(rows))
    for summary in comparisons:
        print_summary(summary)
    return 0
