"""fp8lab show RUN [RUN ...]: a table of finished runs' summaries."""

from __future__ import annotations

import json
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 20


def register(sub) -> None:
    s = sub.add_parser("show", help="table of finished runs' summaries")
    s.add_argument("runs", nargs="+", help="run directories")
    s.set_defaults(fn=run)


def run(args, rest) -> int:
    from fp8lab.train.console import console, summary_table

    summaries = []
    for run_dir in args.runs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise FP8LabError(f"{path} does not exist: is {run_dir} a finished fp8lab run?")
        # Label rows by the path given here: summary.json keeps the path the run had then.
        summaries.append(json.loads(path.read_text()) | {"run_dir": run_dir})
    console.print(summary_table(summaries))
    return 0
