"""fp8lab compare -c CONFIG --recipes bf16,fp8-tensorwise [--seeds N] --out DIR"""

from __future__ import annotations

from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 15
TAKES_OVERRIDES = True


def register(sub) -> None:
    c = sub.add_parser(
        "compare", help="train BF16 and FP8 recipes side by side; verdict and report",
        description="Train each recipe from the same initial weights on the same batches for the same steps, "
                    "then judge each FP8 recipe's loss against BF16 (parity / worse / diverged, against the "
                    "seed-to-seed noise) and write OUT/summary.json, OUT/report.md and OUT/report.html. "
                    "Rerunning the same command resumes an interrupted comparison.",
        epilog="Config keys can be overridden as --section.key=value (as for fp8lab train).")
    c.add_argument("-c", "--config", help="TOML config file (e.g. configs/demo.toml)")
    c.add_argument("--recipes", default="bf16,fp8-tensorwise,fp8-rowwise",
                   help="comma-separated recipes; bf16 is required (default: %(default)s)")
    c.add_argument("--seeds", type=int, default=1,
                   help="seeds per recipe; with 2 or more BF16's seed-to-seed spread sets the noise band (default 1)")
    c.add_argument("--tokens", type=int, help="train each run on this many tokens (sets train.steps)")
    c.add_argument("--out", required=True, help="output directory (an existing comparison there is resumed)")
    c.add_argument("--band", type=float, help="noise band for the loss gap, in loss units (default: measured "
                                              "from the seeds, or 1%% of BF16's loss with one seed)")
    c.add_argument("--min-steps", type=int, default=None,
                   help="fewer steps than this gives an inconclusive verdict (default 100)")
    c.add_argument("--allow-fallback", action="store_true",
                   help="let the guard roll back and fall down the ladder as in training (the recipe is still "
                        "judged diverged); default: the first alarm stops the run")
    c.set_defaults(fn=run)


def run(args, rest) -> int:
    from fp8lab.compare import verdict as V
    from fp8lab.compare.runner import Plan, check_recipes, command_line, run_compare, with_token_budget
    from fp8lab.config import load_config, parse_overrides

    if args.seeds < 1:
        raise FP8LabError(f"--seeds {args.seeds}: give 1 or more")
    if args.band is not None and not args.band > 0:
        raise FP8LabError(f"--band {args.band}: give a positive loss difference, e.g. 0.02")
    min_steps = V.DEFAULT_MIN_STEPS if args.min_steps is None else args.min_steps
    if min_steps < 1:
        raise FP8LabError(f"--min-steps {min_steps}: give 1 or more")
    recipes = check_recipes([r.strip() for r in args.recipes.split(",") if r.strip()])
    overrides = parse_overrides(rest)
    if "precision.recipe" in overrides:
        raise FP8LabError("--precision.recipe has no effect in compare: name the recipes with --recipes")
    cfg = load_config(args.config, overrides)
    if cfg.parallel.data_parallel != "none":
        raise FP8LabError(f"parallel.data_parallel={cfg.parallel.data_parallel}: compare trains one process per run; "
                          "compare on one GPU, then scale the winner out with torchrun")
    from fp8lab.ui import console, setup_logging

    setup_logging()
    if args.tokens is not None:
        cfg = with_token_budget(cfg, args.tokens)
        console.print(f"--tokens {args.tokens:,}: {cfg.train.steps} steps of {cfg.tokens_per_step:,} tokens"
                      + (f" (in place of --train.steps={overrides['train.steps']})" if "train.steps" in overrides
                         else ""))
    plan = Plan(cfg=cfg, recipes=recipes, seeds=args.seeds, out=Path(args.out), allow_fallback=args.allow_fallback,
                band=args.band, min_steps=min_steps, command=command_line(args.argv[1:]), config=args.config)
    summary = run_compare(plan, echo=console.print)
    from fp8lab.compare.table import print_summary

    print_summary(summary)
    # Diverged and unsupported recipes are findings; a run that crashed is not.
    return 1 if any(run["status"] == "failed" for r in summary["results"] for run in r["runs"]) else 0
