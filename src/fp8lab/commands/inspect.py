"""fp8lab inspect RUN: the riskiest FP8 layers from RUN/telemetry.jsonl, and what the guard did."""

from __future__ import annotations

from pathlib import Path

from fp8lab.errors import FP8LabError

ORDER = 25


def register(sub) -> None:
    s = sub.add_parser("inspect", help="riskiest FP8 layers (telemetry) and guard events of a run")
    s.add_argument("run", help="run directory")
    s.add_argument("--top", type=int, default=15, help="rows in the layer table (default 15)")
    s.add_argument("--step", type=int, help="telemetry step to show (default: the latest)")
    s.set_defaults(fn=run)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def _num(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def run(args, rest) -> int:
    from rich.table import Table

    from fp8lab.precision.telemetry import riskiest
    from fp8lab.train.logs import read_jsonl
    from fp8lab.ui import console

    run_dir = Path(args.run)
    if not (run_dir / "config.toml").is_file():
        raise FP8LabError(f"{run_dir} is not an fp8lab run directory (no config.toml)")
    telemetry = read_jsonl(run_dir / "telemetry.jsonl") if (run_dir / "telemetry.jsonl").exists() else []
    if telemetry:
        steps = sorted({r["step"] for r in telemetry})
        step = args.step if args.step is not None else steps[-1]
        if step not in steps:
            raise FP8LabError(f"no telemetry at step {step} in {run_dir}; steps with telemetry: "
                              f"{', '.join(map(str, steps[-10:]))}")
        rows = riskiest([r for r in telemetry if r["step"] == step], top=args.top)
        t = Table(title=f"riskiest FP8 casts at step {step} ({len(steps)} telemetry steps in {run_dir})")
        for col in ("layer", "tensor", "SQNR dB", "underflow", "to zero", "amax", "amax/median", "non-finite"):
            t.add_column(col, justify="left" if col in ("layer", "tensor") else "right")
        for r in rows:
            t.add_row(r["layer"], r["tensor"], _num(r["sqnr_db"], ".1f"), _pct(r["underflow_frac"]),
                      _pct(r["zero_frac"]), _num(r["amax"], ".3g"), _num(r["amax_over_median"], ".3g"),
                      str(r["nonfinite"]))
        console.print(t)
    else:
        console.print(f"no FP8 telemetry in {run_dir}: train with --logging.telemetry_interval=N (and an FP8 recipe)")
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    guard = [e for e in events if e["kind"] in ("alarm", "rollback", "stop", "skip", "damaged")]
    if guard:
        t = Table(title="guard events")
        t.add_column("step", justify="right")
        t.add_column("kind")
        t.add_column("what happened", overflow="fold")
        for e in guard:
            t.add_row(str(e["step"]), e["kind"], e["message"])
        console.print(t)
    else:
        console.print("guard: no alarms, rollbacks or skipped steps")
    return 0
