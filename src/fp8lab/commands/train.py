"""fp8lab train -c CONFIG [--section.key=value ...] [--run-dir DIR]"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 10  # position in `fp8lab --help`
TAKES_OVERRIDES = True  # unknown --section.key=value arguments are config overrides


def register(sub) -> None:
    t = sub.add_parser("train", help="train or resume a run",
                       epilog="Any config key can be overridden as --section.key=value, e.g. "
                              "--precision.recipe=fp8-rowwise --train.steps=40; --help-config lists them. "
                              "Exit codes: 0 done; 2 bad input, or the guard stopped the run; 75 stopped by "
                              "SIGTERM/SIGHUP (train.stop_signals) after saving a checkpoint: rerun the same "
                              "command to resume; 130 Ctrl-C (the newest complete checkpoint resumes).")
    t.add_argument("-c", "--config", help="TOML config file (e.g. configs/demo.toml)")
    t.add_argument("--run-dir", help="run directory; an existing run there is resumed (default: a new one under runs/)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.add_argument("--allow-recipe-change", action="store_true",
                   help="on resume, train with --precision.recipe from the checkpoint on (e.g. bf16 warm-up, then "
                        "FP8), instead of the checkpoint's recipe; recorded as a recipe-change event")
    t.set_defaults(fn=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from fp8lab.config import describe_fields, load_config, parse_overrides

    if args.help_config:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, parse_overrides(rest))
    from fp8lab.train import dist
    from fp8lab.train.trainer import train  # late: imports torch

    env = dist.init(cfg.parallel.data_parallel, cfg.train.device)
    stem = Path(args.config or "default").stem
    # Under torchrun every rank must use rank 0's directory (the clock differs between ranks).
    run_dir = dist.broadcast(args.run_dir or Path("runs") / f"{stem}-{cfg.precision.recipe}-{datetime.now():%Y%m%d-%H%M%S}")
    if env.world_size == 1:
        try:
            train(cfg, Path(run_dir), allow_recipe_change=args.allow_recipe_change)
        finally:
            dist.shutdown()
        return 0
    try:
        train(cfg, Path(run_dir), allow_recipe_change=args.allow_recipe_change)
        dist.shutdown()  # torchrun ranks: leave the process group together
        code = 0
    except BaseException as e:  # noqa: BLE001 - said below, then this rank leaves
        # No barrier here: the other ranks may be inside a collective and would wait for this
        # one forever. Leaving at once makes torchrun stop them.
        if isinstance(e, FP8LabError):
            print(f"fp8lab: {e.prefix} (rank {env.rank}): {e}", file=sys.stderr)
        else:
            traceback.print_exc()
        code = e.exit_code if isinstance(e, FP8LabError) else 1
    # Skip the interpreter's teardown: gloo's threads can abort it ("terminate called without an
    # active exception", 2 of 9 CPU runs here). Logs and checkpoints are closed and on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
