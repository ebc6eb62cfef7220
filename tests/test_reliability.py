"""What a run directory survives (issue 12): a full disk while checkpointing, checkpoints that
verify but do not load, a damaged log line, and bad input that once ended in a traceback. Each
case reproduces the report's finding on real files and checks the promised outcome."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import pytest
import torch

from fp8lab.cli import main
from fp8lab.train.checkpoint import MANIFEST, _file_manifest, list_complete
from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import train
from helpers import REPO, SRC, TRAINER_BASE, trainer_config, tree_digest

STEPS = {"train.steps": 6, "checkpoint.interval": 2}


def _fix_manifest(ckpt) -> None:
    """Rewrite a checkpoint's manifest to match its files: damage that verification cannot see."""
    (ckpt / MANIFEST).write_text(json.dumps(_file_manifest(ckpt), indent=1, sort_keys=True))


def _losses(run) -> list:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(trainer_config(tiny_data, **STEPS), run)
    return run


def _stopped_at_4(tiny_data, tmp_path):
    """A run stopped after step 4 with checkpoints at 2 and 4, as a crash leaves it."""
    run = tmp_path / "run"
    train(trainer_config(tiny_data, **STEPS, **{"debug.stop_at_step": 4}), run)
    assert [s for s, _ in list_complete(run)] == [2, 4]
    return run


# -- checkpoints that verify but do not load (item 9), and a hostile .metadata (item 7) ---------

@pytest.mark.parametrize("damage", ["state-not-a-dict", "state-without-rng", "step-not-an-int", "metadata-torch-size"])
def test_a_checkpoint_that_verifies_but_does_not_load_is_passed_over(tiny_data, tmp_path, finished, damage):
    run = _stopped_at_4(tiny_data, tmp_path)
    ckpt = run / "checkpoints" / "step-4"
    state = json.loads((ckpt / "state.json").read_text())
    if damage == "state-not-a-dict":
        (ckpt / "state.json").write_text("[]")
    elif damage == "state-without-rng":
        (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "rng"}))
    elif damage == "step-not-an-int":
        (ckpt / "state.json").write_text(json.dumps(state | {"step": "abc"}))
    else:
        (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(torch.Size([3])))
    _fix_manifest(ckpt)
    summary = train(trainer_config(tiny_data, **STEPS), run)  # the same command
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert (run / "checkpoints" / "step-4.damaged").is_dir()  # kept for inspection, never loaded
    events = read_jsonl(run / "events.jsonl")
    said = [e["message"] for e in events if e["kind"] == "damaged"]
    assert len(said) == 1 and "step-4 verified but did not load" in said[0]
    assert [e["message"] for e in events if e["kind"] == "resume"] == [f"resumed from {run / 'checkpoints' / 'step-2'}"
                                                                       " at step 2"]
    assert _losses(run) == _losses(finished)  # resumed from step 2, exactly


def test_with_no_loadable_checkpoint_the_run_is_refused_not_restarted(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(trainer_config(tiny_data, **{"train.steps": 4, "checkpoint.interval": 2, "debug.stop_at_step": 2}), run)
    ckpt = run / "checkpoints" / "step-2"
    (ckpt / "state.json").write_text("[]")
    _fix_manifest(ckpt)
    before = tree_digest(run)
    with pytest.raises(Exception, match="no checkpoint in .* loads: .*step-2: state.json holds a list"):
        train(trainer_config(tiny_data, **{"train.steps": 4, "checkpoint.interval": 2}), run)
    assert tree_digest(run) == before


# -- a full disk while checkpointing (item 4) ---------------------------------------------------

def _train_with_file_limit(data, run, limit: int | None) -> subprocess.CompletedProcess:
    """`fp8lab train` with files capped at `limit` bytes: writes past it fail with EFBIG, as on a
    full disk (SIGXFSZ ignored, or the kernel would kill the process instead)."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = {**TRAINER_BASE, **STEPS, "data.path": str(data)}
    env = {k: v for k, v in os.environ.items() if k != "FP8LAB_KILL_AT"} | {"PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run),
                           *(f"--{k}={v}" for k, v in args.items())], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900, preexec_fn=cap if limit else None)


def test_a_full_disk_while_checkpointing_is_one_line_and_resumable(tiny_data, tmp_path, finished):
    run = _stopped_at_4(tiny_data, tmp_path)
    full = _train_with_file_limit(tiny_data, run, 200_000)  # the checkpoint's tensors are ~1.3 MB
    assert full.returncode == 2, full.stderr[-2000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8lab: error: could not write checkpoint")
    assert "step-6" in lines[0] and "bytes" in lines[0] and "step-4, is intact" in lines[0], lines[0]
    assert [s for s, _ in list_complete(run)] == [2, 4]  # the older checkpoints are intact
    leftovers = [p.name for p in run.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []  # no half-written checkpoint or temporary file stays behind
    again = _train_with_file_limit(tiny_data, run, None)  # space freed: the same command resumes
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(run) == _losses(finished)


# -- a damaged line in the middle of metrics.jsonl (item 8) ---------------------------------------

def test_a_damaged_metrics_line_costs_that_line_only(tiny_data, tmp_path, finished):
    run = tmp_path / "run"
    train(trainer_config(tiny_data, **STEPS, **{"debug.stop_at_step": 5}), run)
    recs = (run / "metrics.jsonl").read_text().splitlines()
    recs[2] = recs[2][: len(recs[2]) // 2]  # step 3's record, cut in half
    (run / "metrics.jsonl").write_text("\n".join(recs) + "\n")
    summary = train(trainer_config(tiny_data, **STEPS), run)  # resumes at step 4
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == [1, 2, 4, 5, 6]  # step 3's line is lost; everything after it is kept
    assert summary["final_train_loss"] == _losses(finished)[-1][1]  # the last step's, not an early one
    said = [e["message"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "damaged"]
    assert said == ["metrics.jsonl: 1 line(s) were not JSON (damaged?) and were dropped; the records after them "
                    "were kept"]


# -- bad input that once ended in a traceback (item 7): one line, exit 2, nothing written ---------

@pytest.mark.parametrize("args, message", [
    (["--train.steps=" + "9" * 400], "is out of range"),
    (["--train.seed=99999999999999999999999"], "train.seed=99999999999999999999999 is out of range"),
    (["--model.dim=1000000"], "more than the"),
    (["--model.n_layers=1000000"], "more than the"),
    (["--model.vocab_size=1000000000"], "choose a smaller model"),
], ids=["steps-400-digits", "huge-seed", "huge-dim", "huge-depth", "huge-vocab"])
def test_bad_numbers_are_one_line_exit_2(tiny_data, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    base = [f"--{k}={v}" for k, v in {**TRAINER_BASE, "data.path": tiny_data}.items()]
    assert main(["train", "--run-dir", str(run), *base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fp8lab: error: ") and message in err[0], err
    assert not run.exists()


def test_a_nested_list_in_toml_is_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[guard]\nladder = [["bf16"]]\n')
    assert main(["train", "-c", str(tmp_path / "c.toml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "guard.ladder must be a list of non-empty names" in capsys.readouterr().err


def test_a_checkpoints_file_where_the_folder_should_be_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(trainer_config(tiny_data, **{"train.steps": 2, "checkpoint.interval": 0, "checkpoint.at_end": "false"}), run)
    (run / "checkpoints").write_text("not a folder")
    before = tree_digest(run)
    assert main(["train", "--run-dir", str(run), f"--data.path={tiny_data}"] + [
        f"--{k}={v}" for k, v in {**TRAINER_BASE, "train.steps": 2, "checkpoint.interval": 0,
                                  "checkpoint.at_end": "false"}.items()]) == 2
    assert f"{run / 'checkpoints'} is a file" in capsys.readouterr().err
    assert tree_digest(run) == before


def test_a_run_dir_on_a_read_only_file_system_is_one_line(tiny_data, capsys):
    assert main(["train", "--run-dir", "/sys/fp8lab-run", f"--data.path={tiny_data}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8lab: error: cannot create run directory /sys/fp8lab-run") and "--run-dir" in err
