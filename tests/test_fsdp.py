"""FSDP2 data parallelism over torchrun, on CPU with gloo: two ranks with micro-batch B train
what one process with 2B trains, FP8 all-gather changes nothing numerically, a killed run
resumes from its sharded DCP checkpoint to the same end, and misuse is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fp8lab.data import write_dataset
from fp8lab.train.logs import read_jsonl
from helpers import REPO, SEQ_LEN, cli_env, markov_tokens, run_cli, tiny_args

BASE = dict(train__steps=6, train__eval_interval=0, train__eval_batches=2, checkpoint__interval=3,
            logging__log_interval=1)


def torchrun(args: list[str], *, cache, env_extra: dict | None = None, ranks: int = 2,
             cwd=REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "fp8lab", "train", *map(str, args), "--parallel.data_parallel=fsdp"]
    env = cli_env(cache) | {"OMP_NUM_THREADS": "1"} | (env_extra or {})
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def losses(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One process with micro-batch 8, and two ranks with 4 each, in fp32 and emulated
    fp8-tensorwise (with and without FP8 all-gather). The fp32 pair runs the fused loss head in
    chunks: under FSDP2 it must run inside the root's forward, where the output weight is gathered."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, recipe in (("fp32", "bf16"), ("fp8", "fp8-tensorwise")):
        extra = {"precision__recipe": recipe, "precision__compute_dtype": "fp32" if recipe == "bf16" else "auto"}
        if recipe == "bf16":
            extra |= {"train__loss_head": "fused", "train__loss_chunk_tokens": 48}
        single = root / f"single-{name}"
        proc = run_cli(["train", "--run-dir", single, *tiny_args(data__path=tiny_data, data__micro_batch_size=8,
                                                                 **BASE, **extra)], cache=root / "cache")
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[f"single-{name}"] = single
        gathers = (False, True) if recipe == "fp8-tensorwise" else (False,)
        for ag in gathers:
            run = root / f"fsdp-{name}-ag{int(ag)}"
            proc = torchrun(["--run-dir", str(run), *tiny_args(data__path=tiny_data, data__micro_batch_size=4,
                                                               parallel__float8_all_gather=ag, **BASE, **extra)],
                            cache=root / "cache")
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            out[run.name] = run
    return out


def test_two_ranks_train_what_one_process_with_both_batches_trains(runs):
    single, fsdp = runs["single-fp32"], runs["fsdp-fp32-ag0"]
    assert summary(fsdp)["step"].startswith("loss head fused;") and summary(single)["step"].startswith("loss head fused;")
    assert losses(fsdp) == pytest.approx(losses(single), rel=1e-5)
    assert summary(fsdp)["final_eval_loss"] == pytest.approx(summary(single)["final_eval_loss"], rel=1e-5)
    # Throughput and tokens count both ranks' batches.
    recs = read_jsonl(fsdp / "metrics.jsonl")
    assert recs[-1]["tokens"] == 6 * 8 * 32
    # Rank 0 alone wrote the run's files: one line per step, one summary.
    assert [r["step"] for r in recs] == list(range(1, 7))


def test_fp8_all_gather_changes_nothing_numerically(runs):
    plain, gathered = runs["fsdp-fp8-ag0"], runs["fsdp-fp8-ag1"]
    assert losses(gathered) == pytest.approx(losses(plain), rel=1e-6)
    assert losses(gathered) == pytest.approx(losses(runs["single-fp8"]), rel=1e-4)
    assert summary(gathered)["recipe"] == "fp8-tensorwise" and summary(gathered)["conversion"]["num_converted"] > 0
    # The flag really changed how the weights are gathered (equal losses alone would not show it).
    converted = summary(gathered)["conversion"]["num_converted"]
    assert summary(gathered)["parallel"]["fp8_gathered_weights"] == converted
    assert summary(plain)["parallel"]["fp8_gathered_weights"] == 0


def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint_to_the_same_end(runs, tiny_data, tmp_path):
    run = tmp_path / "R"
    args = ["--run-dir", str(run), *tiny_args(data__path=tiny_data, data__micro_batch_size=4,
                                              precision__recipe="fp8-tensorwise", parallel__float8_all_gather=True,
                                              **BASE)]
    killed = torchrun(args, cache=tmp_path / "cache", env_extra={"FP8LAB_KILL_AT": "step-end@5"})
    assert killed.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]
    resumed = torchrun(args, cache=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert any(e["kind"] == "resume" and e["step"] == 3 for e in read_jsonl(run / "events.jsonl"))
    assert losses(run) == pytest.approx(losses(runs["fsdp-fp8-ag1"]), rel=1e-6)
    # A resume on another rank count: tests/test_fsdp_scale.py.


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(runs, tiny_data, tmp_path):
    """SIGTERM reaches rank 1 only, after step 1: the request rides on step 2's loss all-reduce,
    so both ranks save step 2 together and stop (exit 75); the same command resumes to the end
    of the uninterrupted run."""
    run = tmp_path / "R"
    args = ["--run-dir", str(run), *tiny_args(data__path=tiny_data, data__micro_batch_size=4,
                                              precision__recipe="bf16", precision__compute_dtype="fp32", **BASE)]
    stopped = torchrun(args, cache=tmp_path / "cache",
                       env_extra={"FP8LAB_KILL_AT": "step-end@1:TERM", "FP8LAB_KILL_RANK": "1"})
    assert stopped.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    said = stopped.stdout + stopped.stderr
    assert "stopped (rank 0)" in said and "stopped (rank 1)" in said and "stopped after step 2" in said
    assert [e["step"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "preempted"] == [2]
    resumed = torchrun(args, cache=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == pytest.approx(losses(runs["fsdp-fp32-ag0"]), rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--parallel.float8_all_gather=true"], "needs parallel.data_parallel=fsdp"),
    (["--parallel.data_parallel=fsdp", "--parallel.float8_all_gather=true", "--precision.recipe=fp8-rowwise"],
     "tensorwise scaling only"),
    (["--parallel.data_parallel=fsdp"], "needs torchrun"),
    (["--parallel.data_parallel=fsdp", "--logging.telemetry_interval=2"], "do not work with"),
])
def test_misuse_is_a_clear_error(tiny_data, tmp_path, args, message):
    proc = run_cli(["train", "--run-dir", tmp_path / "R", *tiny_args(data__path=tiny_data), *args],
                   cache=tmp_path / "cache")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "R").exists()


def test_padding_is_averaged_over_all_ranks_tokens_and_ranks_share_the_default_run_dir(tmp_path):
    """With padding, ranks hold different numbers of loss tokens: the loss and gradients must
    still be the global batch's (normalised by all ranks' tokens), as one process computes them.
    Without --run-dir every rank uses rank 0's directory."""
    rng = np.random.default_rng(7)
    rows = markov_tokens(rng, 96, SEQ_LEN + 1, 63)
    for r, cut in zip(rows, rng.integers(4, SEQ_LEN, size=len(rows))):
        r[cut:] = 63  # the pad id
    data = write_dataset(tmp_path / "padded", train=[rows[:80]], val=[rows[80:]], seq_len=SEQ_LEN, vocab_size=64,
                         eos_id=None, pad_id=63, tokenizer={"type": "test"}, sources=[])
    args = tiny_args(data__path=data, train__steps=3, train__eval_batches=1, precision__compute_dtype="fp32",
                     checkpoint__interval=0)
    single = run_cli(["train", "--run-dir", tmp_path / "one", *args, "--data.micro_batch_size=8"],
                     cache=tmp_path / "cache")
    assert single.returncode == 0, single.stderr[-2000:]
    (tmp_path / "cwd").mkdir()
    two = torchrun([*args, "--data.micro_batch_size=4"], cache=tmp_path / "cache", cwd=tmp_path / "cwd")
    assert two.returncode == 0, two.stderr[-3000:]
    made = list((tmp_path / "cwd" / "runs").iterdir())
    assert len(made) == 1  # one directory for both ranks
    one_recs, two_recs = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(made[0] / "metrics.jsonl")
    assert [r["loss"] for r in two_recs] == pytest.approx([r["loss"] for r in one_recs], rel=1e-5)
    assert [r["grad_norm"] for r in two_recs] == pytest.approx([r["grad_norm"] for r in one_recs], rel=1e-5)


def test_a_guard_fallback_under_fsdp_resumes_with_the_original_command(tiny_data, tmp_path):
    """A spike rolls the run back from fp8-tensorwise (FP8 all-gather on) to fp8-rowwise (which
    has none); the same command then resumes it on rowwise instead of refusing the flag."""
    run = tmp_path / "R"
    args = ["--run-dir", run, *tiny_args(data__path=tiny_data, data__micro_batch_size=4, train__steps=18,
                                         precision__recipe="fp8-tensorwise", parallel__float8_all_gather=True,
                                         checkpoint__interval=4, debug__inject_spike_at_step=14,
                                         debug__inject_spike_factor=20)]
    first = torchrun([*args, "--debug.stop_at_step=16"], cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    events = read_jsonl(run / "events.jsonl")
    assert [e["kind"] for e in events if e["kind"] in ("alarm", "rollback")] == ["alarm", "rollback"]
    resumed = torchrun(args, cache=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = summary(run)
    assert s["recipe"] == "fp8-rowwise" and s["steps"] == 18 and s["parallel"]["fp8_gathered_weights"] == 0


def test_fp8_all_gather_refuses_shards_torchao_cannot_gather(tiny_data, tmp_path):
    proc = torchrun(["--run-dir", tmp_path / "R", *tiny_args(data__path=tiny_data, data__micro_batch_size=2,
                                                            precision__recipe="fp8-tensorwise",
                                                            parallel__float8_all_gather=True)],
                    cache=tmp_path / "cache", ranks=3)
    assert proc.returncode != 0
    assert "not a multiple of the 3 ranks" in proc.stdout + proc.stderr


def test_bf16_gathers_in_bf16_and_keeps_fp32_masters(tiny_data, tmp_path):
    """With bf16 compute, FSDP2 gathers the weights in bf16 and reduces the gradients in fp32
    (MixedPrecisionPolicy, as torchtitan does): the losses follow the one-process bf16-autocast
    run closely (norms and embeddings now run in bf16 too), and checkpoints hold fp32 masters."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    args = tiny_args(data__path=tiny_data, precision__compute_dtype="bf16", **BASE)  # bf16 on any CPU (tiny)
    single = run_cli(["train", "--run-dir", tmp_path / "one", *args, "--data.micro_batch_size=8"],
                     cache=tmp_path / "cache")
    assert single.returncode == 0, single.stderr[-2000:]
    two = torchrun(["--run-dir", tmp_path / "two", *args, "--data.micro_batch_size=4"], cache=tmp_path / "cache")
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=5e-3)
    assert summary(tmp_path / "two")["compute_dtype"] == "bfloat16"
    meta = FileSystemReader(tmp_path / "two" / "checkpoints" / "step-3" / "dcp").read_metadata()
    dtypes = {m.properties.dtype for k, m in meta.state_dict_metadata.items() if k.startswith("model.")}
    assert dtypes == {torch.float32}
