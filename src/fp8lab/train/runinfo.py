"""What a run directory says about its run, finished or not: for `fp8lab show`.

A finished run has summary.json. An unfinished one is described from what it wrote as it went
(config.toml, metrics.jsonl, events.jsonl, checkpoints/) and from its lock: a live process
holding RUN/.lock is training it now; otherwise it was stopped by a signal (after saving, an
event says so) or killed, and the same command resumes it from its newest checkpoint.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

from fp8lab.train.checkpoint import list_complete
from fp8lab.train.logs import read_jsonl
from fp8lab.train.rundir import running_holder

STATUSES = ("finished", "stopped-by-guard", "running", "stopped", "killed")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.toml").is_file() and not (Path(path) / "compare.json").is_file()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_run(run_dir: Path) -> dict:
    """A summary-shaped record of the run in `run_dir` with a `status` (one of STATUSES) and,
    where the run is unfinished, what is known so far (`steps` done, `total_steps`)."""
    run_dir = Path(run_dir)
    holder = running_holder(run_dir)  # a live trainer wins over any file: it may be resuming a finished run
    summary = _read_json(run_dir / "summary.json")
    if summary is not None and holder is None:
        status = {"completed": "finished"}.get(summary.get("status"), summary.get("status") or "finished")
        return summary | {"status": status, "total_steps": summary.get("steps")}
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        cfg = {}
    recs = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").is_file() else []
    if holder is not None:
        status = "running"
    elif events and events[-1].get("kind") == "preempted":
        status = "stopped"
    else:
        status = "killed"
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    timed = [r["tokens_per_s"] for r in recs if not r.get("warmup") and not r.get("skipped")]
    evals = [r["eval_loss"] for r in recs if r.get("eval_loss") is not None]
    labels = [r["label"] for r in recs if r.get("label")]
    checkpoints = [s for s, _ in list_complete(run_dir)]
    recipe = (recs[-1].get("recipe") if recs else None) or cfg.get("precision", {}).get("recipe", "?")
    return {
        "run_dir": str(run_dir), "status": status, "recipe": recipe, "label": labels[-1] if labels else recipe,
        "steps": recs[-1]["step"] if recs else 0, "total_steps": cfg.get("train", {}).get("steps"),
        "final_train_loss": losses[-1] if losses else None, "final_eval_loss": evals[-1] if evals else None,
        "tokens_per_s_median": statistics.median(timed) if timed else None,
        "mem_peak_gb": max((r["mem_peak_gb"] for r in recs if r.get("mem_peak_gb") is not None), default=None),
        "conversion": None, "newest_checkpoint": checkpoints[-1] if checkpoints else None,
        "pid": holder.pid if holder else None,
    }
