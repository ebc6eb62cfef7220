"""One run of a comparison: launch `fp8lab train` for a recipe and seed in its own process,
and read back what it left on disk.

A process per run keeps each recipe's memory peak, compile caches and failures its own: a
run that crashes or runs out of memory becomes a row saying so, not the end of the
comparison. Everything is read back from the run directory, so a comparison that was
interrupted picks up finished runs as they are and resumes the others from their newest
checkpoint (the trainer does that, bit for bit).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from fp8lab.compare.verdict import Outcome
from fp8lab.errors import FP8LabError
from fp8lab.precision.convert import groups_text, linear_groups
from fp8lab.procs import INTERRUPTS, failure_reason, run_child
from fp8lab.train.logs import read_jsonl
from fp8lab.train.preempt import PREEMPTED_EXIT


@dataclass(frozen=True)
class RunSpec:
    recipe: str
    seed_index: int
    train_seed: int
    data_seed: int
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.recipe} seed {self.seed_index}"


def finished_status(run_dir: Path) -> str | None:
    """'completed' or 'stopped-by-guard' when the run wrote its summary, else None."""
    return _summary(run_dir).get("status")


def launch(spec: RunSpec, *, config: Path, extra: list[str], log: Path, echo) -> tuple[str, str | None]:
    """Run (or resume) `spec` to its end in a child `fp8lab train`; returns (status, reason).

    status: completed | stopped-by-guard | failed (a crash, an out-of-memory, a signal such as
    the kernel's OOM killer: the row says which, and a rerun retries it from its newest
    checkpoint). A child stopped by the user (Ctrl-C, SIGTERM, SIGHUP, here or to the child)
    stops the comparison with an FP8LabError saying how to resume it; Ctrl-C here is passed on
    to the child, which stops at its own pace (a second Ctrl-C kills it)."""
    cmd = [sys.executable, "-m", "fp8lab", "train", "-c", str(config), "--run-dir", str(spec.run_dir),
           f"--precision.recipe={spec.recipe}", f"--train.seed={spec.train_seed}",
           f"--data.seed={spec.data_seed}", "--logging.fingerprint=true", "--logging.progress=off", *extra]
    try:
        # A run's text is not markup: escaped.
        child = run_child(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"}, log=log, grace_s=None,
                          on_line=lambda line: echo(f"[dim]{spec.label}[/] {escape(line)}"))
    except KeyboardInterrupt:
        raise FP8LabError(_interrupted(spec)) from None
    rc = child.returncode
    if -rc in INTERRUPTS or rc in (130, PREEMPTED_EXIT):  # Ctrl-C; a stop signal the child saved and stopped on
        raise FP8LabError(_interrupted(spec))
    status = finished_status(spec.run_dir)
    if status == "completed":
        return status, None
    if status == "stopped-by-guard":
        return status, _summary(spec.run_dir).get("reason")
    return "failed", failure_reason(rc, child.output, None) + f" (log: {log})"


def _interrupted(spec: RunSpec) -> str:
    return (f"run {spec.run_dir} ({spec.label}) was interrupted; run the same fp8lab compare command again to "
            "resume it from its newest checkpoint (finished runs are kept)")


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def read_run(spec: RunSpec, status: str, reason: str | None) -> tuple[Outcome, dict, dict]:
    """(verdict outcome, per-run row for summary.json, curve for the report) from the run dir."""
    d = spec.run_dir
    summary = _summary(d)
    if reason is None and status == "stopped-by-guard":
        reason = summary.get("reason")  # a run kept from an earlier invocation
    recs = read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
    events = read_jsonl(d / "events.jsonl") if (d / "events.jsonl").is_file() else []
    alarms = [{"step": e["step"], "kind": e.get("alarm", "alarm"), "message": e["message"]}
              for e in events if e.get("kind") == "alarm"]
    wall, curve = 0.0, {"step": [], "loss": [], "wall_s": [], "tokens_per_s": [], "eval_step": [], "eval_loss": []}
    for r in recs:
        wall += r["step_time_s"]
        curve["step"].append(r["step"])
        curve["loss"].append(r["loss"])
        curve["wall_s"].append(wall)
        curve["tokens_per_s"].append(r["tokens_per_s"])
        if r.get("eval_loss") is not None:
            curve["eval_step"].append(r["step"])
            curve["eval_loss"].append(r["eval_loss"])
    outcome = Outcome(seed=spec.seed_index, status=status, losses=curve["loss"],
                      eval_loss=summary.get("final_eval_loss"), steps=summary.get("steps", len(recs)),
                      rollbacks=summary.get("rollbacks", 0), alarms=alarms)
    row = {"seed": spec.seed_index, "train_seed": spec.train_seed, "data_seed": spec.data_seed,
           "run_dir": str(d), "status": status, "reason": reason, "steps": outcome.steps,
           "tokens_per_s": summary.get("tokens_per_s_median"), "mem_peak_gb": summary.get("mem_peak_gb"),
           "final_train_loss": summary.get("final_train_loss"), "final_eval_loss": outcome.eval_loss,
           "rollbacks": outcome.rollbacks, "alarms": alarms, "init_digest": summary.get("init_digest"),
           "emulated": summary.get("emulated"), "label": summary.get("label"),
           "compute_dtype": summary.get("compute_dtype"), "converted": (summary.get("conversion") or {}).get("num_converted"),
           "converted_layers": _layers_text(summary.get("conversion")),
           # With --allow-fallback a rollback may have changed the recipe: the row says so.
           "final_recipe": summary.get("recipe"), "recipe_history": summary.get("recipe_history", []),
           "data_crc": [r.get("data_crc") for r in recs]}
    return outcome, row, curve


def environment(summaries: list[dict]) -> dict:
    """Device and versions from the runs' summaries (all ran on this machine)."""
    s = next(iter(summaries), {})
    versions = s.get("versions", {})
    notes = list(dict.fromkeys(n for x in summaries for n in x.get("notes", [])))
    if s.get("device") == "cpu":
        notes.append("peak memory on CPU is each run's process peak resident set, Python and torch included "
                     "(on a GPU it is torch's peak allocated)")
    return {"device": s.get("device"), "torch": versions.get("torch"), "torchao": versions.get("torchao"),
            "cuda": versions.get("cuda"), "python": versions.get("python"),
            "emulated": any(x.get("emulated") for x in summaries), "notes": notes}


def _layers_text(conversion: dict | None) -> str | None:
    """'7/8: wq wk ...' from a summary's conversion report (None for a run without one)."""
    if not conversion:
        return None
    return groups_text(linear_groups(conversion.get("converted", []), conversion.get("skipped", [])))
