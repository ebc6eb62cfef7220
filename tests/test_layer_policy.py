"""precision.filter_mode=roofline / auto: the layer policy (perf.layer_policy) that decides which
linears convert, and why (with numbers), handed to the converter as its filter_fn."""

from __future__ import annotations

import logging

import pytest
import torch

from fp8lab.config import load_config
from fp8lab.errors import FP8LabError
from fp8lab.models import Transformer, preset_args
from fp8lab.perf import layer_policy as policy
from fp8lab.perf.layer_policy import WIN_MARGIN, decide, layer_policy
from fp8lab.precision import convert, get_recipe, plan_conversion


def meta_model(preset: str, **overrides) -> Transformer:
    # The shapes are what matters: a meta-device model allocates nothing (8B's linears included).
    with torch.device("meta"):
        return Transformer(preset_args(preset, **overrides))


def roofline_plan(model, recipe, *, gpu: str, tokens: int):
    recipe = get_recipe(recipe)
    return plan_conversion(model, recipe, skip_modules=["output"],
                           filter_fn=layer_policy(recipe, mode="roofline", device=torch.device("cpu"), filter_gpu=gpu,
                                                  tokens=tokens))


def test_debug_preset_converts_nothing_on_h100():
    converted, skipped = roofline_plan(meta_model("debug"), "fp8-tensorwise", gpu="h100-sxm", tokens=8 * 256)
    assert converted == []
    filtered = [s for s in skipped if s["name"] != "output"]
    assert len(filtered) == 4 * 7
    for s in filtered:
        assert s["reason"].startswith("roofline (h100-sxm, vendor rates, 2048 tokens)"), s["reason"]
        assert f"x of bf16, below {WIN_MARGIN}x" in s["reason"]


def test_8b_ffn_gemms_convert_at_8192_tokens():
    model = meta_model("8b", n_layers=2, vocab_size=512)
    for recipe in ("fp8-tensorwise", "fp8-rowwise"):
        converted, skipped = roofline_plan(model, recipe, gpu="h100-sxm", tokens=8192)
        names = {c["name"].split(".", 2)[2] for c in converted}
        assert {"feed_forward.w1", "feed_forward.w2", "feed_forward.w3"} <= names, recipe
        for c in converted:
            speedup = float(c["filter"].split(f"{recipe} ")[1].split("x")[0])
            assert speedup >= WIN_MARGIN
    # rowwise loses on the narrow k/v projections (TorchAO's rule: rowwise loses for N <= 2048)
    _, skipped = roofline_plan(model, "fp8-rowwise", gpu="h100-sxm", tokens=8192)
    assert {s["name"] for s in skipped} >= {"layers.0.attention.wk", "layers.0.attention.wv"}


def test_fewer_tokens_convert_less():
    model = meta_model("1b", n_layers=1, vocab_size=512)
    counts = []
    for tokens in (256, 4096, 65536):
        converted, _ = roofline_plan(model, "fp8-tensorwise", gpu="h200", tokens=tokens)
        counts.append(len(converted))
    assert counts[0] < counts[2] and counts == sorted(counts)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_cpu_defaults_and_fallback():
    recipe = get_recipe("fp8-tensorwise")
    cpu = torch.device("cpu")
    d = decide(recipe, [(4096, 14336)], mode="roofline", device=cpu, tokens=8192)[(4096, 14336)]
    assert d.convert and "h100-sxm assumed" in d.reason and "set precision.filter_gpu" in d.reason
    seen = _Records()  # pytest runs here with -p no:logging: no caplog
    log = logging.getLogger("fp8lab")
    level = log.level
    log.addHandler(seen)
    log.setLevel(logging.WARNING)
    try:
        d = decide(recipe, [(4096, 14336)], mode="auto", device=cpu, tokens=8192)[(4096, 14336)]
    finally:
        log.removeHandler(seen)
        log.setLevel(level)
    assert d.reason.startswith("auto fell back to roofline (no GPU to time on)") and d.convert
    assert any("roofline" in r.getMessage() for r in seen.records)
    d = decide(recipe, [(4096, 14336)], mode="roofline", device=cpu)[(4096, 14336)]
    assert f"{policy.DEFAULT_TOKENS} assumed" in d.reason
    mx = decide(get_recipe("mxfp8"), [(4096, 14336)], mode="roofline", device=cpu, tokens=8192)[(4096, 14336)]
    assert "b200 assumed" in mx.reason


def test_bad_filter_gpus():
    recipe, cpu = get_recipe("fp8-tensorwise"), torch.device("cpu")
    with pytest.raises(FP8LabError, match="h100-sxm.*rtx5090|rtx5090.*h100-sxm"):
        decide(recipe, [(64, 64)], mode="roofline", device=cpu, filter_gpu="tpu-v5")
    with pytest.raises(FP8LabError, match="no FP8 tensor cores"):
        decide(recipe, [(64, 64)], mode="roofline", device=cpu, filter_gpu="a100")
    with pytest.raises(FP8LabError, match="precision.filter_gpu='tpu-v5' is not allowed.*h100-sxm"):
        load_config(None, {"precision.filter_gpu": "tpu-v5"})
    cfg = load_config(None, {"precision.filter_mode": "roofline", "precision.filter_gpu": "h200"})
    assert cfg.precision.filter_mode == "roofline" and cfg.precision.filter_gpu == "h200"
    assert load_config(None, {"precision.filter_mode": "auto"}).precision.filter_gpu == "auto"


def test_convert_report_carries_the_decision():
    """End to end on a real (tiny) model on CPU: nothing wins on an H100 at this size, and the
    run summary says why."""
    torch.manual_seed(0)
    model = Transformer(preset_args("debug"))
    recipe = get_recipe("fp8-tensorwise")
    report = convert(model, recipe=recipe,
                     filter_fn=layer_policy(recipe, mode="roofline", device=torch.device("cpu"), tokens=2048))
    assert report.num_converted == 0 and report.emulated
    summary = report.summary()
    assert "roofline (h100-sxm" in summary and "x of bf16" in summary
    assert all("reason" in s for s in report.to_dict()["skipped"])
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())


def test_auto_on_a_gpu_times_and_caches(monkeypatch):
    """The measured branch: the timing function (which needs a GPU) is stood in for."""
    calls = []

    def fake_times(device, recipe, m, k, n, compiled=True):
        calls.append((recipe, m, k, n))
        return {"bf16_s": 2e-3, "recipe_s": 1e-3 if k > 1000 else 3e-3, "cached": False}

    monkeypatch.setattr(policy, "cached_layer_times", fake_times)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    out = decide(get_recipe("fp8-rowwise"), [(4096, 4096), (256, 256), (4096, 4096)], mode="auto",
                 device=torch.device("cuda", 0), tokens=4096)
    assert calls == [("fp8-rowwise", 4096, 256, 256), ("fp8-rowwise", 4096, 4096, 4096)]  # once per shape
    assert out[(4096, 4096)].convert and "measured on NVIDIA H200" in out[(4096, 4096)].reason
    assert "2.00x of bf16" in out[(4096, 4096)].reason
    assert not out[(256, 256)].convert
    assert "0.67x of bf16 (3.000 vs 2.000 ms), below 1.05x" in out[(256, 256)].reason


def test_bench_layer_timings_feed_the_auto_filter_cache(monkeypatch):
    """What `fp8lab bench --layers` stores on a GPU is what the auto filter reads back, without
    timing again (the GPU name is stood in for; the cache file is real, under $FP8LAB_CACHE)."""
    from fp8lab.perf import measure

    measure.store_layer_times("NVIDIA H200", "fp8-rowwise", 16384, 2048, 8192, True,
                              bf16_s=3e-3, recipe_s=2e-3, source="fp8lab bench --layers")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(measure, "time_linear", lambda *a, **k: pytest.fail("timed again instead of cached"))
    got = measure.cached_layer_times(torch.device("cuda", 0), "fp8-rowwise", 16384, 2048, 8192)
    assert got["cached"] and got["bf16_s"] == 3e-3 and got["recipe_s"] == 2e-3
    assert got["source"] == "fp8lab bench --layers"


def test_the_converter_takes_policies_only_as_filter_fn():
    """auto and roofline are not the converter's to decide: asking it by name says where they are."""
    model = Transformer(preset_args("debug"))
    with pytest.raises(FP8LabError, match="fp8lab.perf.layer_policy"):
        convert(model, recipe="fp8-tensorwise", filter_mode="roofline")
