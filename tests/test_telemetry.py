"""FP8 telemetry: the cast statistics on edge cases, collection from a real converted model,
and that turning it on does not change training."""

from __future__ import annotations

import math

import pytest
import torch

from fp8lab.precision import get_recipe
from fp8lab.precision.telemetry import cast_specs, cast_stats, riskiest, worst_layers
from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import train
from helpers import trainer_config


def stats(x, recipe):
    return cast_stats(x, cast_specs(get_recipe(recipe))["input"])


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise"])
def test_all_zero_tensor(recipe):
    s = stats(torch.zeros(8, 64), recipe)
    assert s["amax"] == 0 and s["nonfinite"] == 0 and s["underflow_frac"] == 0 and s["sqnr_db"] is None


def test_underflow_rises_with_the_outlier_and_more_in_tensorwise():
    torch.manual_seed(0)
    x = torch.randn(128, 256)
    under = {"fp8-tensorwise": [], "fp8-rowwise": []}
    for outlier in (0.0, 1e2, 1e4, 1e6):
        y = x.clone()
        if outlier:
            y[5, 7] = outlier
        for recipe in under:
            under[recipe].append(stats(y, recipe)["underflow_frac"])
    for recipe, fracs in under.items():
        assert fracs == sorted(fracs) and fracs[-1] > fracs[0], (recipe, fracs)  # rises with the outlier
    assert max(under["fp8-tensorwise"][0], under["fp8-rowwise"][0]) < 1e-3  # no outlier: next to nothing underflows
    # one row's outlier sets only that row's scale under rowwise, every row's under tensorwise
    assert under["fp8-tensorwise"][-1] > 0.5 and under["fp8-rowwise"][-1] < 0.01
    assert stats(x, "fp8-tensorwise")["amax_over_median"] < 10 < stats(y, "fp8-tensorwise")["amax_over_median"]


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise"])
def test_inf_is_counted_not_propagated(recipe):
    x = torch.randn(16, 64)
    x[3, 3], x[4, 4] = math.inf, -math.nan
    s = stats(x, recipe)
    assert s["nonfinite"] == 2 and s["sqnr_db"] is not None and s["sqnr_db"] > 20


def test_riskiest_orders_nonfinite_then_sqnr_then_underflow():
    recs = [{"layer": "a", "tensor": "input", "nonfinite": 0, "sqnr_db": 30.0, "underflow_frac": 0.0},
            {"layer": "b", "tensor": "input", "nonfinite": 0, "sqnr_db": 20.0, "underflow_frac": 0.0},
            {"layer": "c", "tensor": "weight", "nonfinite": 3, "sqnr_db": 40.0, "underflow_frac": 0.0},
            {"layer": "a", "tensor": "grad_output", "nonfinite": 0, "sqnr_db": 20.0, "underflow_frac": 0.2}]
    assert [(r["layer"], r["tensor"]) for r in riskiest(recs)] == [
        ("c", "weight"), ("a", "grad_output"), ("b", "input"), ("a", "input")]
    assert worst_layers(recs) == ["c", "a", "b"]


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise", "mxfp8"])
def test_telemetry_covers_every_converted_layer_and_leaves_training_unchanged(tiny_data, tmp_path, recipe):
    on = train(trainer_config(tiny_data, **{"precision.recipe": recipe, "logging.telemetry_interval": 2}),
               tmp_path / "on")
    off = train(trainer_config(tiny_data, **{"precision.recipe": recipe}), tmp_path / "off")
    losses = lambda d: [r["loss"] for r in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "on") == losses(tmp_path / "off")  # an extra pass, not a different step
    recs = read_jsonl(tmp_path / "on" / "telemetry.jsonl")
    assert sorted({r["step"] for r in recs}) == [2, 4, 6]
    layers = {c["name"] for c in on["conversion"]["converted"]}
    at2 = [r for r in recs if r["step"] == 2]
    assert {(r["layer"], r["tensor"]) for r in at2} == {(n, t) for n in layers for t in ("input", "weight", "grad_output")}
    for r in at2:
        assert r["nonfinite"] == 0 and 15 < r["sqnr_db"] < 60 and 0 <= r["underflow_frac"] < 0.5
    assert off["final_eval_loss"] == on["final_eval_loss"]
