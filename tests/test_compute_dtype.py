"""precision.compute_dtype: bf16 autocast where the CPU has native bf16, fp32 where it would be
emulated (~25x slower), said once and recorded; and labels that say which dtype ran."""

from __future__ import annotations

import json

import pytest
import torch

from fp8lab import env
from fp8lab.precision import get_recipe, support
from fp8lab.precision.support import CPU_FP8_FP32_NOTE, CPU_NO_BF16_NOTE, resolve_compute_dtype, run_label
from fp8lab.train.logs import read_jsonl
from fp8lab.train.trainer import train
from helpers import tiny_config

CPU = torch.device("cpu")


def test_the_real_probe_answers_what_onednn_says():
    assert env.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(support, "cpu_has_native_bf16", lambda: native)
    dtype, note = resolve_compute_dtype("auto", low_precision=False, device=CPU)
    assert (dtype, note) == ((torch.bfloat16, None) if native else (torch.float32, CPU_NO_BF16_NOTE))
    forced, why = resolve_compute_dtype("bf16", low_precision=False, device=CPU)  # the user's word wins, loudly
    assert forced == torch.bfloat16 and (why is None) == native
    assert resolve_compute_dtype("fp32", low_precision=False, device=CPU) == (torch.float32, None)
    # FP8 on CPU computes in fp32 whatever the CPU (TorchAO's emulation and CPU autocast disagree)
    assert resolve_compute_dtype("auto", low_precision=True, device=CPU) == (torch.float32, CPU_FP8_FP32_NOTE)


def test_labels_say_what_ran():
    bf16, fp8 = get_recipe("bf16"), get_recipe("fp8-rowwise")
    assert run_label(bf16, torch.bfloat16, setting="auto") == "bf16"
    assert run_label(bf16, torch.bfloat16, setting="bf16") == "bf16"
    assert run_label(fp8, torch.float32, setting="auto") == "fp8-rowwise"
    assert run_label(bf16, torch.float32, setting="fp32") == "fp32 (bf16 recipe, precision.compute_dtype=fp32)"
    # auto computing in fp32 for the bf16 recipe: only a CPU without native bf16 does that
    assert run_label(bf16, torch.float32, setting="auto") == "fp32 (bf16 recipe on a CPU without native bf16)"


def test_an_explicit_fp32_run_says_so(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, **{"train.steps": 2, "precision.compute_dtype": "fp32"}), tmp_path / "R")
    assert summary["compute_dtype"] == "float32"
    assert summary["label"] == "fp32 (bf16 recipe, precision.compute_dtype=fp32)"


def test_a_run_without_native_bf16_trains_in_fp32_and_says_so(monkeypatch, tiny_data, tmp_path, capsys):
    monkeypatch.setattr(support, "cpu_has_native_bf16", lambda: False)
    summary = train(tiny_config(tiny_data, **{"train.steps": 2}), tmp_path / "R")
    assert summary["compute_dtype"] == "float32" and summary["recipe"] == "bf16"
    assert summary["label"] == "fp32 (bf16 recipe on a CPU without native bf16)"
    assert CPU_NO_BF16_NOTE in summary["notes"]
    first = read_jsonl(tmp_path / "R" / "metrics.jsonl")[0]
    assert first["compute_dtype"] == "float32" and first["label"] == summary["label"]
    out = capsys.readouterr().out
    assert "recipe fp32 (bf16 recipe on a CPU without native bf16)" in out and "no native bf16" in out


def test_bf16_autocast_runs_on_every_cpu(tiny_data, tmp_path):
    """The bf16-autocast CPU path, forced, on any CPU (emulated where not native: kept tiny)."""
    summary = train(tiny_config(tiny_data, **{"train.steps": 2, "precision.compute_dtype": "bf16"}), tmp_path / "R")
    assert summary["compute_dtype"] == "bfloat16" and summary["label"] == "bf16"
    assert summary["final_train_loss"] is not None and summary["final_eval_loss"] is not None
    assert json.loads((tmp_path / "R" / "summary.json").read_text())["label"] == "bf16"
