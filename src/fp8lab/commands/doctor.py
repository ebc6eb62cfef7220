"""fp8lab doctor [--json]: versions, device, and probes that run every recipe here."""

from __future__ import annotations

import json

ORDER = 40

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}


def register(sub) -> None:
    d = sub.add_parser("doctor", help="check the stack and probe every recipe on this machine",
                       description="Versions against the tested stack, the GPU, and probes that actually run a "
                                   "scaled matmul and a converted linear per recipe, torch.compile, NCCL (several "
                                   "GPUs), and this GPU's BF16/FP8 matmul rates (cached for `fp8lab advise`). "
                                   "Exit status 0 when the default recipe (bf16) runs.")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--no-measure", action="store_true", help="skip measuring the GPU's matmul rates")
    d.add_argument("--remeasure", action="store_true", help="measure the GPU's rates again instead of the cached ones")
    d.set_defaults(fn=run)


def run(args, rest) -> int:
    import logging

    from fp8lab.bench.doctor import run_doctor

    log = logging.getLogger("fp8lab")
    level = log.level
    log.setLevel(logging.ERROR)  # the probes log the emulation note; the table says it
    try:
        report = run_doctor(measure=not args.no_measure, remeasure=args.remeasure)
    finally:
        log.setLevel(level)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        render(report)
    return report.exit_code


def render(report) -> None:
    from rich.table import Table

    from fp8lab.ui import console

    t = Table(title="fp8lab doctor")
    t.add_column("check", no_wrap=True)
    t.add_column("", no_wrap=True)
    t.add_column("finding", overflow="fold")
    t.add_column("what to do", overflow="fold")
    for c in report.checks:
        t.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
    console.print(t)
    where = "this GPU" if report.device.kind == "cuda" else "CPU"
    if report.bf16_runs:
        line = f"[bold green]verdict[/]: the default recipe (bf16) runs on {where}"
    else:
        line = f"[bold red]verdict[/]: the default recipe (bf16) does NOT run on {where}"
    console.print(line)
    if report.runs_natively[1:]:
        console.print(f"  native FP8: {', '.join(report.runs_natively[1:])}")
    if report.runs_emulated:
        console.print(f"  emulated (numerics only, throughput not representative): {', '.join(report.runs_emulated)}")
    if report.unavailable:
        console.print(f"  not available here: {', '.join(report.unavailable)}")
