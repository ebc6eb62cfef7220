"""fp8lab advise: the published anchors, the consumer-GPU caveats, the CLI, and the prepared
GPU check's CPU-runnable part."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fp8lab.bench.advise import advise
from fp8lab.cli import main
from fp8lab.gpus import GPUS
from fp8lab.models.presets import PRESETS
from fp8lab.perf.measure import load_step_time, save_measured_rates, step_key, store_step_time
from helpers import REPO


@pytest.fixture(scope="module")
def llama8b_h100():
    return advise(PRESETS["8b"], gpu="h100-sxm", tokens=8192, seq_len=8192)


def test_anchor_llama3_8b_h100(llama8b_h100):
    """TorchAO/torchtitan, Llama3-8B on 8xH100, seq 8192, 8192 tokens per GPU: tensorwise
    +25%, rowwise +10% (communication excluded here)."""
    a = llama8b_h100
    tw, rw = a.get("fp8-tensorwise"), a.get("fp8-rowwise")
    assert 1.15 <= tw.speedup <= 1.45 and 1.15 <= tw.speedup_all <= 1.45
    assert rw.speedup < tw.speedup and rw.speedup_all < tw.speedup_all
    assert a.get("fp8-rowwise-gw-hp").speedup < tw.speedup
    assert not a.get("mxfp8").supported
    assert a.recommended == "fp8-tensorwise"
    assert {"feed_forward.w1", "feed_forward.w2", "feed_forward.w3"} <= set(tw.converted)
    assert "output" not in tw.layer_speedups  # skipped by precision.skip_modules
    assert any("memory" in c and "--num-gpus" in c for c in a.caveats)  # 8B + AdamW > 80 GB


def test_anchor_holds_sharded_over_8_gpus():
    a = advise(PRESETS["8b"], gpu="h100-sxm", tokens=8192, seq_len=8192, num_gpus=8)
    assert 1.15 <= a.get("fp8-tensorwise").speedup <= 1.45
    assert a.get("fp8-rowwise").speedup < a.get("fp8-tensorwise").speedup
    assert a.get("bf16").fits


@pytest.mark.parametrize("preset,tokens,seq", [("8b", 8192, 8192), ("1b", 16384, 2048), ("125m", 4096, 512)])
def test_rtx5090_mxfp8_above_tensorwise(preset, tokens, seq):
    a = advise(PRESETS[preset], gpu="rtx5090", tokens=tokens, seq_len=seq)
    mx, tw = a.get("mxfp8"), a.get("fp8-tensorwise")
    assert mx.speedup > tw.speedup and mx.speedup_all > tw.speedup_all
    text = " ".join(a.caveats)
    assert "rate source: microbench" in text and "mmapeak" in text  # which rate source, and why
    assert "FP32 accumulation" in text and "half" in text  # the GeForce accumulation caveat
    assert "CUBLAS_STATUS_NOT_SUPPORTED" in text and "TN" in text  # rowwise and MXFP8 layout on sm_12x
    assert "with vendor rates instead" in text


def test_no_fp8_on_a100_and_nothing_worth_converting_when_small():
    a = advise(PRESETS["1b"], gpu="a100", tokens=8192, seq_len=2048)
    assert a.recommended == "bf16"
    assert all(not r.supported for r in a.recipes if r.recipe != "bf16")
    d = advise(PRESETS["debug"], gpu="h100-sxm", tokens=2048, seq_len=256)
    assert d.recommended == "bf16"
    assert all(r.converted == [] for r in d.recipes if r.supported)


def test_cli_json_8b(capsys):
    assert main(["advise", "--model", "8b", "--gpu", "h100-sxm", "--batch-tokens", "8192", "--seq-len", "8192",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    by = {r["recipe"]: r for r in d["recipes"]}
    assert set(by) == {"bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp", "mxfp8"}
    assert 1.15 <= by["fp8-tensorwise"]["speedup"] <= 1.45 and by["mxfp8"]["speedup"] is None
    assert d["recommended"] == "fp8-tensorwise" and d["rates"]["source"] == "vendor"
    assert all(c["source"] for c in d["constants"].values())


def test_cli_text_125m_rtx5090(capsys):
    assert main(["advise", "--model", "125m", "--gpu", "rtx5090"]) == 0
    out = capsys.readouterr().out
    for needle in ("rates (microbench)", "mxfp8", "recommended:", "FP32 accumulation", "TN operand layout"):
        assert needle in out, needle


def test_cli_config_file_and_errors(capsys):
    assert main(["advise", "--model", str(REPO / "configs" / "125m-5090.toml"), "--gpu", "rtx5090", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["dim"] == PRESETS["125m"].dim and d["gpu"]["id"] == "rtx5090"
    assert main(["advise", "--model", "8b", "--gpu", "tpu-v5"]) == 2
    err = capsys.readouterr().err
    assert "h100-sxm" in err and "rtx5090" in err
    assert main(["advise", "--model", "70b", "--gpu", "h100-sxm"]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["advise", "--model", "8b", "--gpu", "h100-sxm", "--batch-tokens", "100", "--seq-len", "512"]) == 2


def test_doctor_measurement_is_used(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FP8LAB_CACHE", str(tmp_path))
    save_measured_rates({"device_name": "NVIDIA GeForce RTX 5090", "torch": "2.13.0", "date": "2026-01-01T00:00:00Z",
                         "bf16_tflops": 230.0, "fp8_tflops": 390.0, "fp8_rowwise_tflops": 380.0, "mxfp8_tflops": 600.0,
                         "mem_bandwidth_gbs": 1600})
    assert main(["advise", "--model", "1b", "--gpu", "rtx5090", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rates"]["source"] == "measured" and d["rates"]["bf16_tflops"] == 230.0
    assert main(["advise", "--model", "1b", "--gpu", "rtx5090", "--rates", "vendor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rates"]["source"] == "vendor"
    assert main(["advise", "--model", "1b", "--gpu", "rtx5090"]) == 0
    assert "rates (measured by fp8lab doctor on NVIDIA GeForce RTX 5090, 2026-01-01" in capsys.readouterr().out


# -- the measured table of issue 13 ---------------------------------------------------------------
# One H200, 2026-11-30: torch 2.11, torchao 0.18; seq 512, micro-batch 32 (16,384 tokens per step),
# tied embeddings, vocabulary 128,256; the step as it was then: plain loss head (fp32 logits, eager
# cross-entropy), fp32 residual stream, every eligible linear converted but the output layer
# (filter_mode=all: speedup_all), compiled blocks. `fp8lab doctor` on the same card:
H200_DOCTOR = {"device_name": "NVIDIA H200", "date": "2026-11-30T00:00:00Z", "torch": "2.11.0",
               "bf16_tflops": 781.0, "fp8_tflops": 1423.0, "fp8_rowwise_tflops": 1501.0, "mem_bandwidth_gbs": 4180}
H200_BF16_STEP_S = {"1b": 0.2585, "3b": 0.6178}  # 63,375 and 26,520 tokens/s
H200_SPEEDUPS = [  # (preset, recipe, measured speedup over bf16)
    ("1b", "fp8-tensorwise", 1.13),
    pytest.param("1b", "fp8-rowwise", 0.97, marks=pytest.mark.xfail(strict=True, reason=(
        "predicted 1.09x anchored, +12%: the byte model of TorchAO 0.18's rowwise casts explains about a "
        "fifth of rowwise's measured deficit to tensorwise on this step, while it is pessimistic on "
        "TorchAO's published per-layer rowwise numbers (tests/test_roofline.py): the rest needs a profile"))),
    ("3b", "fp8-tensorwise", 1.21),
]


def h200_table_advice(preset: str, *, anchored: bool = True):
    return advise(PRESETS[preset], gpu="h200", tokens=16384, seq_len=512, measured=H200_DOCTOR, loss_head="plain",
                  residual_dtype="fp32",
                  bf16_step={"step_s": H200_BF16_STEP_S[preset], "source": "issue 13"} if anchored else None)


@pytest.mark.parametrize("preset,recipe,measured", H200_SPEEDUPS)
def test_h200_table_anchored_within_10_percent(preset, recipe, measured):
    """Doctor's rates and the measured bf16 step in, each measured speedup out, within 10%. No
    constant here was fitted to this table: rates are doctor's, the model's constants are sourced
    (perf.roofline_linear.CONSTANTS), and the anchor only removes what every recipe shares."""
    got = h200_table_advice(preset).get(recipe).speedup_all_anchored
    assert abs(got / measured - 1) <= 0.10, (preset, recipe, got, measured)


def test_h200_table_unanchored():
    """Without the anchor, with doctor's rates, the model's own bf16 step: 1b 226 ms for 258.5 measured,
    3b 540 for 617.8 (-13% both: CPU gaps, host syncs, GEMMs at these shapes below doctor's 8192^3
    rate are not modelled). The un-anchored speedups are further off than the anchored ones."""
    for preset, measured_s in H200_BF16_STEP_S.items():
        a = h200_table_advice(preset, anchored=False)
        err = a.get("bf16").step_ms / 1e3 / measured_s - 1
        assert -0.16 < err < -0.08, (preset, err)
        assert a.anchor is None and a.get("fp8-tensorwise").speedup_anchored is None
    b = h200_table_advice("1b")
    assert b.anchor["step_ms"] == 258.5 and b.anchor["model_error"] == pytest.approx(-0.126, abs=0.01)
    rw, tw = b.get("fp8-rowwise"), b.get("fp8-tensorwise")
    assert rw.speedup_all_anchored < tw.speedup_all_anchored < tw.speedup_all  # the anchor adds what both share
    assert abs(rw.speedup_all_anchored / 0.97 - 1) < 0.15  # where the rowwise row stands (xfail above at 10%)


def test_measured_bf16_step_is_cached_and_anchors(capsys, tmp_path, monkeypatch):
    """`fp8lab bench` stores a measured bf16 step (perf.measure.store_step_time); advise finds it for
    the same GPU model and configuration only, and says where it came from."""
    monkeypatch.setenv("FP8LAB_CACHE", str(tmp_path))
    save_measured_rates(H200_DOCTOR)
    key = step_key(PRESETS["1b"], tokens=16384, seq_len=512, loss_head="plain", residual_dtype="fp32")
    store_step_time("NVIDIA H200", key=key, step_s=0.2585, source="fp8lab bench, median of 15 steps")
    assert load_step_time("h200", key=key)["step_s"] == 0.2585  # a table id finds the device's entry
    assert load_step_time("NVIDIA H100 80GB HBM3", key=key) is None  # another GPU model
    assert load_step_time("NVIDIA H200", key=dict(key, tokens=8192)) is None
    assert load_step_time("NVIDIA H200", key=dict(key, residual_dtype="compute")) is None  # compute is bf16
    cli = ["advise", "--model", "1b", "--gpu", "h200", "--batch-tokens", "16384", "--seq-len", "512",
           "--loss-head", "plain", "--residual-dtype", "fp32"]
    assert main(cli + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rates"]["source"] == "measured" and d["anchor"]["step_ms"] == 258.5
    assert "fp8lab bench, median of 15 steps on NVIDIA H200" in d["anchor"]["source"]
    by = {r["recipe"]: r for r in d["recipes"]}
    assert by["bf16"]["step_ms_anchored"] == 258.5 and by["fp8-tensorwise"]["speedup_all_anchored"] > 1
    assert main(cli) == 0
    out = capsys.readouterr().out
    assert "measured by fp8lab doctor on NVIDIA H200" in out and "anchor: measured bf16 step 258.5 ms" in out
    assert main(cli + ["--no-anchor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["anchor"] is None
    assert main(cli[:-2] + ["--residual-dtype", "bf16", "--json"]) == 0  # another configuration: no anchor
    assert json.loads(capsys.readouterr().out)["anchor"] is None
    assert main(cli + ["--bf16-step-ms", "300", "--json"]) == 0  # an explicit anchor wins over the cache
    assert json.loads(capsys.readouterr().out)["anchor"]["source"] == "--bf16-step-ms"
    assert main(cli + ["--bf16-step-ms", "0"]) == 2


def test_step_cache_rejects_bad_entries(tmp_path, monkeypatch):
    from fp8lab.errors import FP8LabError

    monkeypatch.setenv("FP8LAB_CACHE", str(tmp_path))
    key = step_key(PRESETS["debug"], tokens=2048, seq_len=256)
    with pytest.raises(FP8LabError, match="positive"):
        store_step_time("NVIDIA H200", key=key, step_s=float("nan"), source="x")
    with pytest.raises(FP8LabError, match="lacks loss_head"):
        store_step_time("NVIDIA H200", key={k: v for k, v in key.items() if k != "loss_head"}, step_s=1.0, source="x")
    (tmp_path / "step_times.json").write_text("{not json")
    assert load_step_time("NVIDIA H200", key=key) is None  # a damaged cache is no anchor, not an error
    store_step_time("NVIDIA H200", key=key, step_s=1.0, source="x")
    assert load_step_time("NVIDIA H200", key=key)["source"] == "x"


def test_loss_head_and_residual_flags(capsys):
    base = ["advise", "--model", "1b", "--gpu", "h200", "--batch-tokens", "16384", "--seq-len", "512", "--json"]
    steps = {}
    for head in ("fused", "plain", "checkpointed"):
        assert main(base + ["--loss-head", head]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["step_settings"]["loss_head"] == head
        steps[head] = d["recipes"][0]["step_ms"]
    assert steps["fused"] < steps["plain"] < steps["checkpointed"]
    assert main(base + ["--residual-dtype", "compute"]) == 0
    assert json.loads(capsys.readouterr().out)["recipes"][0]["step_ms"] < steps["fused"]
    # an FP8 output layer (skip_modules without "output") takes the plain head under a fused config
    a = advise(PRESETS["1b"], gpu="h200", tokens=16384, seq_len=512, skip_modules=(), loss_head="fused")
    tw = a.get("fp8-tensorwise")
    assert "output" in tw.converted and any("plain loss head" in n for n in tw.notes)


def test_advise_vs_measured_script_on_cpu(tmp_path):
    """The prepared GPU check's comparison script: without CUDA it prints predictions only."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "advise_vs_measured.py"), "--preset", "1b",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin",
                               "FP8LAB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads((tmp_path / "advise_vs_measured.json").read_text())
    assert not d["cuda"] and d["gpu"] == "h200"
    rows = d["rows"]
    assert {(r["k"], r["n"]) for r in rows} == {(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)}
    assert all(r["measured"] is None and r["predicted"] > 0 for r in rows)
    assert "predictions only" in (tmp_path / "advise_vs_measured.md").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / "advise_check.sh")]).returncode == 0


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_mfu_never_passes_100_percent(gpu):
    """For every GPU in the table, every recipe advise can print, every rate source it can use
    (a doctor measurement above the datasheet included), small and large models and batches:
    the predicted MFU divides by a peak no kernel of the prediction can beat (issue 11: the
    5090 once read 102%)."""
    spec = GPUS[gpu]
    sources = ["vendor"] + (["microbench"] if spec.alternatives.get("bf16_dense_tflops") else [])
    fast = {"bf16_tflops": spec.bf16_dense_tflops * 1.3, "fp8_tflops": (spec.fp8_fp32acc_tflops or 0) * 1.3 or None,
            "mem_bandwidth_gbs": spec.mem_bandwidth_gbs, "device_name": spec.name, "date": "2026-12-01"}
    seen = 0
    for preset, tokens, seq in (("125m", 2048, 512), ("1b", 16384, 512), ("8b", 65536, 8192)):
        for source, measured in [(s, None) for s in sources] + [("measured", fast)]:
            a = advise(PRESETS[preset], gpu=gpu, tokens=tokens, seq_len=seq, rate_source=source, measured=measured)
            for r in a.recipes:
                if r.supported:
                    assert 0 < r.mfu <= 1.0, (gpu, preset, source, r.recipe, r.mfu)
                    seen += 1
    assert seen >= 3 * (len(sources) + 1)  # bf16 at least, on every model and source


def test_recipes_why_explains_rowwise(capsys):
    assert main(["recipes", "--why"]) == 0
    out = capsys.readouterr().out
    assert "fp8-rowwise: one scale per row, so each operand is cast twice" in out
    assert "0.97x of bf16 where this predicts 1.09x" in out  # the measured step beside the prediction
