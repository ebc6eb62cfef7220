"""Rollback through the precision ladder, end to end on a real (tiny) run."""

from __future__ import annotations

import json
import math
import tomllib

import pytest

from fp8lab.train.checkpoint import list_complete, read_state
from fp8lab.train.logs import read_jsonl
from fp8lab.train.rollback import GuardStopped
from fp8lab.train.trainer import train
from helpers import trainer_config

# Checkpoints every 4 steps, good after 4 alarm-free steps; the spike is on the data step 14
# trains on, so at step 14 the last good checkpoint is step 8 (step 12 has had only 2 steps).
SPIKE = {"train.steps": 24, "checkpoint.interval": 4, "checkpoint.keep": 3, "guard.good_after_steps": 4,
         "guard.warmup_steps": 5, "guard.skip_steps": 3, "debug.inject_spike_at_step": 14,
         "debug.inject_spike_factor": 8, "precision.recipe": "fp8-tensorwise"}


@pytest.fixture(scope="module")
def rolled(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("rolled")
    return run, train(trainer_config(tiny_data, **SPIKE), run)


def test_spike_rolls_back_to_the_last_good_checkpoint_and_down_the_ladder(rolled):
    run, summary = rolled
    events = read_jsonl(run / "events.jsonl")
    assert [e["kind"] for e in events] == ["alarm", "rollback"]
    assert events[0]["step"] == 14 and events[0]["alarm"] == "spike"
    rb = events[1]
    assert rb["step"] == 14 and rb["rolled_back_to"] == 8 and rb["recipe"] == "fp8-rowwise"
    assert rb["skipped"] == [11, 14]  # the micro-batches of steps 12-14 (3 steps), the spike's included
    assert "recipe fp8-tensorwise -> fp8-rowwise" in rb["message"]
    assert summary["status"] == "completed" and summary["recipe"] == "fp8-rowwise" and summary["rollbacks"] == 1
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])


def test_the_new_timeline_is_what_the_logs_and_checkpoints_hold(rolled):
    run, _ = rolled
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 25))  # each step once: 9-14 were redone
    assert {r["recipe"] for r in recs[:8]} == {"fp8-tensorwise"} and {r["recipe"] for r in recs[8:]} == {"fp8-rowwise"}
    assert all(r["loss"] is not None and r["loss"] < 10 for r in recs)  # the spike is gone with its data
    final = read_state(list_complete(run)[-1][1])
    assert final["recipe"] == "fp8-rowwise" and final["step"] == 24
    assert final["data"]["position"] == 24 + 3  # three micro-batches were passed over
    assert final["skip_windows"] == [[11, 14]] and final["guard"]["rollbacks"] == 1
    # the re-saved rollback target carries the new recipe, under a new revision name
    revision = run / "checkpoints" / "step-8-r1"
    assert not revision.exists() or read_state(revision)["recipe"] == "fp8-rowwise"
    assert tomllib.loads((run / "config.toml").read_text())["precision"]["recipe"] == "fp8-rowwise"


def test_a_crash_after_a_rollback_resumes_the_new_timeline_exactly(rolled, tiny_data, tmp_path):
    run, summary = rolled
    part = tmp_path / "part"
    assert train(trainer_config(tiny_data, **{**SPIKE, "debug.stop_at_step": 18}), part) == {"stopped_at": 18}
    resumed = train(trainer_config(tiny_data, **SPIKE), part)  # the command line still says tensorwise
    loss = lambda d: [r["loss"] for r in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert loss(part) == loss(run)
    assert resumed["recipe"] == "fp8-rowwise" and resumed["final_eval_loss"] == summary["final_eval_loss"]
    kinds = [e["kind"] for e in read_jsonl(part / "events.jsonl")]
    assert kinds[:2] == ["alarm", "rollback"] and "config" in kinds and kinds[-1] == "resume"


def test_retry_limit_stops_cleanly(tiny_data, tmp_path):
    # Without a data skip the spike comes back after every rollback.
    cfg = trainer_config(tiny_data, **{**SPIKE, "guard.skip_steps": 0, "guard.max_rollbacks": 2})
    with pytest.raises(GuardStopped, match="stopped the run at step 14 after 2 rollbacks"):
        train(cfg, tmp_path)
    kinds = [e["kind"] for e in read_jsonl(tmp_path / "events.jsonl")]
    assert kinds == ["alarm", "rollback", "alarm", "rollback", "alarm", "stop"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped-by-guard" and summary["recipe"] == "fp8-rowwise-gw-hp"
    assert "guard.max_rollbacks" in summary["reason"]


def test_per_layer_fallback_moves_the_worst_layers_to_bf16(tiny_data, tmp_path):
    summary = train(trainer_config(tiny_data, **{**SPIKE, "guard.per_layer": "true"}), tmp_path)
    assert summary["recipe"] == "fp8-tensorwise"  # the recipe stays; layers move
    moved = summary["bf16_layers"]
    assert len(moved) == 4  # ceil(0.25 * 14)
    assert summary["conversion"]["num_converted"] == 10
    skipped = {s["name"] for s in summary["conversion"]["skipped"]}
    assert set(moved) <= skipped
    rb = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["kind"] == "rollback"][0]
    assert "worst FP8 telemetry moved to bf16" in rb["message"] and rb["bf16_layers"] == moved


def test_nonfinite_streak_rolls_back(tiny_data, tmp_path):
    over = {**SPIKE, "debug.inject_spike_at_step": 0, "debug.inject_nan_at_step": 10,
            "guard.max_nonfinite_streak": 1}
    summary = train(trainer_config(tiny_data, **over), tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["kind"] for e in events][:3] == ["skip", "alarm", "rollback"]
    assert events[1]["alarm"] == "nonfinite" and events[2]["rolled_back_to"] == 4
    assert summary["recipe"] == "fp8-rowwise" and summary["status"] == "completed"


def test_rollback_off_only_reports(tiny_data, tmp_path):
    summary = train(trainer_config(tiny_data, **{**SPIKE, "guard.rollback": "false"}), tmp_path)
    assert [e["kind"] for e in read_jsonl(tmp_path / "events.jsonl")] == ["alarm"]
    assert summary["recipe"] == "fp8-tensorwise" and summary["rollbacks"] == 0
