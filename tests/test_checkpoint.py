"""The checkpoint format: layout, atomicity, retention, and that loading cannot run code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from fp8lab.errors import FP8LabError
from fp8lab.models import Transformer
from fp8lab.train.build import build
from fp8lab.train.checkpoint import (
    MARKER,
    list_complete,
    load_model_weights,
    prune,
    read_state,
)
from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import train
from helpers import trainer_config


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-run")
    train(trainer_config(tiny_data, **{"train.steps": 4, "checkpoint.interval": 1, "checkpoint.keep": 2,
                                    "precision.recipe": "fp8-rowwise"}), path)
    return path


def test_layout_and_retention(run):
    steps = [s for s, _ in list_complete(run)]
    assert steps == [3, 4]  # keep=2
    ckpt = run / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.iterdir()) == [MARKER, "dcp", "manifest.json", "state.json"]
    state = read_state(ckpt)
    assert state["step"] == 4 and state["recipe"] == "fp8-rowwise"
    assert set(state) >= {"rng", "data", "model_args", "tokens"}
    assert state["data"] == {"epoch": 0, "position": 4}
    json.dumps(state)  # plain JSON all the way down


def test_plain_names_load_with_stock_dcp_into_a_plain_model(run, tiny_data):
    """Names are the unconverted model's: torch's own dcp.load fills a plain model."""
    b = build(trainer_config(tiny_data))
    plain = Transformer(b.model_args)
    sd = plain.state_dict()
    reader = FileSystemReader(run / "checkpoints" / "step-4" / "dcp")  # torch's own reader
    dcp.load({"model": sd}, storage_reader=reader, no_dist=True)
    ours = Transformer(b.model_args)
    load_model_weights(run / "checkpoints" / "step-4", ours)
    assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
    torch.manual_seed(0)  # train.seed: the run's initial weights
    init = Transformer(b.model_args).state_dict()
    assert not torch.equal(sd["layers.0.attention.wq.weight"], init["layers.0.attention.wq.weight"])  # trained


def test_incomplete_and_temporary_folders_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-5").mkdir(parents=True)  # no marker: interrupted
    (root / "step-6.tmp-123").mkdir()
    (root / "step-2").mkdir()
    (root / "step-2" / MARKER).write_text("2\n")
    assert list_complete(tmp_path) == [(2, root / "step-2")]
    with pytest.raises(FP8LabError, match="incomplete"):
        read_state(root / "step-5")


def test_prune_never_deletes_the_newest(tmp_path):
    for s in (1, 2, 3):
        d = tmp_path / "checkpoints" / f"step-{s}"
        d.mkdir(parents=True)
        (d / MARKER).write_text(f"{s}\n")
    prune(tmp_path, keep=0)
    assert [s for s, _ in list_complete(tmp_path)] == [3]


def test_metadata_that_would_run_code_is_refused(run, tmp_path):
    """A .metadata pickle that calls os.system must not execute on load."""
    import shutil

    ckpt = tmp_path / "step-4"
    shutil.copytree(run / "checkpoints" / "step-4", ckpt)
    canary = tmp_path / "pwned"
    (ckpt / "dcp" / ".metadata").write_bytes(evil_pickle(canary))
    model = Transformer(read_args(run))
    with pytest.raises(FP8LabError, match="damaged: dcp/.metadata"):
        load_model_weights(ckpt, model)  # caught by the manifest first
    reseal(ckpt)
    with pytest.raises(FP8LabError, match="posix.system|os.system|not allowed"):
        load_model_weights(ckpt, model)
    assert not canary.exists()


def read_args(run):
    from fp8lab.models import ModelArgs

    return ModelArgs(**read_state(run / "checkpoints" / "step-4")["model_args"])


def test_shape_mismatch_is_a_clear_error(run):
    import dataclasses

    args = dataclasses.replace(read_args(run), ffn_dim=256)
    with pytest.raises(FP8LabError, match="could not be loaded"):
        load_model_weights(run / "checkpoints" / "step-4", Transformer(args))


def test_missing_tensor_is_a_clear_error_not_a_base_exception(run):
    """DCP raises CheckpointException (a BaseException); it must surface as FP8LabError."""
    import dataclasses

    args = dataclasses.replace(read_args(run), n_layers=3)  # layers.2.* are not in the checkpoint
    with pytest.raises(FP8LabError, match="could not be loaded"):
        load_model_weights(run / "checkpoints" / "step-4", Transformer(args))


def reseal(ckpt):
    """Rewrite the checkpoint's manifest to match its files, as an attacker who can write
    the folder would: the checks after the manifest must stand on their own."""
    from fp8lab.train.checkpoint import MANIFEST, _file_manifest

    (ckpt / MANIFEST).write_text(json.dumps(_file_manifest(ckpt)))


def _rewrite_metadata(ckpt, change):
    """Load a checkpoint's DCP metadata (trusted here: we wrote it), change it, write it back."""
    path = ckpt / "dcp" / ".metadata"
    with open(path, "rb") as f:
        md = pickle.load(f)
    change(md)
    path.write_bytes(pickle.dumps(md))
    reseal(ckpt)


def test_metadata_that_turns_a_tensor_into_bytes_is_refused(run, tmp_path):
    """DCP loads byte entries with torch.load(weights_only=False): whoever writes .metadata
    could turn a tensor entry into a pickle payload. Byte entries are refused."""
    import shutil

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = tmp_path / "step-4"
    shutil.copytree(run / "checkpoints" / "step-4", ckpt)
    _rewrite_metadata(ckpt, lambda md: md.state_dict_metadata.__setitem__("model.norm.weight",
                                                                          BytesStorageMetadata()))
    with pytest.raises(FP8LabError, match="unreadable DCP metadata.*BytesStorageMetadata"):
        load_model_weights(ckpt, Transformer(read_args(run)))


def test_payload_paths_outside_the_checkpoint_are_refused(run, tmp_path):
    import shutil

    ckpt = tmp_path / "step-4"
    shutil.copytree(run / "checkpoints" / "step-4", ckpt)

    def escape(md):
        for info in md.storage_data.values():
            info.relative_path = "../../elsewhere.distcp"

    _rewrite_metadata(ckpt, escape)
    with pytest.raises(FP8LabError, match="payload path '../../elsewhere.distcp' is not a file inside"):
        load_model_weights(ckpt, Transformer(read_args(run)))


def test_stale_writer_leftovers_are_removed_on_start(run, tiny_data, tmp_path):
    import shutil

    from fp8lab.train.checkpoint import remove_stale

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step-5.tmp-99999" / "dcp").mkdir(parents=True)
    (copy / "checkpoints" / "step-6").mkdir()  # no marker: a half-deleted or half-written one
    assert remove_stale(copy) == ["step-5.tmp-99999", "step-6"]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_a_finished_run_is_not_resaved(run, tiny_data):
    """Re-running a finished run trains nothing and must leave its last checkpoint alone."""
    before = (run / "checkpoints" / "step-4" / "dcp" / ".metadata").stat().st_mtime_ns
    summary = train(trainer_config(tiny_data, **{"train.steps": 4, "checkpoint.interval": 1, "checkpoint.keep": 2,
                                              "precision.recipe": "fp8-rowwise"}), run)
    assert summary["steps"] == 4
    assert (run / "checkpoints" / "step-4" / "dcp" / ".metadata").stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-marker"])
def test_a_damaged_newest_checkpoint_is_reported_and_skipped_on_resume(tiny_data, tmp_path, damage):
    over = {"train.steps": 8, "checkpoint.interval": 2, "checkpoint.keep": 3, "debug.stop_at_step": 6}
    train(trainer_config(tiny_data, **over), tmp_path)
    newest = tmp_path / "checkpoints" / "step-6"
    payload = newest / "dcp" / "__0_0.distcp"
    if damage == "truncate":
        payload.write_bytes(payload.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(payload.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one bit inside a tensor payload: DCP alone would load it silently
        payload.write_bytes(bytes(raw))
    else:
        (newest / MARKER).unlink()
    summary = train(trainer_config(tiny_data, **{**over, "train.steps": 8, "debug.stop_at_step": 0}), tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    resume = [e for e in events if e["kind"] == "resume"][-1]
    assert "step-4" in resume["message"] and summary["steps"] == 8
    if damage == "no-marker":  # an incomplete folder: removed as a killed writer's leftover
        assert any(e["kind"] == "cleanup" and "step-6" in e["message"] for e in events)
    else:
        bad = [e for e in events if e["kind"] == "damaged"]
        assert len(bad) == 1 and "step-6" in bad[0]["message"]
        assert ("truncated" if damage == "truncate" else "sha256") in bad[0]["message"]
        assert (tmp_path / "checkpoints" / "step-6.damaged").is_dir()  # kept for inspection, never loaded


def test_a_pickle_inside_a_tensor_payload_never_runs(run, tmp_path):
    """DCP reads tensor payloads with torch.load(weights_only=True); even with a manifest
    rewritten to match, a pickled payload is refused, and there is no unsafe retry."""
    import shutil

    ckpt = tmp_path / "step-4"
    shutil.copytree(run / "checkpoints" / "step-4", ckpt)
    canary = tmp_path / "pwned"
    payload = ckpt / "dcp" / "__0_0.distcp"
    size = payload.stat().st_size
    evil = evil_pickle(canary)
    payload.write_bytes((evil * (size // len(evil) + 1))[:size])  # same size: every offset now holds a pickle
    reseal(ckpt)
    with pytest.raises(FP8LabError, match="could not be loaded"):
        load_model_weights(ckpt, Transformer(read_args(run)))
    assert not canary.exists()


def test_prune_keeps_the_last_good_checkpoint_whatever_keep_says(tmp_path):
    for s in (2, 4, 6, 8):
        d = tmp_path / "checkpoints" / f"step-{s}"
        d.mkdir(parents=True)
        (d / MARKER).write_text(f"{s}\n")
    (tmp_path / "checkpoints" / "step-10").mkdir()  # incomplete: not counted, not touched by prune
    prune(tmp_path, keep=2, protect=(2,))
    assert [s for s, _ in list_complete(tmp_path)] == [2, 6, 8]
    assert (tmp_path / "checkpoints" / "step-10").is_dir()


def test_rng_and_loader_restore_give_the_same_next_numbers_and_batches(tiny_data):
    import random

    import numpy as np

    from fp8lab.train.rng import capture_rng, restore_rng

    b = build(trainer_config(tiny_data))
    for _ in range(3):
        b.loader.next_batch()
    state, loader_state = capture_rng(), b.loader.state_dict()
    json.loads(json.dumps(state))  # JSON all the way
    first = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
             [b.loader.next_batch() for _ in range(70)])  # 70 > one epoch (64 batches): crosses the boundary
    restore_rng(state)
    fresh = build(trainer_config(tiny_data)).loader
    fresh.load_state_dict(loader_state)
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
             [fresh.next_batch() for _ in range(70)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert all(torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1]) for a, b_ in zip(first[3], again[3]))


def evil_pickle(canary) -> bytes:
    """A pickle that creates `canary` when loaded: proof, if the file appears, that it ran."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    return pickle.dumps(Evil())
