"""The `fp8lab` command line, run as a user runs it: a fresh interpreter per command.

Each subprocess pays ~1.5 s (config errors) to ~3 s (a tiny training run) of imports, so
one tiny run is trained per module and copied where a test needs to change it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from fp8lab.config import JobConfig, load_config, parse_overrides
from fp8lab.precision.recipes import RECIPES
from helpers import REPO, cli_env, run_cli, tiny_args, tree_digest

METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "tflops", "mfu",
                 "mem_peak_gb", "recipe"}
SUMMARY_FIELDS = {"recipe", "conversion", "steps", "final_train_loss", "final_eval_loss", "tokens_per_s_median",
                  "mem_peak_gb"}


def assert_cli_error(proc, *needles: str) -> str:
    """Exit 2, and stderr is one line `fp8lab: error: ...` containing every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("fp8lab: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One tiny bf16 run on the embedded corpus: (run dir, completed process)."""
    run = tmp_path_factory.mktemp("cli-run") / "R"
    proc = run_cli(["train", "--run-dir", run, *tiny_args()], cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


# -- informational commands ---------------------------------------------------------------------


def test_version(cache):
    import fp8lab

    proc = run_cli(["--version"], cache=cache)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fp8lab {fp8lab.__version__}", proc.stderr


def test_a_closed_pipe_ends_quietly(cache):
    """`fp8lab advise ... --json | head -c 600`: the reader leaves early; no traceback, exit 0."""
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m fp8lab advise --model 8b "
                                         "--gpu h100-sxm --json | head -c 600 > /dev/null"],
                          env=cli_env(cache), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_recipes_lists_the_five_recipes(cache):
    proc = run_cli(["recipes"], cache=cache)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines[::2]]
    assert names == list(RECIPES) == ["bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp", "mxfp8"]
    hardware = dict(zip(names, (line.split("runs on: ")[1] for line in lines[1::2])))
    assert hardware["bf16"].startswith("any CUDA GPU with bf16; CPU")
    assert all(hardware[r].startswith("sm_89+") for r in ("fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"))
    assert hardware["mxfp8"].startswith("sm_100 (B200, GB200); sm_12x (RTX 50xx) only where a kernel probe passes")


def test_help_config_lists_every_key(cache, tmp_path):
    proc = run_cli(["train", "--help-config"], cache=cache, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in JobConfig().flat():
        assert f"  {key} = " in proc.stdout, key
    assert not (tmp_path / "runs").exists()  # listing keys starts no run


# -- bad input: exit 2, one line naming the culprit, nothing written -----------------------------


@pytest.mark.parametrize("args,needles", [
    (["--precision.recipe=fp9"], ["precision.recipe='fp9' is not allowed", "fp8-tensorwise", "mxfp8"]),
    (["--train.step=3"], ["unknown config key 'train.step'", "did you mean 'train.steps'"]),
    (["--train.steps", "ten"], ["train.steps='ten' is not a valid int"]),
    (["-c", "{tmp}/missing.toml"], ["config file {tmp}/missing.toml does not exist"]),
    (["-c", "{tmp}/typed.toml"], ["{tmp}/typed.toml: train.steps='10' has type str; expected int"]),
], ids=["unknown-recipe", "unknown-key", "wrong-type", "missing-config", "wrong-toml-type"])
def test_bad_config_input_is_one_line_exit_2(cache, tmp_path, args, needles):
    (tmp_path / "typed.toml").write_text('[train]\nsteps = "10"\n')
    run = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli(["train", "--run-dir", run, *args], cache=cache, cwd=tmp_path)
    assert_cli_error(proc, *(n.replace("{tmp}", str(tmp_path)) for n in needles))
    assert not run.exists() and not (tmp_path / "runs").exists()


def test_missing_data_path_is_named(cache, tmp_path):
    proc = run_cli(["train", "--run-dir", tmp_path / "run", *tiny_args(data__path="/nonexistent")], cache=cache)
    assert_cli_error(proc, "data directory /nonexistent not found", "data.path")


def test_fp8_without_emulation_on_cpu_is_refused(cache, tmp_path):
    proc = run_cli(["train", "--run-dir", tmp_path / "run",
                    *tiny_args(precision__recipe="fp8-tensorwise", precision__emulate="off")], cache=cache)
    assert_cli_error(proc, "precision.recipe=fp8-tensorwise has no native CPU kernels", "--precision.emulate=auto")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_dir_holding_a_different_run_is_refused_byte_for_byte(cache, trained, tmp_path):
    run = shutil.copytree(trained[0], tmp_path / "R")
    before = tree_digest(run)
    assert "config.toml" in before and "summary.json" in before and "checkpoints/step-4/COMPLETE" in before
    proc = run_cli(["train", "--run-dir", run, *tiny_args(optim__lr="0.01")], cache=cache)
    assert_cli_error(proc, f"run directory {run} holds a different run",
                     "optim.lr: run has 0.0003, command gives 0.01", "choose a new --run-dir")
    assert tree_digest(run) == before


def test_a_second_trainer_on_a_run_is_refused_naming_the_first(cache, trained, tmp_path):
    """Two trainers must never share a run directory: the second is refused before it reads or
    writes anything there, naming the process that holds the run's lock (here: this one)."""
    from fp8lab.lock import DirLock

    run = shutil.copytree(trained[0], tmp_path / "R")
    with DirLock(run / ".lock"):
        before = tree_digest(run)
        proc = run_cli(["train", "--run-dir", run, *tiny_args(train__steps=6)], cache=cache)
        assert_cli_error(proc, f"run directory {run} is in use", f"process {os.getpid()}", str(run / ".lock"))
        assert tree_digest(run) == before
    assert not (run / ".lock").exists()


def test_non_empty_non_run_dir_is_refused_untouched(cache, tmp_path):
    run = tmp_path / "mine"
    (run / "data").mkdir(parents=True)
    (run / "notes.md").write_text("precious\n")
    (run / "data" / "x.npy").write_bytes(bytes(range(256)))
    before = tree_digest(run)
    proc = run_cli(["train", "--run-dir", run, *tiny_args()], cache=cache)
    assert_cli_error(proc, f"run directory {run} is not empty and holds no fp8lab run", "--run-dir")
    assert tree_digest(run) == before


def test_show_of_a_directory_without_a_run_is_an_error(cache, tmp_path):
    proc = run_cli(["show", tmp_path], cache=cache)
    assert_cli_error(proc, f"{tmp_path} holds no fp8lab run", str(tmp_path))


# -- a successful run -------------------------------------------------------------------------------


def test_train_writes_the_resolved_config(trained):
    run, proc = trained
    assert "done step 4" in proc.stdout
    saved = load_config(run / "config.toml")
    expected = load_config(None, parse_overrides(tiny_args()))
    assert saved == expected
    assert saved.data.path == "embedded" and saved.optim.lr == 3e-4 and saved.model.dim == 64


def test_train_uses_the_cache_dir_from_the_environment(trained, cache):
    manifests = list((cache / "data").glob("stdlib-s32-b200000-*/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["seq_len"] == 32


def test_train_writes_metrics_with_every_field(trained):
    run, _ = trained
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert METRIC_FIELDS <= set(r), METRIC_FIELDS - set(r)
        assert r["tokens"] == r["step"] * 4 * 32
        assert r["recipe"] == "bf16"
        assert r["mfu"] is None  # no peak figure for a CPU
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 20
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] >= 0
        assert 0 < r["lr"] <= 3e-4
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mem_peak_gb"] > 0
    assert recs[0]["lr"] == pytest.approx(3e-4)  # one warm-up step reaches the peak
    assert recs[-1]["lr"] < recs[0]["lr"]  # cosine decay


def test_train_writes_the_summary(trained):
    run, _ = trained
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary), SUMMARY_FIELDS - set(summary)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["recipe"] == "bf16" and summary["steps"] == 4
    assert summary["conversion"]["recipe"] == "bf16" and summary["conversion"]["num_converted"] == 0
    assert summary["final_train_loss"] == recs[-1]["loss"]
    assert math.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] > 0
    assert summary["tokens_per_s_median"] > 0
    assert summary["mem_peak_gb"] == max(r["mem_peak_gb"] for r in recs)
    assert (run / "checkpoints" / "step-4" / "COMPLETE").is_file()


def test_show_prints_a_table_with_the_recipe(cache, trained):
    run, _ = trained
    proc = run_cli(["show", run], cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert "fp8lab runs" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if "bf16" in line]
    assert len(rows) == 1
    assert " 4 " in rows[0]  # steps
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['final_eval_loss']:.4f}" in rows[0]
