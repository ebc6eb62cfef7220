"""fp8lab compare end to end on the tiny model: the runs of a seed really share initial
weights and batches, a killed comparison resumes to the same summary, unsupported and
diverged recipes are rows in the table, and bad input is refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fp8lab.cli import main
from fp8lab.train.logs import read_jsonl
from helpers import REPO, cli_env, run_cli, tiny_args, tree_digest

RECIPES = "bf16,fp8-tensorwise"


def compare_args(data, out, *extra, budget=("--tokens", "3000")) -> list[str]:
    """The tiny model with 2 micro-batches of 4 x 32 tokens per step: --tokens 3000 = 12 steps."""
    return ["compare", "--recipes", RECIPES, "--out", str(out),
            *tiny_args(data__path=data, checkpoint__interval=4, train__eval_batches=2, train__grad_accum_steps=2),
            *budget, *extra]


@pytest.fixture(scope="module")
def compared(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "C"
    proc = run_cli([*compare_args(tiny_data, out), "--seeds", "2"], cache=out.parent / "cache", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_runs_of_a_seed_share_weights_and_batches_and_seeds_differ(compared):
    out, proc = compared
    summary = json.loads((out / "summary.json").read_text())
    runs = {(row["recipe"], row["seed"]): row for r in summary["results"] for row in
            [dict(x, recipe=r["recipe"]) for x in r["runs"]]}
    assert set(runs) == {(r, s) for r in RECIPES.split(",") for s in (0, 1)}
    assert summary["steps"] == 12 and summary["tokens_per_step"] == 256 and "--tokens 3,000: 12 steps" in proc.stdout
    # Read what the runs recorded, independently of compare's own check.
    crcs = {k: [m["data_crc"] for m in read_jsonl(out / "runs" / f"{k[0]}-seed{k[1]}" / "metrics.jsonl")]
            for k in runs}
    digests = {k: json.loads((out / "runs" / f"{k[0]}-seed{k[1]}" / "summary.json").read_text())["init_digest"]
               for k in runs}
    for seed in (0, 1):
        assert digests[("bf16", seed)] == digests[("fp8-tensorwise", seed)]
        assert crcs[("bf16", seed)] == crcs[("fp8-tensorwise", seed)] and len(crcs[("bf16", seed)]) == 12
    assert digests[("bf16", 0)] != digests[("bf16", 1)] and crcs[("bf16", 0)] != crcs[("bf16", 1)]
    assert summary["checks"]["same_init"] is True and summary["checks"]["same_data"] is True
    # Two seeds: the band is measured from BF16's spread, and 12 steps are too few for a verdict.
    assert "over 2 seeds" in summary["noise"]["how"] and len(summary["noise"]["bf16_losses"]) == 2
    bf16, fp8 = summary["results"]
    assert bf16["verdict"] == "baseline" and fp8["verdict"] == "inconclusive" and "too few" in fp8["verdict_detail"]
    evals = [[row["final_eval_loss"] for row in r["runs"]] for r in (bf16, fp8)]
    assert fp8["loss_gap"] == pytest.approx(sum(b - a for a, b in zip(*evals)) / 2)
    assert fp8["speedup_vs_bf16"] == pytest.approx(fp8["tokens_per_s"] / bf16["tokens_per_s"])
    assert fp8["emulated"] is True and summary["environment"]["emulated"] is True
    # The report, with the table and its embedded plots.
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) == 4
    assert "inconclusive" in (out / "report.md").read_text()
    assert "fp8-tensorwise" in proc.stdout and "report:" in proc.stdout


def test_a_rerun_with_other_settings_is_refused_and_damages_nothing(compared, tiny_data, capsys):
    out, _ = compared
    before = tree_digest(out)
    assert main([*compare_args(tiny_data, out, "--optim.lr=1e-2"), "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "choose a new --out" in err
    assert tree_digest(out) == before


def test_the_same_command_again_keeps_finished_runs(compared, tiny_data):
    out, _ = compared
    before = json.loads((out / "summary.json").read_text())
    proc = run_cli([*compare_args(tiny_data, out), "--seeds", "2"], cache=out.parent / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("completed earlier, kept") == 4 and "training ->" not in proc.stdout
    after = json.loads((out / "summary.json").read_text())
    assert after["results"] == before["results"]


def _without_timing(summary: dict) -> dict:
    """The summary less what depends on the clock or the output path."""
    timing = {"tokens_per_s", "speedup_vs_bf16", "mem_peak_gb", "run_dir", "created", "command", "out"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in timing}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(summary)


def test_a_killed_comparison_resumes_to_the_same_summary(compared, tiny_data, tmp_path):
    out = tmp_path / "C"
    args = [sys.executable, "-m", "fp8lab", *compare_args(tiny_data, out), "--seeds", "2"]
    env = cli_env(tmp_path / "cache")
    # Every run is killed with SIGKILL after step 6 (as the OOM killer would; its step-4
    # checkpoint is on disk): each is a failed row, the comparison still reports, exit 1.
    killed = subprocess.run(args, env=env | {"FP8LAB_KILL_AT": "step-end@6"}, cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == 1, killed.stdout[-2000:] + killed.stderr[-2000:]
    first = json.loads((out / "summary.json").read_text())
    assert [r["verdict"] for r in first["results"]] == ["failed", "failed"]
    assert all("killed by signal SIGKILL" in run["reason"] for r in first["results"] for run in r["runs"])
    resumed = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for run in ("bf16-seed0", "fp8-tensorwise-seed1"):
        events = read_jsonl(out / "runs" / run / "events.jsonl")
        assert any(e["kind"] == "resume" and e["step"] == 4 for e in events)  # resumed, not restarted
    reference = json.loads((compared[0] / "summary.json").read_text())
    assert _without_timing(json.loads((out / "summary.json").read_text())) == _without_timing(reference)


def test_an_interrupted_comparison_stops_and_says_how_to_resume(tiny_data, tmp_path):
    """SIGTERM (a scheduler, a closed terminal) is the user stopping it, not a failed run."""
    out = tmp_path / "C"
    args = [sys.executable, "-m", "fp8lab", *compare_args(tiny_data, out)]
    proc = subprocess.run(args, env=cli_env(tmp_path) | {"FP8LAB_KILL_AT": "step-end@6:TERM"}, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "was interrupted" in proc.stderr and "run the same fp8lab compare command again" in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "runs" / "fp8-tensorwise-seed0").exists()
    again = subprocess.run(args, env=cli_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["runs"][0]["steps"] for r in json.loads((out / "summary.json").read_text())["results"]] == [12, 12]


@pytest.mark.parametrize("fallback", [False, True])
def test_unsupported_and_diverged_recipes_are_rows_not_crashes(tiny_data, tmp_path, fallback):
    out = tmp_path / "C"
    # emulate=off: no FP8 on this CPU; the spike drill makes the bf16 run diverge. With
    # --allow-fallback the guard rolls back (bf16 is the last rung: it skips the data) and
    # the run finishes, still judged diverged.
    args = compare_args(tiny_data, out, "--precision.emulate=off", "--debug.inject_spike_at_step=14",
                        "--debug.inject_spike_factor=20", *(["--allow-fallback"] if fallback else []),
                        budget=["--train.steps=16"])
    proc = run_cli(args, cache=tmp_path / "cache", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bf16, fp8 = json.loads((out / "summary.json").read_text())["results"]
    assert fp8["verdict"] == "unsupported" and "precision.emulate" in fp8["reason"]
    assert not (out / "runs" / "fp8-tensorwise-seed0").exists()
    assert bf16["verdict"] == "diverged" and bf16["status"] == "diverged"
    assert bf16["divergence_events"][0]["step"] == 14
    run = bf16["runs"][0]
    if fallback:
        assert run["status"] == "completed" and run["rollbacks"] == 1 and "rollback" in bf16["verdict_detail"]
    else:
        assert run["status"] == "stopped-by-guard" and "step 14" in bf16["verdict_detail"]
        assert "the guard stopped the run" in run["reason"]
    assert (out / "report.html").is_file()
    # The guard mode is part of the comparison: a rerun the other way is refused.
    other = run_cli([a for a in args if a != "--allow-fallback"] + ([] if fallback else ["--allow-fallback"]),
                    cache=tmp_path / "cache")
    assert other.returncode == 2 and "--allow-fallback" in other.stderr


@pytest.mark.parametrize("args, message", [
    (["--recipes", "bf16,fp9"], "unknown recipe(s) fp9"),
    (["--recipes", "fp8-tensorwise"], "must include bf16"),
    (["--recipes", "bf16,bf16"], "names a recipe twice"),
    (["--seeds", "0"], "--seeds 0"),
    (["--band", "-1"], "--band -1"),
    (["--tokens", "10"], "less than one step"),
    (["--train.stepz=3"], "train.stepz"),
    (["--parallel.data_parallel=fsdp"], "compare trains one process per run"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, args, message, capsys):
    out = tmp_path / "C"
    assert main(["compare", "--out", str(out), *tiny_args(), *args]) == 2  # in this process: nothing runs
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unrelated_directory_is_not_used_as_out(tmp_path, capsys):
    out = tmp_path / "C"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["compare", "--out", str(out), "--recipes", "bf16", *tiny_args()]) == 2
    assert "holds no fp8lab comparison" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_show_prints_a_comparison(compared, capsys):
    out, _ = compared
    assert main(["show", str(out)]) == 0
    said = capsys.readouterr().out
    assert "inconclusive" in said and "baseline" in said and f"report: {out / 'report.html'}" in said
