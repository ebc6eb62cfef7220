"""kill -9 at seeded moments, during training and inside a checkpoint write: the run resumes
from the newest complete checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fp8lab.precision import to_plain
from fp8lab.train.build import build
from fp8lab.train.checkpoint import list_complete, load_model_weights
from fp8lab.train.faults import POINTS
from fp8lab.train.logs import read_jsonl
from fp8lab.train.preempt import PREEMPTED_EXIT, StopRequest
from helpers import REPO, SRC, TRAINER_BASE, trainer_config

STEPS, INTERVAL = 8, 2
RECIPES = {"fp32": {"precision.recipe": "bf16", "precision.compute_dtype": "fp32"},
           "fp8": {"precision.recipe": "fp8-tensorwise"}}
# Five kill points chosen by a seeded generator: one during training, four inside a
# checkpoint write (after DCP's files, after state.json, after the manifest, after the
# marker but before the rename), each at a seeded checkpoint step.
_rng = np.random.default_rng(2026)
KILLS = [f"step-end@{int(_rng.integers(2, STEPS))}"] + [
    f"{point}@{int(_rng.choice([2, 4, 6]))}" for point in POINTS[1:5]]
# The kill during training under both recipes; each point inside a checkpoint write under one of
# them, alternating (the write does not depend on the recipe: plain tensors either way).
CASES = [("fp32", KILLS[0]), ("fp8", KILLS[0])] + [(("fp8", "fp32")[i % 2], k) for i, k in enumerate(KILLS[1:])]


def _args(data, run, recipe) -> list[str]:
    over = {**TRAINER_BASE, "data.path": str(data), "train.steps": STEPS, "checkpoint.interval": INTERVAL,
            "train.eval_interval": 3, **RECIPES[recipe]}
    return [sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run), *(f"--{k}={v}" for k, v in over.items())]


def _run(args, *, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FP8LAB_KILL_AT"} | {"PYTHONPATH": str(SRC)}
    if kill_at:
        env["FP8LAB_KILL_AT"] = kill_at
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def _final(run, data, recipe):
    cfg = trainer_config(data, **RECIPES[recipe])
    model = build(cfg).model
    step, path = list_complete(run)[-1]
    load_model_weights(path, model)
    return step, {n: to_plain(p).detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = {}
    for recipe in RECIPES:
        run = tmp_path_factory.mktemp(f"full-{recipe}")
        proc = _run(_args(tiny_data, run, recipe))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[recipe] = run
    return out


@pytest.mark.parametrize("recipe,kill_at", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_data, tmp_path, uninterrupted, recipe, kill_at):
    run = tmp_path / "run"
    killed = _run(_args(tiny_data, run, recipe), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-1000:])
    point, step = kill_at.split("@")
    survivors = [s for s, _ in list_complete(run)]
    if point.startswith("ckpt-"):
        # died inside the write of checkpoint `step`: it must not look complete
        assert int(step) not in survivors
    resumed = _run(_args(tiny_data, run, recipe))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    full = uninterrupted[recipe]
    losses = lambda d: [(r["step"], r["loss"], r.get("eval_loss")) for r in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert losses(run) == losses(full)  # every logged loss, bit for bit
    (sa, wa), (sb, wb) = _final(full, tiny_data, recipe), _final(run, tiny_data, recipe)
    assert sa == sb == STEPS
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    kinds = [e["kind"] for e in read_jsonl(run / "events.jsonl")]
    # a restart says where it came from; the folder the kill left half-written is cleaned up
    assert ("resume" in kinds) == bool(survivors)
    assert ("cleanup" in kinds) == point.startswith("ckpt-")


def _losses(run):
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in read_jsonl(run / "metrics.jsonl")]


def test_sigterm_saves_where_it_stops_and_resumes_bit_for_bit(tiny_data, tmp_path, uninterrupted):
    """A scheduler's SIGTERM after step 5 (checkpoints every 2): a checkpoint at step 5, exit 75
    with how to resume, and the resumed run ends exactly where the uninterrupted one does."""
    run = tmp_path / "run"
    stopped = _run(_args(tiny_data, run, "fp32"), kill_at="step-end@5:TERM")
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stderr[-2000:]
    assert "SIGTERM: stopped after step 5" in stopped.stderr and "run the same command to resume" in stopped.stderr
    assert [s for s, _ in list_complete(run)][-1] == 5
    assert any(e["kind"] == "preempted" for e in read_jsonl(run / "events.jsonl"))
    resumed = _run(_args(tiny_data, run, "fp32"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(run) == _losses(uninterrupted["fp32"])
    (_, wa), (_, wb) = _final(uninterrupted["fp32"], tiny_data, "fp32"), _final(run, tiny_data, "fp32")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_a_second_signal_during_that_save_stops_at_once_and_damages_nothing(tiny_data, tmp_path, uninterrupted):
    """SIGTERM after step 5, then SIGHUP inside the checkpoint it asked for: the process ends at
    once (a repeat of the same signal within a second is taken as the same request: schedulers
    deliver one stop twice), and the half-written checkpoint does not count."""
    run = tmp_path / "run"
    killed = _run(_args(tiny_data, run, "fp32"), kill_at="step-end@5:TERM,ckpt-after-dcp@5:HUP")
    assert killed.returncode == -signal.SIGHUP, killed.stderr[-2000:]
    assert [s for s, _ in list_complete(run)] == [2, 4]  # step 5's half-written checkpoint does not count
    resumed = _run(_args(tiny_data, run, "fp32"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(run) == _losses(uninterrupted["fp32"])


def test_one_stop_delivered_twice_is_one_request_and_nohup_is_respected():
    """In this process: SIGTERM twice in quick succession (slurmstepd and torchrun's agent both
    send one) leaves a single request and the process alive; an ignored SIGHUP stays ignored."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what `nohup` does
    try:
        with StopRequest(["SIGTERM", "SIGHUP"]) as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # let Python run the handlers
            assert stop.requested and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored when the run ends
    finally:
        signal.signal(signal.SIGHUP, previous)
