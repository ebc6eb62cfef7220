"""fp8lab doctor: the real probes on this CPU, and the GPU logic on stand-in devices.

This machine has no GPU, so the GPU cases replace the functions that read the device
(device_info, probe_*, driver_version) - and only those; fp8lab's capability check, which
decides what a GPU of that capability can run, is the real one."""

from __future__ import annotations

import json

import pytest

from fp8lab.bench import doctor
from fp8lab.bench.doctor import DeviceInfo, probe_collective, read_pins, run_doctor
from fp8lab.cli import main
from fp8lab.env import cpu_has_native_bf16
from helpers import REPO

FP8 = ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp", "mxfp8"]


@pytest.fixture(scope="module")
def cpu_report():
    return run_doctor(measure=False)


def test_cpu_verdict(cpu_report):
    r = cpu_report
    assert r.exit_code == 0 and r.bf16_runs and r.device.kind == "cpu"
    assert r.runs_natively == ["bf16"] and r.runs_emulated == FP8 and not r.unavailable
    by = {c.name: c for c in r.checks}
    # Native bf16 passes; on a CPU without it (AVX2 only) bf16 runs emulated and training uses fp32.
    assert by["recipe bf16 (default)"].status == ("pass" if cpu_has_native_bf16() else "warn")
    assert "emulated" in by["recipe fp8-rowwise"].detail and "not FP8 speed" in by["recipe fp8-rowwise"].detail
    assert by["torch.compile"].status == "pass"  # the real compile probe ran
    assert by["torch"].status == "pass" and by["torchao"].status == "pass"  # the pinned stack
    assert "CPU-only" in by["CUDA"].detail and "not needed on CPU" in by["triton"].detail
    assert all(c.status in ("pass", "warn", "fail", "info") for c in r.checks)
    assert all(c.fix for c in r.checks if c.status in ("warn", "fail"))


def test_cli_json_and_text(capsys, cpu_report, monkeypatch):
    monkeypatch.setattr(doctor, "run_doctor", lambda **kw: cpu_report)  # same report: the probes ran above
    assert main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["exit_code"] == 0 and d["verdict"]["bf16_runs"] and d["verdict"]["runs_emulated"] == FP8
    assert {"name", "status", "detail", "fix"} <= set(d["checks"][0])
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "emulated" in out and "fp8-tensorwise" in out


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_says_whether_it_is_native(monkeypatch, native):
    """The bf16 check on a CPU with and without native bf16 (the oneDNN probe stood in for)."""
    monkeypatch.setattr(doctor, "cpu_has_native_bf16", lambda: native)
    for name in ("probe_converted", "probe_compile"):  # not what this test is about
        monkeypatch.setattr(doctor, name, lambda *a: None)
    c = next(c for c in run_doctor(measure=False).checks if c.name == "recipe bf16 (default)")
    if native:
        assert c.status == "pass" and "runs on CPU" in c.detail
    else:
        assert c.status == "warn" and c.detail.startswith("bf16 emulated, slow: fp32 used") and c.fix


def test_pins():
    pins = read_pins(REPO / "constraints.txt")
    assert pins["torch"] == "2.13.0" and pins["torchao"] == "0.18.0"
    assert read_pins(REPO / "no-such-file.txt") == {}


def fake_gpu(monkeypatch, name: str, cc: tuple[int, int], *, scaled_mm=None, converted=None):
    """Stand in for the device: a CUDA GPU `name` with capability `cc`. Kernel probes answer
    from the dicts (kind/recipe -> error or None) and record what was asked."""
    asked = []
    monkeypatch.setattr(doctor, "device_info", lambda: DeviceInfo("cuda", name, cc, 80.0, 1))
    monkeypatch.setattr(doctor, "probe_bf16", lambda info: None)
    monkeypatch.setattr(doctor, "probe_compile", lambda info: None)
    monkeypatch.setattr(doctor, "driver_version", lambda: "580.95.05")
    monkeypatch.setattr(doctor, "triton_version", lambda: "3.5.0")

    def mm(kind, info):
        asked.append(("scaled_mm", kind))
        return (scaled_mm or {}).get(kind)

    def conv(recipe, info):
        asked.append(("converted", recipe))
        return (converted or {}).get(recipe)

    monkeypatch.setattr(doctor, "probe_scaled_mm", mm)
    monkeypatch.setattr(doctor, "probe_converted", conv)
    return asked


def test_capability_8_0_reports_fp8_unsupported(monkeypatch):
    asked = fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    r = run_doctor(measure=False)
    assert r.exit_code == 0 and r.runs_natively == ["bf16"] and not r.runs_emulated
    assert set(r.unavailable) == set(FP8)
    assert "8.0" in r.unavailable["fp8-tensorwise"] and ">= 8.9" in r.unavailable["fp8-tensorwise"]
    by = {c.name: c for c in r.checks}
    assert by["recipe fp8-tensorwise"].status == "warn" and "unsupported" in by["recipe fp8-tensorwise"].detail
    assert by["GPU"].status == "pass" and "8.0" in by["GPU"].detail
    assert by["GPU table"].status == "pass" and "312" in by["GPU table"].detail
    assert by["driver"].detail.endswith("580.95.05")
    assert asked == []  # the support check refused before any FP8 kernel was launched


def test_hopper_runs_float8_not_mxfp8(monkeypatch):
    asked = fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    r = run_doctor(measure=False)
    assert r.runs_natively == ["bf16", "fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"]
    assert list(r.unavailable) == ["mxfp8"] and "10.0" in r.unavailable["mxfp8"]
    assert ("scaled_mm", "rowwise") in asked and ("converted", "fp8-rowwise") in asked


def test_sm120_probe_failures_are_found_not_guessed(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 5090", (12, 0),
             scaled_mm={"rowwise": "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"},
             converted={"mxfp8": "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED (NT layout)"})
    r = run_doctor(measure=False)
    assert "fp8-tensorwise" in r.runs_natively
    assert "CUBLAS_STATUS_NOT_SUPPORTED" in r.unavailable["fp8-rowwise"]
    assert "kernel probe" in r.unavailable["mxfp8"] and "NT layout" in r.unavailable["mxfp8"]
    assert r.exit_code == 0


def test_bf16_failure_exits_1(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(doctor, "probe_bf16", lambda info: "RuntimeError: CUDA error: no kernel image")
    r = run_doctor(measure=False)
    assert r.exit_code == 1
    c = next(c for c in r.checks if c.name == "recipe bf16 (default)")
    assert c.status == "fail" and "no kernel image" in c.detail and c.fix


def test_collective_probe_with_gloo():
    """The NCCL probe's code path, with gloo on two CPU processes."""
    assert probe_collective(2, backend="gloo", timeout=60) is None
