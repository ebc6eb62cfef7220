"""FSDP2 at scale, on CPU with gloo: the meta-device build starts from the weights one process
starts from (bit for bit), accumulation reduces once per step and still trains what the
per-micro-batch reduction trained, HSDP (2 x 2) trains and resumes, and a checkpoint written
on 2 ranks resumes on 1 and on 3 at the same place in the data.

Five torchrun launches in all (each pays the start-up of every process; the one-rank resume
runs in this process); the model is 96 wide
so that every converted weight divides by 2, 3 and 4 ranks (FP8 all-gather needs even shards),
and one sequence per micro-batch, so that every rank count computes each sequence alone
(tensorwise FP8 scales its activations per micro-batch) and only the sums' order differs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_fsdp import losses, summary, torchrun

from fp8lab.config import load_config
from fp8lab.data import TokenLoader, open_dataset
from fp8lab.data.loader import reshard_state
from fp8lab.errors import FP8LabError
from fp8lab.models import ModelArgs, Transformer
from fp8lab.train.build import shard_count
from fp8lab.train.dist import DistEnv
from fp8lab.train.fingerprint import batch_crc, weights_digest
from fp8lab.train.logs import read_jsonl
from fp8lab.train.rng import capture_rng, seed_everything
from helpers import tiny_args

STEPS = 4
# fp8-tensorwise with FP8 all-gather (what FSDP2 gathers in FP8 must survive no-sync and HSDP).
RUN = dict(model__dim=96, model__ffn_dim=192, data__micro_batch_size=1, train__steps=STEPS, train__eval_interval=0,
           train__eval_batches=1, checkpoint__interval=1, checkpoint__keep=10, logging__log_interval=1,
           logging__fingerprint="true", precision__recipe="fp8-tensorwise", parallel__float8_all_gather="true")


def state(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tiny_data, tmp_path_factory):
    """2 ranks x 1 sequence x 2 micro-batches, reducing once per step (the default) and once
    per micro-batch (the old path), checkpointed every step."""
    root = tmp_path_factory.mktemp("scale")
    out = {"root": root}
    for name, extra in (("nosync", []), ("every", ["--parallel.reduce_every_micro_batch=true"])):
        run = root / name
        proc = torchrun(["--run-dir", run, *tiny_args(data__path=tiny_data, train__grad_accum_steps=2, **RUN), *extra],
                        cache=root / "cache")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out[name] = run
    return out


def test_meta_init_on_two_ranks_equals_one_process_bit_for_bit(two_ranks):
    """No rank built the whole model, yet the initial weights hash like a plain one-process build's
    (the same draws from the same seed, after the same layer constructors' draws)."""
    run = two_ranks["nosync"]
    with torch.random.fork_rng():
        seed_everything(load_config(run / "config.toml").train.seed)
        plain = Transformer(ModelArgs.from_dict(state(run, 1)["model_args"]))
        after = capture_rng()["torch"]
    assert summary(run)["init_digest"] == weights_digest(plain)
    # The generator ends where a plain build leaves it (nothing in training draws from it), so
    # whatever is drawn later matches a one-process run's too.
    assert {state(run, s)["rng"]["torch"] for s in range(1, STEPS + 1)} == {after}


def test_accumulating_without_a_reduce_per_micro_batch_trains_what_the_old_path_trains(two_ranks):
    nosync, every = two_ranks["nosync"], two_ranks["every"]
    assert losses(nosync) == pytest.approx(losses(every), rel=1e-6)
    assert len(losses(nosync)) == STEPS
    for run in (nosync, every):  # FP8 all-gather stays on, for every converted weight
        s = summary(run)
        assert s["parallel"]["fp8_gathered_weights"] == s["conversion"]["num_converted"] > 0


def test_hsdp_two_by_two_trains_and_resumes(two_ranks, tiny_data, tmp_path):
    """4 processes as 2 replicas x 2 shards: each rank takes one sequence per step, so a step
    trains the 4 sequences the 2-rank runs train in 2 micro-batches; stopped after step 2 and
    resumed, it ends where they end."""
    run = tmp_path / "hsdp"
    args = ["--run-dir", run, *tiny_args(data__path=tiny_data, parallel__replicate=2, **RUN)]
    first = torchrun([*args, "--debug.stop_at_step=2"], cache=tmp_path / "cache", ranks=4)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    resumed = torchrun(args, cache=tmp_path / "cache", ranks=4)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert any(e["kind"] == "resume" and e["step"] == 2 for e in read_jsonl(run / "events.jsonl"))
    assert losses(run) == pytest.approx(losses(two_ranks["nosync"]), rel=1e-6)
    assert summary(run)["init_digest"] == summary(two_ranks["nosync"])["init_digest"]  # meta init on 4 as well
    assert summary(run)["parallel"]["fp8_gathered_weights"] > 0


def _copy_until(src, dst, step: int):
    """The run directory `src` as it was after checkpoint `step` (later checkpoints removed)."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)


def _rank_batches(run, world: int, position: int, count: int) -> list[list[tuple]]:
    """Per rank, the `count` micro-batches from `position` on, of loaders like `run`'s on `world` ranks."""
    cfg = load_config(run / "config.toml")
    split = open_dataset(cfg.data.path).split("train")
    out = []
    for r in range(world):
        loader = TokenLoader(split, batch_size=cfg.data.micro_batch_size, seed=cfg.data.seed, rank=r, world_size=world)
        loader.load_state_dict({"epoch": 0, "position": position})
        out.append([loader.next_batch() for _ in range(count)])
    return out


def _resume_on_one_rank_here(run, data, monkeypatch) -> None:
    """The trainer as `torchrun --nproc_per_node=1` runs it, in this process (a one-rank gloo
    group, then left again): a launch would cost ~15 s of start-up for one rank."""
    import socket

    import torch.distributed as dist

    from fp8lab.train.trainer import train
    from helpers import tiny_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:  # train.threads is resumable: this process keeps its own count
        train(tiny_config(data, train__grad_accum_steps=2, parallel__data_parallel="fsdp", **RUN), run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_two_rank_checkpoint_resumes_on_another_rank_count_at_the_same_data_position(
        two_ranks, tiny_data, tmp_path, monkeypatch, ranks):
    """Step 3 of the 2-rank run has served 3 steps x 2 micro-batches x 2 ranks = 12 sequences:
    DCP reshards the weights and optimizer state, and the data position becomes 12 sequences
    in this run's global batches of `ranks` (12 / 1, 12 / 3). The first resumed step trains on
    the sequences the 2-rank run went on to serve, in the same order."""
    run = tmp_path / "R"
    _copy_until(two_ranks["nosync"], run, 3)
    if ranks == 1:
        _resume_on_one_rank_here(run, tiny_data, monkeypatch)
    else:
        proc = torchrun(["--run-dir", run, *tiny_args(data__path=tiny_data, train__grad_accum_steps=2, **RUN)],
                        cache=tmp_path / "cache", ranks=ranks)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert any(e["kind"] == "resume" and e["step"] == 3 for e in read_jsonl(run / "events.jsonl"))
    assert state(run, 4)["world_size"] == ranks
    assert state(run, 4)["data"] == {"epoch": 0, "position": 12 // ranks + 2}
    # Uninterrupted, the 2 ranks serve sequence 12 + i as rank i % 2's batch at position 6 + i // 2.
    # Resumed on `ranks`, rank 0's step-4 micro-batches are sequences 12 and 12 + ranks.
    two = _rank_batches(run, 2, 6, 2)
    expected = [two[0][0], two[ranks % 2][ranks // 2]]
    step4 = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 4]
    assert step4[-1]["data_crc"] == batch_crc(expected)
    assert summary(run)["init_digest"] == summary(two_ranks["nosync"])["init_digest"]


def test_the_sequences_of_a_global_batch_do_not_depend_on_the_rank_count(tiny_data):
    """The rule a resharding resume stands on: with the same global batch (6 = 1 x 6 = 2 x 3 =
    3 x 2), every position serves the same sequences, and an epoch holds the same positions;
    one process's batches are those of before (perm[p*B:(p+1)*B])."""
    split = open_dataset(tiny_data).split("train")
    served = {}
    for world, batch in ((1, 6), (2, 3), (3, 2)):
        loaders = [TokenLoader(split, batch_size=batch, seed=5, rank=r, world_size=world) for r in range(world)]
        assert {lo.batches_per_epoch for lo in loaders} == {len(split) // 6}
        steps = []
        for _ in range(loaders[0].batches_per_epoch + 2):  # into the next epoch
            rows = torch.cat([lo.next_batch()[0] for lo in loaders])
            steps.append(sorted(map(tuple, rows.tolist())))
        served[world] = steps
    assert served[1] == served[2] == served[3]
    perm = np.random.default_rng([5, 0]).permutation(len(split))
    one = TokenLoader(split, batch_size=6, seed=5)
    one.next_batch()
    assert torch.equal(one.next_batch()[0], torch.from_numpy(split.take(perm[6:12])[:, :-1].astype(np.int64)))


def test_the_data_position_converts_through_sequences_served_or_is_refused(tiny_data):
    split = open_dataset(tiny_data).split("train")
    three = TokenLoader(split, batch_size=2, seed=0, rank=0, world_size=3)  # global batch 6
    assert reshard_state({"epoch": 2, "position": 9}, global_batch=4, to=three) == {"epoch": 2, "position": 6}
    assert reshard_state({"epoch": 1, "position": 5}, global_batch=6, to=three) == {"epoch": 1, "position": 5}
    # 512 sequences: an epoch of 128 batches of 4 ends where one of 85 batches of 6 does (2 dropped).
    assert reshard_state({"epoch": 0, "position": 128}, global_batch=4, to=three) == {"epoch": 0, "position": 85}
    with pytest.raises(FP8LabError, match=r"\(28 sequences into epoch 0, in global batches of 4\) is not a whole "
                                          r"number of this run's global batches of 6 \(micro_batch_size 2 x 3"):
        reshard_state({"epoch": 0, "position": 7}, global_batch=4, to=three)


def test_hsdp_settings_are_checked():
    with pytest.raises(FP8LabError, match="parallel.replicate=0 must be an integer >= 1"):
        load_config(None, {"parallel.replicate": "0", "parallel.data_parallel": "fsdp"})
    with pytest.raises(FP8LabError, match="parallel.replicate=2 needs parallel.data_parallel=fsdp"):
        load_config(None, {"parallel.replicate": "2"})
    assert shard_count(DistEnv(0, 8), 2) == 4
    with pytest.raises(FP8LabError, match="parallel.replicate=3 does not divide the 8 ranks"):
        shard_count(DistEnv(0, 8), 3)
