"""fp8lab's command line: parse, build, call. One subcommand per verb."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from fp8lab.errors import FP8LabError


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from fp8lab.config import describe_fields, load_config, parse_overrides

    if args.help_config:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, parse_overrides(rest))
    run_dir = args.run_dir or Path("runs") / f"{Path(args.config or 'default').stem}-{cfg.precision.recipe}-" \
                                              f"{datetime.now():%Y%m%d-%H%M%S}"
    from fp8lab.train.trainer import train  # late: imports torch

    train(cfg, Path(run_dir))
    return 0


def _cmd_recipes(args: argparse.Namespace, rest: list[str]) -> int:
    from fp8lab.precision.recipes import RECIPES

    for r in RECIPES.values():
        tail = "; emulated on CPU, refused on other GPUs" if r.is_low_precision else ""
        print(f"{r.name:<18} {r.summary}\n{'':<18} runs on: {r.hardware}{tail}")
    return 0


def _cmd_show(args: argparse.Namespace, rest: list[str]) -> int:
    from fp8lab.train.console import console, summary_table

    summaries = []
    for run in args.runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FP8LabError(f"{path} does not exist: is {run} a finished fp8lab run?")
        # Label rows by the path given here: summary.json keeps the path the run had then.
        summaries.append(json.loads(path.read_text()) | {"run_dir": run})
    console.print(summary_table(summaries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp8lab", description="Train LMs in BF16 and FP8; find out whether FP8 pays.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or resume a run",
                       epilog="Any config key can be overridden as --section.key=value, e.g. "
                              "--precision.recipe=fp8-rowwise --train.steps=40; --help-config lists them.")
    t.add_argument("-c", "--config", help="TOML config file (e.g. configs/demo.toml)")
    t.add_argument("--run-dir", help="run directory; an existing run there is resumed (default: a new one under runs/)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.set_defaults(fn=_cmd_train)
    r = sub.add_parser("recipes", help="list the precision recipes and the hardware they need")
    r.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("show", help="table of finished runs' summaries")
    s.add_argument("runs", nargs="+", help="run directories")
    s.set_defaults(fn=_cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args, rest)
    except FP8LabError as e:
        print(f"fp8lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fp8lab: interrupted; the newest complete checkpoint resumes the run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
