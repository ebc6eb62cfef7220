"""fp8lab show on a folder of runs: finished, running, stopped by a signal and killed, each
read from what it left on disk (an unfinished run from its metrics; running from its lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from fp8lab.cli import main
from fp8lab.lock import DirLock
from fp8lab.train.runinfo import describe_run
from fp8lab.train.trainer import train
from helpers import REPO, cli_env, tiny_args, tiny_config

STEPS = 6


def _train_until(run, data, cache, kill_at: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run),
            *tiny_args(data__path=data, train__steps=STEPS, checkpoint__interval=2)]
    return subprocess.run(args, env=cli_env(cache) | {"FP8LAB_KILL_AT": kill_at}, cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def folder(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    train(tiny_config(tiny_data, **{"train.steps": 2}), root / "a-finished")
    assert _train_until(root / "b-killed", tiny_data, cache, "step-end@3").returncode == -9
    assert _train_until(root / "c-stopped", tiny_data, cache, "step-end@3:TERM").returncode == 75
    shutil.copytree(root / "b-killed", root / "d-running")
    (root / "not-a-run").mkdir()  # other folders are passed over
    return root, cache


def test_each_run_says_where_it_stands(folder):
    root, _ = folder
    lock = DirLock(root / "d-running" / ".lock").acquire()  # a live process (this one) holds the run
    try:
        got = {p.name: describe_run(p) for p in sorted(root.iterdir()) if p.name != "not-a-run"}
    finally:
        lock.release()
    assert {k: v["status"] for k, v in got.items()} == {
        "a-finished": "finished", "b-killed": "killed", "c-stopped": "stopped", "d-running": "running"}
    assert got["d-running"]["pid"] == os.getpid()
    assert got["a-finished"]["steps"] == 2
    for name in ("b-killed", "c-stopped"):
        assert got[name]["steps"] == 3 and got[name]["total_steps"] == STEPS
        assert got[name]["final_train_loss"] is not None and got[name]["newest_checkpoint"] in (2, 3)
    assert describe_run(root / "d-running")["status"] == "killed"  # the lock went with its holder


def test_show_lists_a_folder_and_a_single_unfinished_run(folder, capsys, monkeypatch):
    root, _ = folder
    monkeypatch.chdir(root)  # short paths: one table line per run
    assert main(["show", "."]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, status, steps in (("a-finished", "finished", " 2 "), ("b-killed", "killed", f"3/{STEPS}"),
                                ("c-stopped", "stopped", f"3/{STEPS}")):
        row = next(line for line in lines if name in line)
        assert status in row and steps in row, row
    assert main(["show", "b-killed"]) == 0
    out = capsys.readouterr().out
    assert "killed" in out and f"3/{STEPS}" in out
    assert main(["show", "not-a-run"]) == 2
    assert "not-a-run holds no fp8lab run" in capsys.readouterr().err
