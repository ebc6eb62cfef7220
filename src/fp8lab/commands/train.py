"""fp8lab train -c CONFIG [--section.key=value ...] [--run-dir DIR]"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

ORDER = 10  # position in `fp8lab --help`
TAKES_OVERRIDES = True  # unknown --section.key=value arguments are config overrides


def register(sub) -> None:
    t = sub.add_parser("train", help="train or resume a run",
                       epilog="Any config key can be overridden as --section.key=value, e.g. "
                              "--precision.recipe=fp8-rowwise --train.steps=40; --help-config lists them.")
    t.add_argument("-c", "--config", help="TOML config file (e.g. configs/demo.toml)")
    t.add_argument("--run-dir", help="run directory; an existing run there is resumed (default: a new one under runs/)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.set_defaults(fn=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from fp8lab.config import describe_fields, load_config, parse_overrides

    if args.help_config:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, parse_overrides(rest))
    stem = Path(args.config or "default").stem
    run_dir = args.run_dir or Path("runs") / f"{stem}-{cfg.precision.recipe}-{datetime.now():%Y%m%d-%H%M%S}"
    from fp8lab.train import dist
    from fp8lab.train.trainer import train  # late: imports torch

    try:
        train(cfg, Path(run_dir))
    finally:
        ranks = dist.current().world_size
        dist.shutdown()  # torchrun ranks: leave the process group together
    if ranks > 1:
        # Past this point gloo's threads can abort the interpreter's teardown ("terminate called
        # without an active exception", 2 of 9 CPU runs here): the work is done and on disk, so
        # leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
