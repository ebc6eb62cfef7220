"""Crashes around a rollback, and restarts without a checkpoint, as a killed job meets them:
each ends, with the identical command, exactly where the uninterrupted run ends (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fp8lab.config import load_config
from fp8lab.models import Transformer
from fp8lab.train.build import model_args_for, open_data
from fp8lab.train.checkpoint import list_complete, load_model_weights
from fp8lab.train.faults import POINTS
from fp8lab.train.logs import read_jsonl
from helpers import REPO, SRC, TRAINER_BASE

# fp8-tensorwise with a spike on the data step 14 trains on; no checkpoint is good yet (20
# alarm-free steps are needed), so the guard rolls back to step 0 and re-saves it as step-0.
ZERO = {**TRAINER_BASE, "train.steps": 18, "checkpoint.interval": 4, "guard.warmup_steps": 5,
        "guard.skip_steps": 3, "debug.inject_spike_at_step": 14, "debug.inject_spike_factor": 8,
        "precision.recipe": "fp8-tensorwise"}


def _train(data, run, *, kill_at: str | None = None, **over) -> subprocess.CompletedProcess:
    args = {**ZERO, "data.path": str(data), **over}
    env = {k: v for k, v in os.environ.items() if k != "FP8LAB_KILL_AT"} | {"PYTHONPATH": str(SRC)}
    if kill_at:
        env["FP8LAB_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run),
                           *(f"--{k}={v}" for k, v in args.items())],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _losses(run) -> list:
    return [(r["step"], r["recipe"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero") / "run"
    proc = _train(tiny_data, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = read_jsonl(run / "events.jsonl")
    assert [(e["kind"], e.get("rolled_back_to")) for e in events] == [("alarm", None), ("rollback", 0)]
    return run


@pytest.mark.parametrize("kill_at", ["ckpt-after-rename@0", "ckpt-after-dcp@0"])
def test_a_kill_at_the_step_0_resave_resumes_with_the_identical_command(tiny_data, tmp_path, uninterrupted,
                                                                        kill_at):
    """ckpt-after-rename: step-0 holds no optimizer state (nothing has stepped), which once made
    every resume fail; ckpt-after-dcp: config.toml named the fallback recipe before any checkpoint
    did, which once made the identical command a 'different run'."""
    run = tmp_path / "run"
    killed = _train(tiny_data, run, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _train(tiny_data, run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(run) == _losses(uninterrupted)
    assert [s for s, _ in list_complete(run)][-1] == 18


def test_events_survive_a_restart_without_any_checkpoint(tiny_data, tmp_path):
    """Killed before its first checkpoint, a run starts over, but events.jsonl is history: the
    first attempt's events stay (the README says it is never rewritten)."""
    run = tmp_path / "run"
    nan = {"debug.inject_spike_at_step": 0, "debug.inject_nan_at_step": 2, "train.steps": 6}
    assert _train(tiny_data, run, kill_at="step-end@3", **nan).returncode == -9
    assert [(e["kind"], e["step"]) for e in read_jsonl(run / "events.jsonl")] == [("skip", 2)]
    assert _train(tiny_data, run, **nan).returncode == 0
    assert [(e["kind"], e["step"]) for e in read_jsonl(run / "events.jsonl")] == [("skip", 2), ("skip", 2)]


# Both kinds of rollback in one run: a non-finite step at 6 rolls back to step 0 (no checkpoint
# is good yet) onto fp8-rowwise; later the spiked data rolls back to step 4 (good by then) onto
# fp8-rowwise-gw-hp.
BOTH = {**ZERO, "train.steps": 20, "guard.good_after_steps": 4, "guard.max_nonfinite_streak": 1,
        "debug.inject_nan_at_step": 6}
# Kill moments drawn by a seeded generator from every point of that run's timeline, step 0's
# re-save included (benchmarks/kill_drill.py kills at random wall-clock moments instead).
_rng = np.random.default_rng(12)
_MOMENTS = [f"step-end@{s}" for s in range(1, 20)] + [f"{p}@{s}" for p in POINTS[1:] for s in (0, 4, 8, 12, 16)]
KILLS = [str(k) for k in _rng.choice(_MOMENTS, size=2, replace=False)]


@pytest.fixture(scope="module")
def both_rollbacks(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("both") / "run"
    proc = _train(tiny_data, run, **BOTH)
    assert proc.returncode == 0, proc.stderr[-2000:]
    targets = [e["rolled_back_to"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "rollback"]
    assert targets == [0, 4]  # the run really rolls back to the start and to a later checkpoint
    return run


@pytest.mark.parametrize("kill_at", KILLS)
def test_a_kill_anywhere_around_two_rollbacks_ends_where_the_uninterrupted_run_ends(tiny_data, tmp_path,
                                                                                   both_rollbacks, kill_at):
    run = tmp_path / "run"
    killed = _train(tiny_data, run, kill_at=kill_at, **BOTH)
    assert killed.returncode == -9, (kill_at, killed.stderr[-2000:])
    again = _train(tiny_data, run, **BOTH)  # the identical command
    assert again.returncode == 0, (kill_at, again.stderr[-2000:])
    assert _losses(run) == _losses(both_rollbacks)
    assert _params(run, tiny_data) == _params(both_rollbacks, tiny_data)


def _params(run, data) -> dict:
    """The final checkpoint's tensors as bytes (equal bytes: bit for bit the same)."""
    cfg = load_config(None, {**{k: str(v) for k, v in BOTH.items()}, "data.path": str(data)})
    model = Transformer(model_args_for(cfg, open_data(cfg).vocab_size))
    load_model_weights(list_complete(run)[-1][1], model)
    return {n: p.detach().numpy().tobytes() for n, p in model.named_parameters()}
