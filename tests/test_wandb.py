"""The optional Weights & Biases sink, offline (no account, no network): the run logs its steps
against fp8lab's step, and a resumed run continues the same W&B run. Skipped where the
`fp8lab[wandb]` extra is not installed (it is not part of the test stack)."""

from __future__ import annotations

import json

import pytest

from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import train
from helpers import trainer_config


def history(path) -> list[dict]:
    """The `history` records (what run.log() logged) of a W&B .wandb file: LevelDB-log framing
    (32 KiB blocks, records of 4-byte checksum, 2-byte length, 1-byte type) after a 7-byte W&B
    header, each payload one protobuf Record. Read here because wandb 0.31 ships no reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, payload, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a fragmented record
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def test_offline_run_logs_every_step_and_a_resume_continues_it(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install 'fp8lab[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "R"
    cfg = {"logging.wandb": "true", "checkpoint.interval": 2}
    train(trainer_config(tiny_data, **cfg, **{"train.steps": 4}), run)
    run_id = (run / "wandb_id").read_text().strip()
    first = [p for p in (run / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(first) == 1 and first[0].name.endswith(run_id)
    train(trainer_config(tiny_data, **cfg, **{"train.steps": 6}), run)  # resumes at step 4
    assert (run / "wandb_id").read_text().strip() == run_id  # the same W&B run, continued
    runs = sorted(p for p in (run / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)
    logged = [h for r in runs for h in history(next(r.glob("run-*.wandb")))]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5, 6] == [m["step"] for m in metrics]
    assert [h["loss"] for h in logged] == pytest.approx([m["loss"] for m in metrics])


def test_missing_package_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    """Refused before the run directory is made (the import is hidden where wandb is installed)."""
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    from fp8lab.errors import FP8LabError

    with pytest.raises(FP8LabError, match=r"pip install 'fp8lab\[wandb\]'"):
        train(trainer_config(tiny_data, **{"logging.wandb": "true"}), tmp_path / "R")
    assert not (tmp_path / "R").exists()
