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
from fp8lab.perf.measure import save_measured_rates
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
