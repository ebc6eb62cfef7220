"""The run directory: new runs, resume rules, the checkpoint's recipe winning, and the
JSON-lines logs cut back to the resume point."""

from __future__ import annotations

import json
import shutil

import pytest

from fp8lab.config import load_config
from fp8lab.errors import FP8LabError
from fp8lab.train.logs import JsonlWriter, read_jsonl
from fp8lab.train.rundir import prepare_run_dir
from fp8lab.train.trainer import train
from helpers import make_token_dataset, tiny_config, tree_digest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_token_dataset(tmp_path_factory.mktemp("rundir-data") / "ds")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
    """A finished 4-step bf16 run with checkpoints at steps 2 and 4 (trained once per module)."""
    run = tmp_path_factory.mktemp("rundir-template") / "run"
    summary = train(tiny_config(data, checkpoint__interval=2), run)
    assert summary["steps"] == 4 and summary["recipe"] == "bf16"
    return run


@pytest.fixture
def run(tmp_path, finished_run):
    """A private copy of the finished run."""
    return shutil.copytree(finished_run, tmp_path / "run")


# -- new runs -------------------------------------------------------------------------------


def test_new_run_dir_is_created_with_the_config(tmp_path, data):
    cfg = tiny_config(data)
    run = tmp_path / "a" / "b" / "run"
    got, resume, messages = prepare_run_dir(run, cfg)
    assert got == cfg and resume is None and messages == []
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]
    assert load_config(run / "config.toml") == cfg


def test_empty_existing_dir_is_used(tmp_path, data):
    (tmp_path / "run").mkdir()
    _, resume, _ = prepare_run_dir(tmp_path / "run", tiny_config(data))
    assert resume is None and (tmp_path / "run" / "config.toml").is_file()


def test_non_empty_dir_without_a_run_is_refused_untouched(tmp_path, data):
    run = tmp_path / "notes"
    run.mkdir()
    (run / "thesis.txt").write_text("do not lose me")
    (run / "sub").mkdir()
    (run / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = tree_digest(run)
    with pytest.raises(FP8LabError, match=rf"run directory {run} is not empty and holds no fp8lab run"):
        prepare_run_dir(run, tiny_config(data))
    assert tree_digest(run) == before


def test_run_dir_that_is_a_file_is_a_clear_error(tmp_path, data):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FP8LabError, match=str(path)):
        prepare_run_dir(path, tiny_config(data))
    assert path.read_text() == "x"


def test_failed_start_does_not_poison_the_run_dir(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(FP8LabError, match="/nonexistent"):
        train(tiny_config("/nonexistent"), run)
    prepare_run_dir(run, tiny_config(data))  # the corrected command must be able to start the run


# -- resume rules -----------------------------------------------------------------------------


def test_same_config_resumes_from_the_newest_checkpoint(run, data):
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # an incomplete checkpoint (no COMPLETE marker) from a later step is ignored
    (run / "checkpoints" / "step-6").mkdir()
    (run / "checkpoints" / "step-6" / "state.json").write_text("{}")
    cfg = tiny_config(data, checkpoint__interval=2)
    got, resume, messages = prepare_run_dir(run, cfg)
    assert resume == (4, run / "checkpoints" / "step-4")
    assert got == cfg and messages == []


def test_run_without_checkpoint_resumes_from_scratch(tmp_path, data):
    run = tmp_path / "run"
    cfg = tiny_config(data)
    prepare_run_dir(run, cfg)
    got, resume, messages = prepare_run_dir(run, tiny_config(data))
    assert got == cfg and resume is None and messages == []


def test_allowed_changes_are_reported_and_saved(run, data):
    cfg = tiny_config(data, checkpoint__interval=3, train__steps=9, train__eval_interval=3,
                      logging__log_interval=2, logging__progress="on", checkpoint__keep=5, debug__stop_at_step=5)
    got, resume, messages = prepare_run_dir(run, cfg)
    assert resume == (4, run / "checkpoints" / "step-4")
    assert got.train.steps == 9
    assert len(messages) == 2 and messages[0].startswith("resume changes ")
    # a longer run stretches the cosine schedule: the learning rate jumps, and the user is told
    assert messages[1].startswith("train.steps 4 -> 9 rescales the cosine schedule: the learning rate at step 5")
    for part in ("train.steps=9", "train.eval_interval=3", "checkpoint.interval=3", "checkpoint.keep=5",
                 "logging.log_interval=2", "logging.progress='on'", "debug.stop_at_step=5"):
        assert part in messages[0], part
    assert "optim." not in messages[0] and "model." not in messages[0]
    # the run's config.toml now holds the new settings, so a plain re-run resumes quietly
    assert load_config(run / "config.toml") == cfg
    assert prepare_run_dir(run, cfg)[2] == []


def test_changes_to_what_is_trained_are_refused_naming_each_key(run, data):
    before = tree_digest(run)
    cfg = tiny_config(data, checkpoint__interval=2, model__dim=96, data__seed=3, optim__lr="0.01",
                      train__steps=8)
    with pytest.raises(FP8LabError) as info:
        prepare_run_dir(run, cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"run directory {run} holds a different run")
    assert "model.dim: run has 64, command gives 96" in msg
    assert "data.seed: run has 0, command gives 3" in msg
    assert "optim.lr: run has 0.0003, command gives 0.01" in msg
    assert "train.steps" not in msg  # allowed keys are not blamed
    assert tree_digest(run) == before  # nothing in the run was touched


@pytest.mark.parametrize("key,value", [("train.seed", 1), ("train.grad_accum_steps", 2), ("data.path", "elsewhere"),
                                       ("model.n_layers", 3), ("optim.warmup_steps", 2),
                                       ("precision.skip_modules", "output,w2")])
def test_each_non_resumable_key_is_refused(run, data, key, value):
    before = tree_digest(run)
    cfg = tiny_config(data, checkpoint__interval=2, **{key.replace(".", "__"): value})
    with pytest.raises(FP8LabError, match=rf"holds a different run \({key.replace('.', '[.]')}: run has "):
        prepare_run_dir(run, cfg)
    assert tree_digest(run) == before


def test_damaged_saved_config_is_reported(run, data):
    (run / "config.toml").write_text("[train\nsteps = 4\n")
    with pytest.raises(FP8LabError, match=rf"{run / 'config.toml'} is not valid TOML .*this run directory is damaged"):
        prepare_run_dir(run, tiny_config(data, checkpoint__interval=2))


# -- the checkpoint's recipe wins ---------------------------------------------------------------


def test_checkpoint_recipe_overrides_the_command_line(run, data):
    cfg = tiny_config(data, checkpoint__interval=2, precision__recipe="fp8-tensorwise")
    got, resume, messages = prepare_run_dir(run, cfg)
    assert resume[0] == 4 and got.precision.recipe == "bf16"
    assert messages == ["precision.recipe=fp8-tensorwise ignored: the checkpoint at step 4 was trained "
                        "with bf16, which wins on resume; pass --allow-recipe-change to train with "
                        "fp8-tensorwise from here"]
    assert load_config(run / "config.toml").precision.recipe == "bf16"


def test_allow_recipe_change_trains_the_command_lines_recipe_from_the_checkpoint(run, data):
    cfg = tiny_config(data, checkpoint__interval=2, precision__recipe="fp8-tensorwise")
    got, resume, messages = prepare_run_dir(run, cfg, allow_recipe_change=True)
    assert resume[0] == 4 and got.precision.recipe == "fp8-tensorwise" and messages == []
    assert load_config(run / "config.toml").precision.recipe == "fp8-tensorwise"


def test_warm_up_in_bf16_then_continue_in_fp8(tmp_path, data):
    """The use the flag is for, end to end: the change is an event with both recipes; the run
    goes on from the bf16 checkpoint under FP8 (its weights and optimizer state load as they are)."""
    run = tmp_path / "run"
    train(tiny_config(data, train__steps=2, checkpoint__interval=2), run)
    fp8 = tiny_config(data, train__steps=4, checkpoint__interval=2, precision__recipe="fp8-tensorwise")
    summary = train(fp8, run, allow_recipe_change=True)
    assert summary["recipe"] == "fp8-tensorwise" and summary["steps"] == 4
    assert summary["conversion"]["num_converted"] > 0
    change = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "recipe-change"]
    assert [(e["step"], e["old"], e["new"]) for e in change] == [(2, "bf16", "fp8-tensorwise")]
    assert [r["recipe"] for r in read_jsonl(run / "metrics.jsonl")] == ["bf16", "bf16"] + ["fp8-tensorwise"] * 2


def test_without_a_checkpoint_a_recipe_change_is_a_different_run(tmp_path, data):
    run = tmp_path / "run"
    prepare_run_dir(run, tiny_config(data))
    with pytest.raises(FP8LabError, match=r"precision\.recipe: run has 'bf16', command gives 'fp8-rowwise'"):
        prepare_run_dir(run, tiny_config(data, precision__recipe="fp8-rowwise"))
    assert load_config(run / "config.toml").precision.recipe == "bf16"


def test_resumed_training_keeps_the_checkpoint_recipe_and_says_so(run, data):
    summary = train(tiny_config(data, checkpoint__interval=2, train__steps=6, precision__recipe="fp8-rowwise"), run)
    assert summary["recipe"] == "bf16" and summary["steps"] == 6 and summary["conversion"]["num_converted"] == 0
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert {r["recipe"] for r in recs} == {"bf16"}
    events = read_jsonl(run / "events.jsonl")
    assert any(e["kind"] == "config" and "precision.recipe=fp8-rowwise ignored" in e["message"] for e in events)
    assert any(e["kind"] == "config" and "train.steps=6" in e["message"] for e in events)
    assert any(e["kind"] == "resume" and e["step"] == 4 for e in events)


# -- JSON lines on resume ------------------------------------------------------------------------


def lines(*recs, tail: str = "") -> str:
    return "".join(json.dumps(r) + "\n" for r in recs) + tail


def test_jsonl_writer_drops_records_after_the_resume_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(lines(*({"step": s, "loss": float(s)} for s in range(1, 6))))
    w = JsonlWriter(path, keep_through_step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]  # dropped on open, before any write
    w.write({"step": 4, "loss": 40.0})
    w.close()
    assert read_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                                {"step": 4, "loss": 40.0}]


def test_jsonl_writer_drops_a_line_cut_by_a_kill_and_keeps_the_rest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(lines({"step": 1}, {"step": 2}, tail='{"step": 3, "lo'))
    w = JsonlWriter(path, keep_through_step=10)
    w.write({"step": 3, "loss": 1.5})
    w.close()
    assert path.read_text() == lines({"step": 1}, {"step": 2}, {"step": 3, "loss": 1.5})
    # one damaged line in the middle: it goes, the records after it stay (issue 12: they were
    # once all dropped, and the summary then reported an early step's loss as final), and the
    # writer counts it for the run's events
    path.write_text(lines({"step": 1}, tail='{"st\n') + lines({"step": 2}, {"step": 3}))
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    w = JsonlWriter(path, keep_through_step=10)
    w.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}] and w.dropped == 1


def test_jsonl_writer_fresh_start_and_missing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(lines({"step": 1}, {"step": 2}))
    JsonlWriter(path, keep_through_step=None).close()  # a new run: the old lines go
    assert path.read_text() == ""
    missing = tmp_path / "new.jsonl"
    w = JsonlWriter(missing, keep_through_step=7)
    w.write({"step": 8, "kind": "x"})
    assert read_jsonl(missing) == [{"step": 8, "kind": "x"}]  # flushed per record, before close
    w.close()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic_write left no temporary behind


def test_interrupted_run_resumes_with_logs_cut_back_to_the_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    cfg = tiny_config(data, checkpoint__interval=2, debug__stop_at_step=3)
    assert train(cfg, run) == {"stopped_at": 3}
    first = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3]
    # as if killed while writing step 4's line
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 99')
    summary = train(tiny_config(data, checkpoint__interval=2), run)  # debug.* may change on resume
    assert summary["steps"] == 4
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # step 3 (after the step-2 checkpoint) was redone
    assert all(r["loss"] is not None and r["loss"] != 99 for r in recs)
    assert recs[:2] == first[:2]  # kept verbatim
    # the redone step 3 starts from the step-2 checkpoint (weights, optimizer, data position, RNG)
    assert recs[2]["loss"] == first[2]["loss"] and recs[2]["tokens"] == first[2]["tokens"] == 3 * 4 * 32
    events = read_jsonl(run / "events.jsonl")
    # events are history: the drill's stop at step 3 stays on record, followed by the resume
    assert [e["kind"] for e in events if e["kind"] in ("stop", "resume")] == ["stop", "resume"]
    assert any("debug.stop_at_step=0" in e["message"] for e in events if e["kind"] == "config")
