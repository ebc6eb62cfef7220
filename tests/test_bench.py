"""fp8lab bench on CPU: the result's structure and arithmetic, unsupported and failed recipes,
bad input, --layers against the model's own linears, --random-data. Speeds are never
asserted (a shared 2-core machine is no stopwatch); what they are computed from is."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
from torch import nn

from fp8lab.bench.step_bench import EMULATED_SPEED_NOTE, failure_reason, random_dataset
from fp8lab.cli import main
from fp8lab.env import cpu_has_native_bf16
from fp8lab.precision.support import EMULATION_NOTE
from helpers import SEQ_LEN, TINY, run_cli, tiny_args, tiny_config

STEPS, WARMUP = 3, 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, cache, tiny_data):
    """One tiny bench of bf16 vs fp8-tensorwise with --layers: (completed process, out dir)."""
    out = tmp_path_factory.mktemp("bench-out")
    proc = run_cli(["bench", "--recipes", "bf16,fp8-tensorwise", "--steps", STEPS, "--warmup", WARMUP, "--layers",
                    "--json", "--out", out / "r.json", "--md", out / "r.md",
                    *tiny_args(data__path=tiny_data)], cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_json_alone_on_stdout_and_in_the_out_file(bench):
    proc, out = bench
    result = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert json.loads((out / "r.json").read_text()) == result
    md = (out / "r.md").read_text()
    baseline = result["recipes"][0]["label"]  # "bf16", or what ran instead on a CPU without native bf16
    assert f"| {baseline} | ok |" in md and "| fp8-tensorwise | ok |" in md and "bf16/recipe" in md
    assert "| 7/8: wq wk wv wo w1 w2 w3 |" in md  # FP8 linears: every block linear, not the output
    # the step's switches as they resolved on this CPU (train.loss_head=auto: plain; fused AdamW)
    assert f"- {baseline} step: loss head plain; fused AdamW; loss and norm read after the optimizer" in md


def test_every_timed_step_counted_and_the_figures_follow_from_them(bench):
    r = json.loads(bench[0].stdout)
    mb = int(TINY["data.micro_batch_size"])
    assert r["tokens_per_step"] == mb * SEQ_LEN and r["timed_steps"] == STEPS and r["warmup_steps"] == WARMUP
    assert [x["recipe"] for x in r["recipes"]] == ["bf16", "fp8-tensorwise"]
    for row in r["recipes"]:
        assert row["status"] == "ok" and row["reason"] is None
        times = row["step_times_s"]
        assert row["steps"] == len(times) == STEPS and all(t > 0 for t in times)
        assert row["step_time_s"] == pytest.approx(statistics.median(times))
        assert row["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / row["step_time_s"])
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["tflops"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
        assert row["mfu"] is None and row["mfu_peak_tflops"] is None  # no peak for a CPU
        assert row["startup_s"] >= row["build_s"] > 0 and row["mem_peak_gb"] > 0
        assert row["loss_last"] is not None and row["skipped_steps"] == 0
        assert row["device"] == r["device"] == "cpu"
    bf16, fp8 = r["recipes"]
    assert bf16["params"] == fp8["params"] == r["params"]  # the same model
    assert bf16["speedup_vs_bf16"] == 1.0
    assert fp8["speedup_vs_bf16"] == pytest.approx(fp8["tokens_per_s"] / bf16["tokens_per_s"])
    assert bf16["converted"] == 0 and fp8["converted"] > 0
    out = fp8["fp8_linears"][-1]  # the output layer, skipped by precision.skip_modules; listed last
    assert out["name"] == "output" and (out["converted"], out["total"]) == (0, 1) and "skip_modules" in out["skipped"]


def test_emulated_rows_say_so_loudly(bench):
    r = json.loads(bench[0].stdout)
    bf16, fp8 = r["recipes"]
    assert fp8["emulated"] and EMULATION_NOTE in fp8["notes"] and fp8["compute_dtype"] == "float32"
    native = cpu_has_native_bf16()  # bf16 autocast where native; fp32 where it would be emulated
    assert not bf16["emulated"] and bf16["compute_dtype"] == ("bfloat16" if native else "float32")
    assert bf16["label"] == ("bf16" if native else "fp32 (bf16 recipe on a CPU without native bf16)")
    assert EMULATED_SPEED_NOTE in r["notes"]
    assert "fp8-tensorwise: build" in bench[0].stderr  # progress goes to stderr under --json


def test_layers_are_the_models_distinct_linear_shapes(bench, tiny_data):
    from fp8lab.train.build import build

    r = json.loads(bench[0].stdout)
    model = build(tiny_config(tiny_data)).model
    want = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    rows = r["layers"]["rows"]
    assert {row["recipe"] for row in rows} == {"fp8-tensorwise"}  # bf16 has nothing to compare with
    assert {(row["k"], row["n"]): row["count"] for row in rows} == dict(want)
    assert len(rows) == len(want)  # one row per distinct shape
    m = int(TINY["data.micro_batch_size"]) * SEQ_LEN
    for row in rows:
        assert row["m"] == m and "error" not in row
        assert row["ratio"] == pytest.approx(row["bf16_ms"] / row["recipe_ms"])
    names = {n for row in rows for n in row["names"]}
    assert names == {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w2", "feed_forward.w3", "output"}
    # the output head is skipped by precision.skip_modules; everything else converts
    assert sum(row["converted"] for row in rows) == sum(want.values()) - 1
    assert "forward + backward" in r["layers"]["what"]


def test_unsupported_recipe_is_a_row_and_bf16_still_runs(cache, tiny_data):
    proc = run_cli(["bench", "--recipes", "bf16,fp8-tensorwise,fp8-rowwise", "--steps", 2, "--warmup", 0, "--json",
                    "--precision.emulate=off", *tiny_args(data__path=tiny_data)], cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {x["recipe"]: x for x in json.loads(proc.stdout)["recipes"]}
    assert rows["bf16"]["status"] == "ok" and rows["bf16"]["steps"] == 2
    for name in ("fp8-tensorwise", "fp8-rowwise"):
        assert rows[name]["status"] == "unsupported"
        assert name in rows[name]["reason"] and "no native CPU kernels" in rows[name]["reason"]


def test_a_failed_recipe_is_a_row_with_the_reason_and_exit_1(cache, tiny_data):
    # A real failure, no mocks: a worker cannot even import torch in 0.2 s.
    proc = run_cli(["bench", "--recipes", "bf16", "--timeout", "0.2", "--json", *tiny_args(data__path=tiny_data)],
                   cache=cache)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)["recipes"]
    assert row["status"] == "failed" and "timed out after 0.2 s" in row["reason"]


def test_failure_reason_is_the_last_error_line():
    log = "step 1\nTraceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n" \
          "[W shutdown] noise\n"
    assert failure_reason(1, log, None) == "exit code 1: torch.OutOfMemoryError: CUDA out of memory."
    assert failure_reason(2, "fp8lab: error: bad\n", None) == "exit code 2: fp8lab: error: bad"
    assert "SIGKILL" in failure_reason(-9, "", None)


def test_unknown_recipe_exits_2_naming_it(capsys, tmp_path):
    assert main(["bench", "--recipes", "bf16,fp9-magic", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "fp9-magic" in err and "fp8-rowwise" in err  # the name, and the known ones
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args,needle", [(["--steps", "0"], "--steps 0"), (["--warmup", "-1"], "--warmup -1"),
                                         (["--timeout", "0"], "--timeout"),
                                         (["--precision.recipe=bf16"], "--recipes"),
                                         (["--train.nope=1"], "train.nope")])
def test_bad_flags_exit_2_naming_them(capsys, args, needle):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8lab: error: ") and needle in err


def test_random_data_runs_without_a_data_set_and_vs_plain_beside_it(cache):
    # --vs-plain rides along (one bench process fewer in the suite): tests/test_plain_loop.py has the rest
    proc = run_cli(["bench", "--recipes", "bf16", "--steps", 1, "--warmup", 0, "--random-data", "--json",
                    "--vs-plain", *tiny_args()], cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    (row,) = r["recipes"]
    assert row["status"] == "ok"
    plain = row["plain"]  # the plain loop's run of the same shapes and batch
    assert plain["status"] == "ok" and plain["tokens_per_step"] == row["tokens_per_step"] == r["tokens_per_step"]
    assert plain["tokens_per_s"] > 0 and row["vs_plain"] == pytest.approx(row["tokens_per_s"] / plain["tokens_per_s"])
    assert row["plain_speedup_vs_bf16"] == 1.0 and row["fp8_linears"] == [] and "bf16: plain loop: " in proc.stderr
    assert r["plain"]["shape"]["dim"] == r["model"]["dim"] and r["plain"]["shape"]["vocab"] == r["model"]["vocab_size"]
    path = r["overrides"]["data.path"]
    assert path.startswith(str(cache / "bench-data")) and "random-v320-s32-n4" in path  # debug preset's vocab
    assert r["model"]["vocab_size"] == 320


def test_random_dataset_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8LAB_CACHE", str(tmp_path))
    a = random_dataset(vocab=100, seq_len=8, count=4)
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert random_dataset(vocab=100, seq_len=8, count=4) == a
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    assert random_dataset(vocab=100, seq_len=8, count=8) != a  # keyed by count
