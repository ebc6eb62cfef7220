"""The trainer: gradient accumulation, exact resume, checkpoints across recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fp8lab.precision import RECIPES, to_plain
from fp8lab.train.build import build
from fp8lab.train.checkpoint import list_complete, load_model_weights, load_tensors
from fp8lab.train.logs import read_jsonl
from fp8lab.train.step import train_step
from fp8lab.train.trainer import Trainer, train
from helpers import trainer_config


def _grads_at_first_step(cfg) -> dict[str, torch.Tensor]:
    """Run one real train_step and capture the gradients the optimizer sees."""
    trainer = Trainer(cfg, cfg._run_dir)
    grads = {}

    def capture(opt, args, kwargs):
        for name, p in trainer.parts.model.named_parameters():
            grads[name] = p.grad.detach().clone()

    trainer.parts.optimizer.register_step_pre_hook(capture)
    batches = [trainer.parts.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)]
    train_step(trainer.parts, trainer.cfg, 1, batches)
    return grads


def test_grad_accumulation_4x8_equals_1x32(tiny_data, tmp_path):
    a = trainer_config(tiny_data, **{"data.micro_batch_size": 8, "train.grad_accum_steps": 4,
                                  "precision.compute_dtype": "fp32"})
    b = trainer_config(tiny_data, **{"data.micro_batch_size": 32, "train.grad_accum_steps": 1,
                                  "precision.compute_dtype": "fp32"})
    a._run_dir, b._run_dir = tmp_path / "a", tmp_path / "b"
    ga, gb = _grads_at_first_step(a), _grads_at_first_step(b)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        # Same sequences, summed in a different order: equal to fp32 rounding, and a wrong
        # normalisation (e.g. a mean per micro-batch) would be off by 4x.
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-7, msg=name)


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def _final_weights(run_dir, cfg):
    step, path = list_complete(run_dir)[-1]
    model = build(cfg).model
    load_model_weights(path, model)
    return step, {n: to_plain(p).clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", ["fp32", "fp8-tensorwise"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_resume_reproduces_uninterrupted_run_exactly(tiny_data, tmp_path, recipe, compiled):
    over = {"train.steps": 7, "checkpoint.interval": 2, "train.eval_interval": 3,
            "precision.compile": "on" if compiled else "off"}
    if recipe == "fp32":
        over |= {"precision.recipe": "bf16", "precision.compute_dtype": "fp32"}
    else:
        over |= {"precision.recipe": recipe}
    full, part = tmp_path / "full", tmp_path / "part"
    train(trainer_config(tiny_data, **over), full)
    # Interrupted after step 5: the newest checkpoint is step 4, so step 5 is redone.
    assert train(trainer_config(tiny_data, **over, **{"debug.stop_at_step": 5}), part) == {"stopped_at": 5}
    assert [s for s, _ in list_complete(part)] == [2, 4]
    assert len(_losses(part)) == 5
    train(trainer_config(tiny_data, **over), part)

    assert _losses(full) == _losses(part)  # every logged loss, bit for bit
    assert len(_losses(full)) == 7 and all(isinstance(x, float) for x in _losses(full))
    evals = lambda d: [r.get("eval_loss") for r in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert evals(full) == evals(part) and evals(full)[2] is not None
    cfg = trainer_config(tiny_data, **over)
    (sf, wf), (sp, wp) = _final_weights(full, cfg), _final_weights(part, cfg)
    assert sf == sp == 7
    assert all(torch.equal(wf[n], wp[n]) for n in wf)
    assert json.loads((full / "summary.json").read_text())["final_eval_loss"] == \
        json.loads((part / "summary.json").read_text())["final_eval_loss"]


def test_loss_falls_and_metrics_fields(tiny_data, tmp_path):
    summary = train(trainer_config(tiny_data, **{"train.steps": 30, "precision.recipe": "fp8-rowwise"}), tmp_path)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert summary["conversion"]["num_converted"] == 14 and summary["emulated"]
    for r in recs:
        assert r["recipe"] == "fp8-rowwise" and r["mfu"] is None and r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 8 * 32


@pytest.fixture(scope="module")
def checkpoints_by_recipe(tiny_data, tmp_path_factory):
    out = {}
    for recipe in RECIPES:
        run = tmp_path_factory.mktemp(f"ckpt-{recipe}")
        train(trainer_config(tiny_data, **{"train.steps": 2, "precision.recipe": recipe}), run)
        out[recipe] = list_complete(run)[-1][1]
    return out


@pytest.mark.parametrize("dst", list(RECIPES))
def test_checkpoint_from_every_recipe_loads_under_every_other(tiny_data, checkpoints_by_recipe, dst):
    reference = build(trainer_config(tiny_data, **{"precision.recipe": "bf16"}))
    for src, path in checkpoints_by_recipe.items():
        load_tensors(path, model=reference.model, optimizer=reference.optimizer)
        want = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
        target = build(trainer_config(tiny_data, **{"precision.recipe": dst}))
        load_tensors(path, model=target.model, optimizer=target.optimizer)
        for name, p in target.model.named_parameters():
            assert torch.equal(to_plain(p), want[name]), (src, dst, name)
        # trained weights, not the init: the optimizer stepped twice
        fresh = build(trainer_config(tiny_data, **{"precision.recipe": dst})).model
        assert not torch.equal(to_plain(fresh.layers["0"].attention.wq.weight),
                               to_plain(target.model.layers["0"].attention.wq.weight))
        x, _ = target.loader.next_batch()
        with torch.no_grad():
            assert torch.isfinite(target.model(x)).all()


@pytest.mark.parametrize("deferred", [True, False])
def test_nonfinite_step_is_skipped_and_leaves_state_bit_identical(tiny_data, tmp_path, deferred):
    """Deferred: fused AdamW is queued before the loss and norm reach the host and skips on the
    device (found_inf); otherwise the host decides first. The same state either way."""
    trainer = Trainer(trainer_config(tiny_data, **{"debug.inject_nan_at_step": 2,
                                                   "train.deferred_sync": deferred}), tmp_path)
    b, cfg = trainer.parts, trainer.cfg
    assert all(g["fused"] for g in b.optimizer.param_groups)  # the kernel that can skip on the device
    assert train_step(b, cfg, 1, [b.loader.next_batch()]).stepped  # a normal step first: state exists

    def snapshot():
        params = {n: p.detach().clone() for n, p in b.model.named_parameters()}
        state = {(id(p), k): v.clone() for p, st in b.optimizer.state.items() for k, v in st.items()}
        return params, state

    before = snapshot()
    result = train_step(b, cfg, 2, [b.loader.next_batch()], drill=math.nan)  # what inject_nan_at_step does
    assert not result.stepped and math.isnan(result.loss)
    after = snapshot()
    assert before[0].keys() == after[0].keys() and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # includes AdamW's step count
    assert all(p.grad is None for p in b.model.parameters())  # nothing leaks into the next step


def test_nonfinite_step_is_logged_not_silent(tiny_data, tmp_path):
    summary = train(trainer_config(tiny_data, **{"debug.inject_nan_at_step": 3}), tmp_path)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert recs[2]["skipped"] == "nonfinite" and recs[2]["loss"] is None
    assert all("skipped" not in r for i, r in enumerate(recs) if i != 2)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["kind"] for e in events] == ["skip"] and events[0]["step"] == 3
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_eval_loss"])


def test_tensorboard_scalars_match_metrics(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(trainer_config(tiny_data, **{"logging.tensorboard": "true"}), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [s for s, _ in logged] == [r["step"] for r in recs]
    assert all(v == pytest.approx(r["loss"], rel=1e-6) for (_, v), r in zip(logged, recs))


def test_resume_on_different_data_is_refused(tiny_data, tmp_path):
    """Same data.path, different content (re-prepared, or the embedded corpus of another
    Python): the run must not silently continue on it."""
    import shutil

    import numpy as np

    from fp8lab.data import write_dataset
    from fp8lab.errors import FP8LabError

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    over = {"checkpoint.interval": 2, "debug.stop_at_step": 3}
    train(trainer_config(data, **over), tmp_path / "run")
    shutil.rmtree(data)
    write_dataset(data, train=[np.arange(512 * 33).reshape(512, 33) % 64], val=[np.zeros((32, 33), dtype=np.int64)],
                  seq_len=32, vocab_size=64, eos_id=None, tokenizer={"type": "synthetic"}, sources=[])
    with pytest.raises(FP8LabError, match="is not the data this run was trained on"):
        train(trainer_config(data, **over), tmp_path / "run")


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tiny_data, tmp_path):
    from fp8lab.errors import FP8LabError

    train(trainer_config(tiny_data, **{"checkpoint.interval": 2, "debug.stop_at_step": 5}), tmp_path)
    with pytest.raises(FP8LabError, match="train.steps=3 is below the step of the newest checkpoint \\(4\\)"):
        train(trainer_config(tiny_data, **{"checkpoint.interval": 2, "train.steps": 3}), tmp_path)


def test_final_eval_is_in_the_last_metrics_record(tiny_data, tmp_path):
    summary = train(trainer_config(tiny_data), tmp_path)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 6 and last["eval_loss"] == summary["final_eval_loss"]


def test_data_longer_than_the_model_or_with_a_larger_vocab_is_refused(tiny_data, tmp_path):
    from fp8lab.errors import FP8LabError

    with pytest.raises(FP8LabError, match=r"data.seq_len=32 exceeds the debug model's max_seq_len \(16\)"):
        build(trainer_config(tiny_data, **{"model.max_seq_len": 16}))
    with pytest.raises(FP8LabError, match=r"model.vocab_size=32 is smaller than the data's vocabulary \(64\)"):
        build(trainer_config(tiny_data, **{"model.vocab_size": 32}))
    # a model vocabulary larger than the data's (padded for tensor cores) is normal
    assert build(trainer_config(tiny_data, **{"model.vocab_size": 128})).model_args.vocab_size == 128
    assert build(trainer_config(tiny_data)).model_args.vocab_size == 64  # the data's, rounded up to 64
