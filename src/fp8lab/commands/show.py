"""fp8lab show RUN|COMPARISON ...: a table of finished runs' summaries, or a comparison's."""

from __future__ import annotations

import json
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 20


def register(sub) -> None:
    s = sub.add_parser("show", help="table of finished runs' summaries, or of an fp8lab compare output")
    s.add_argument("runs", nargs="+", help="run directories, or fp8lab compare --out directories")
    s.set_defaults(fn=run)


def run(args, rest) -> int:
    from fp8lab.train.console import console, summary_table

    from fp8lab.compare.table import print_summary

    summaries, comparisons = [], []
    for run_dir in args.runs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise FP8LabError(f"{path} does not exist: is {run_dir} a finished fp8lab run or comparison?")
        try:
            summary = json.loads(path.read_text())
        except ValueError as e:
            raise FP8LabError(f"{path} is not valid JSON ({e})") from None
        if "results" in summary:  # an fp8lab compare output directory
            comparisons.append(summary | {"out": run_dir})
        else:  # label rows by the path given here: summary.json keeps the path the run had then
            summaries.append(summary | {"run_dir": run_dir})
    if summaries:
        console.print(summary_table(summaries))
    for summary in comparisons:
        print_summary(summary)
    return 0
