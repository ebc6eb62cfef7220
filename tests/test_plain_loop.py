"""The plain reference loop and `fp8lab bench --vs-plain` on CPU: the loop trains and converts
what TorchAO's README would, the bench runs it beside fp8lab's worker in turns and divides the
right numbers, bad input is refused. Speeds are never asserted (a shared CPU is no stopwatch).
The one --vs-plain bench through the CLI rides on test_bench's --random-data run."""

from __future__ import annotations

import math

import pytest
from torch import nn

from fp8lab.bench import step_bench
from fp8lab.bench.bench_text import fp8_linears, plain_cells
from fp8lab.bench.plain_loop import build, run
from fp8lab.bench.step_bench import BenchOptions, parse_recipes, run_bench
from fp8lab.cli import main
from fp8lab.errors import FP8LabError
from fp8lab.precision.convert import ConversionReport
from helpers import TINY

SHAPE = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab=256, tie=True)


@pytest.mark.parametrize("recipe", ["bf16", "fp8-tensorwise"])
def test_plain_loop_trains_and_reports(recipe):
    r = run(**SHAPE, batch=2, seq_len=32, recipe=recipe, warmup=1, steps=2, device="cpu")
    assert r["status"] == "ok" and r["recipe"] == recipe and r["device"] == "cpu" and not r["compiled"]
    assert r["steps"] == len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
    assert r["step_time_s"] == pytest.approx(sorted(r["step_times_s"])[0] / 2 + sorted(r["step_times_s"])[1] / 2)
    assert r["tokens_per_s"] == pytest.approx(64 / r["step_time_s"])
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert abs(r["loss_first"] - math.log(256)) < 0.5  # small init: near-uniform predictions at first
    assert r["converted"] == (14 if recipe != "bf16" else 0) and r["emulated"] == (recipe != "bf16")


def test_plain_model_converts_every_block_linear_but_not_the_output():
    from torchao.float8.float8_linear import Float8Linear

    model = build(recipe="fp8-rowwise", device="cpu", seq_len=32, **SHAPE)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {f"layers.{i}.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert type(model.output) is nn.Linear and model.output.weight is model.tok_embeddings.weight  # tied


def test_recipe_entries_may_set_precision_keys_for_their_row(capsys):
    assert parse_recipes("bf16, fp8-rowwise : filter_mode=auto,bf16") == ["bf16", "fp8-rowwise:filter_mode=auto"]
    with pytest.raises(FP8LabError, match="filter_mode, filter_gpu, compile"):
        parse_recipes("fp8-rowwise:recipe=bf16")
    assert main(["bench", "--recipes", "fp8-rowwise:filter_mode=fast"]) == 2  # the value, checked by the config
    assert "filter_mode" in capsys.readouterr().err


def test_fp8_linears_grouped_without_the_block_index():
    report = ConversionReport(recipe="fp8-rowwise", emulated=True)
    for i in range(2):
        report.converted += [{"name": f"layers.{i}.attention.{w}"} for w in ("wq", "wo")]
    report.converted.append({"name": "layers.0.feed_forward.w1"})
    report.skipped += [{"name": "layers.1.feed_forward.w1", "reason": "filter"}, {"name": "output", "reason": "skip"}]
    groups = report.linear_groups()
    assert groups[2] == {"name": "feed_forward.w1", "converted": 1, "total": 2, "skipped": "filter"}
    assert fp8_linears({"fp8_linears": groups}) == "3/4: wq wo w1(1/2)"
    assert fp8_linears({"fp8_linears": []}) == "none"  # bf16


def fake_launch(calls: list):
    """step_bench.launch without processes: a row whose tokens/s says which side and recipe ran."""
    speed = {"bf16": 100.0, "fp8-tensorwise": 150.0}

    def launch(spec, workdir, *, timeout_s, tag, module="fp8lab.bench.step_bench"):
        plain = module.endswith("plain_loop")
        recipe = spec["recipe"] if plain else spec["overrides"]["precision.recipe"]
        calls.append(("plain" if plain else "fp8lab", recipe))
        tps = speed[recipe] * (1.0 if plain else 0.5)
        return {"recipe": recipe, "status": "ok", "tokens_per_s": tps, "label": recipe, "compiled": False,
                "params": 1, "emulated": False, "skipped_steps": 0, "tokens_per_step": 64, "startup_s": 0.0,
                "wall_s": 0.0}
    return launch


def test_vs_plain_alternates_reuses_and_divides(monkeypatch):
    calls: list = []
    monkeypatch.setattr(step_bench, "launch", fake_launch(calls))
    opts = BenchOptions(config=None, overrides={**TINY, "data.micro_batch_size": "2"}, random_data=True,
                        recipes=["bf16", "fp8-tensorwise", "fp8-tensorwise:filter_mode=heuristic"], vs_plain=True)
    result = run_bench(opts)
    # A B, B A, A: the plain run of fp8-tensorwise stands for its filter_mode variant too
    assert calls == [("fp8lab", "bf16"), ("plain", "bf16"), ("plain", "fp8-tensorwise"),
                     ("fp8lab", "fp8-tensorwise"), ("fp8lab", "fp8-tensorwise")]
    rows = {r["recipe"]: r for r in result["recipes"]}
    tw, variant = rows["fp8-tensorwise"], rows["fp8-tensorwise:filter_mode=heuristic"]
    assert variant["label"] == "fp8-tensorwise filter_mode=heuristic"
    for r in (tw, variant):
        assert r["vs_plain"] == pytest.approx(0.5) and r["plain_speedup_vs_bf16"] == pytest.approx(1.5)
        assert r["vs_plain_bf16"] == pytest.approx(0.75) and r["plain"]["tokens_per_s"] == 150.0
    assert result["plain"]["shape"]["dim"] == int(TINY["model.dim"]) and result["plain"]["shape"]["batch"] == 2
    assert plain_cells(variant) == ["150 (1.50x)", "0.500", "0.75x"]


def test_vs_plain_refuses_gradient_accumulation(capsys):
    assert main(["bench", "--vs-plain", "--train.grad_accum_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8lab: error: --vs-plain") and "--train.grad_accum_steps=1" in err


def test_settings_the_plain_loop_lacks_are_named_per_entry():
    from fp8lab.bench.vs_plain import differences
    from fp8lab.config import load_config

    assert differences(load_config(None, {})) == []  # fp8lab's defaults: the ratio compares like with like
    said = differences(load_config(None, {"precision.filter_mode": "auto", "precision.residual_dtype": "compute"}))
    assert len(said) == 2 and "filter_mode" in said[0] and "residual_dtype=compute" in said[1]
