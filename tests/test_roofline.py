"""The roofline model: rates from the table, per-layer costs, the whole step, memory."""

from __future__ import annotations

import pytest

from fp8lab.errors import FP8LabError
from fp8lab.gpus import GPUS
from fp8lab.models.presets import PRESETS
from fp8lab.perf.memory import predict_memory
from fp8lab.perf.roofline import (
    CONSTANTS,
    GEMM_EFFICIENCY,
    MEM_BW_EFFICIENCY,
    ROWWISE_GEMM_REL,
    anchored_s,
    layer_speedup,
    linear_cost,
    model_linears,
    rates_for,
    step_time,
)
from fp8lab.precision.recipes import RECIPES

FP8 = [r for r in RECIPES if r != "bf16"]


def test_every_constant_has_a_source():
    for name, (value, source) in CONSTANTS.items():
        assert value > 0 and len(source) > 20, name


def test_vendor_rates_are_table_times_efficiency():
    r = rates_for("h100-sxm", source="vendor")
    s = GPUS["h100-sxm"]
    assert r.bf16 == pytest.approx(s.bf16_dense_tflops * GEMM_EFFICIENCY)
    assert r.fp8 == pytest.approx(s.fp8_fp32acc_tflops * GEMM_EFFICIENCY)
    assert r.fp8_rowwise == pytest.approx(r.fp8 * ROWWISE_GEMM_REL)
    assert r.mxfp8 is None
    assert r.mem_gbs == pytest.approx(s.mem_bandwidth_gbs * MEM_BW_EFFICIENCY)
    assert all(v for v in r.sources.values())


def test_rate_sources():
    assert rates_for("h100-sxm").source == "vendor"
    micro = rates_for("rtx5090")  # the table's choice for the 5090
    assert micro.source == "microbench"
    assert micro.bf16 == pytest.approx(GPUS["rtx5090"].alternatives["bf16_dense_tflops"][0] * GEMM_EFFICIENCY)
    assert micro.mxfp8 > 1.9 * micro.fp8  # block-scaled path not throttled in mmapeak
    vendor = rates_for("rtx5090", source="vendor")
    assert vendor.fp8 == pytest.approx(2 * vendor.bf16)
    with pytest.raises(FP8LabError, match="no microbenchmark"):
        rates_for("h100-sxm", source="microbench")
    with pytest.raises(FP8LabError, match="fp8lab doctor"):
        rates_for("h200", source="measured")
    with pytest.raises(FP8LabError, match="unknown GPU"):
        rates_for("tpu-v5")


def test_measured_rates_replace_the_table():
    m = {"device_name": "NVIDIA H200", "date": "2026-01-01T00:00:00Z", "bf16_tflops": 700.0, "fp8_tflops": 1300.0,
         "fp8_rowwise_tflops": None, "mem_bandwidth_gbs": 4000}
    r = rates_for("h200", measured=m)  # auto: measured when given
    assert r.source == "measured" and r.bf16 == 700.0 and r.fp8 == 1300.0 and r.mem_gbs == 4000
    assert r.measured_on == "NVIDIA H200, 2026-01-01T00:00:00Z" and r.to_dict()["measured_on"] == r.measured_on
    assert r.fp8_rowwise == pytest.approx(GPUS["h200"].fp8_fp32acc_tflops * GEMM_EFFICIENCY * ROWWISE_GEMM_REL)
    assert "fp8lab doctor" in r.sources["bf16"] and "doctor" not in r.sources["fp8_rowwise"]


def test_linear_cost_structure():
    r = rates_for("h100-sxm")
    bf16 = linear_cost(8192, 4096, 4096, "bf16", r)
    gemms = [n for n, _ in bf16.kernels if n.startswith("gemm")]
    assert gemms == ["gemm output", "gemm grad_input", "gemm grad_weight"]
    assert bf16.overhead_s > 0  # the fp32 master weight's cast and its gradient's
    for recipe in ("fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"):
        c = linear_cost(8192, 4096, 4096, recipe, r)
        assert c.gemm_s < bf16.gemm_s and c.overhead_s > bf16.overhead_s, recipe
    with pytest.raises(FP8LabError, match="MXFP8"):
        linear_cost(8192, 4096, 4096, "mxfp8", r)
    assert layer_speedup(8192, 4096, 4096, "mxfp8", r) is None
    assert layer_speedup(8192, 4096, 4096, "fp8-tensorwise", rates_for("a100")) is None


@pytest.mark.parametrize("gpu", ["h100-sxm", "h200", "b200"])
def test_layer_speedups_sane(gpu):
    r = rates_for(gpu)
    big = layer_speedup(16384, 8192, 8192, "fp8-tensorwise", r)
    assert 1.4 < big < r.fp8 / r.bf16  # large GEMMs approach, never pass, the GEMM ratio
    assert layer_speedup(512, 256, 256, "fp8-tensorwise", r) < 1  # tiny: casts and launches dominate
    for m in (1024, 4096, 16384):  # more tokens, more gain
        assert layer_speedup(m, 4096, 4096, "fp8-tensorwise", r) < layer_speedup(2 * m, 4096, 4096, "fp8-tensorwise", r)
    for k, n in ((2048, 2048), (4096, 1024), (4096, 14336), (8192, 8192)):
        assert layer_speedup(8192, k, n, "fp8-rowwise", r) < layer_speedup(8192, k, n, "fp8-tensorwise", r)


# Published H100 per-layer measurements, compiled, forward + backward, bf16 weights where fp8lab
# keeps fp32 masters (more cast traffic here): only agreement within 25% is asked.
PUBLISHED_H100 = [
    # (M, K, N, measured speedup, source)
    (1024, 2048, 1024, 0.80, "torchao/float8/README.md (2024), example 1, tensorwise"),
    (4096, 8192, 16384, 1.39, "torchao/float8/README.md (2024), example 2, tensorwise"),
]
# pytorch/ao#2185 (2025-05, "tensorwise w/ rescale" = the rowwise recipe as TorchAO runs it: rowwise
# scales, backward GEMMs on cuBLAS tensorwise plus a rescale), M = 16384. The model is pessimistic
# on all four (-14% to -31%), where on the 1b step of issue 13 it is optimistic for rowwise
# (tests/test_advise.py): both are asserted, as they stand, until a profile explains them.
PUBLISHED_H100_ROWWISE = [
    (16384, 8192, 1280, 1.11, "attn.wqkv"), (16384, 1024, 8192, 1.43, "attn.w0"),
    (16384, 8192, 7168, 1.73, "ffn.w13"), (16384, 3584, 8192, 1.71, "ffn.w2"),
]


@pytest.mark.parametrize("m,k,n,measured,source", PUBLISHED_H100)
def test_layer_prediction_near_published_measurements(m, k, n, measured, source):
    predicted = layer_speedup(m, k, n, "fp8-tensorwise", rates_for("h100-sxm"))
    assert abs(predicted / measured - 1) < 0.25, (predicted, measured, source)
    assert (predicted < 1) == (measured < 1)


@pytest.mark.parametrize("m,k,n,measured,name", PUBLISHED_H100_ROWWISE)
def test_rowwise_layer_prediction_vs_published(m, k, n, measured, name):
    predicted = layer_speedup(m, k, n, "fp8-rowwise", rates_for("h100-sxm"))
    assert 0.65 * measured < predicted < measured, (name, predicted, measured)


def test_rowwise_casts_both_directions():
    """TorchAO 0.18 rowwise: each operand cast along its rows and along its columns (an amax pass,
    then a cast writing the transposed layout), the two backward GEMMs on cuBLAS tensorwise with
    a rescale each; the output GEMM on the rowwise kernel."""
    r = rates_for("h200")
    c = linear_cost(16384, 2048, 2048, "fp8-rowwise", r)
    names = [name for name, _ in c.kernels]
    for operand in ("input", "weight", "grad_output"):
        assert {f"{operand} cast along rows", f"{operand} amax along columns",
                f"{operand} cast along columns, transposed"} <= set(names), operand
    assert {"grad_input rescale", "grad_weight rescale"} <= set(names)
    tw = linear_cost(16384, 2048, 2048, "fp8-tensorwise", r)
    assert c.overhead_s > tw.overhead_s and c.gemm_s == pytest.approx(tw.gemm_s, rel=0.05)
    # narrow outputs: the casts and rescales that scale with M x K outweigh GEMMs that shrink with N
    assert layer_speedup(16384, 2048, 512, "fp8-rowwise", r) < 1 < layer_speedup(16384, 2048, 8192, "fp8-rowwise", r)


def test_loss_heads_and_residual_dtype():
    a, r = PRESETS["1b"], rates_for("h200")
    kw = dict(tokens=16384, seq_len=512, rates=r, recipe="bf16", converted=set())
    loss = {h: step_time(a, loss_head=h, **kw).parts["loss"] for h in ("fused", "plain", "checkpointed")}
    assert loss["fused"] < loss["plain"] < loss["checkpointed"]
    fp32, bf16 = (step_time(a, residual_dtype=d, **kw).parts["norms, RoPE, SwiGLU, residuals"] for d in ("fp32", "bf16"))
    assert 0.6 * fp32 < bf16 < 0.9 * fp32  # residual adds and norm reads halve; RoPE and SwiGLU do not
    assert step_time(a, residual_dtype="compute", **kw).total_s == step_time(a, residual_dtype="bf16", **kw).total_s
    with pytest.raises(FP8LabError, match="fused loss head"):
        step_time(a, tokens=16384, seq_len=512, rates=r, recipe="fp8-tensorwise", converted={"output"})
    with pytest.raises(FP8LabError, match="loss head"):
        step_time(a, loss_head="chunked", **kw)
    with pytest.raises(FP8LabError, match="residual dtype"):
        step_time(a, residual_dtype="fp16", **kw)


def test_anchor_keeps_the_predicted_difference():
    assert anchored_s(0.25, 0.2, 0.17) == pytest.approx(0.22)
    assert anchored_s(0.25, 0.2, 0.2) == pytest.approx(0.25)
    assert anchored_s(0.01, 0.2, 0.1) is None  # an anchor smaller than the predicted gain: another configuration


def test_step_time_parts_and_amdahl():
    a, r = PRESETS["8b"], rates_for("h100-sxm")
    groups = {g.name for g in model_linears(a)} - {"output"}
    base = step_time(a, tokens=8192, seq_len=8192, rates=r, recipe="bf16", converted=set())
    assert all(v > 0 for v in base.parts.values())
    assert base.parts["linear GEMMs"] > base.parts["attention"] > base.parts["loss"]
    fp8 = step_time(a, tokens=8192, seq_len=8192, rates=r, recipe="fp8-tensorwise", converted=groups)
    for part in ("attention", "norms, RoPE, SwiGLU, residuals", "embedding", "loss", "optimizer"):
        assert fp8.parts[part] == base.parts[part]  # BF16 under every recipe
    assert 1 < base.total_s / fp8.total_s < 2
    # sharding the optimizer over 8 GPUs and accumulating micro-batches shrink its share
    sharded = step_time(a, tokens=8192, seq_len=8192, rates=r, recipe="bf16", converted=set(), num_gpus=8, grad_accum=2)
    assert sharded.parts["optimizer"] == pytest.approx(base.parts["optimizer"] / 16)


def test_memory():
    a = PRESETS["8b"]
    one = predict_memory(a, tokens=8192, recipe="bf16", converted=set(), compiled=True)
    assert one.total / 1e9 > GPUS["h100-sxm"].mem_gb  # 8B with AdamW does not fit one 80 GB GPU
    eight = predict_memory(a, tokens=8192, recipe="bf16", converted=set(), num_gpus=8, compiled=True)
    assert eight.total / 1e9 < GPUS["h100-sxm"].mem_gb
    groups = {g.name for g in model_linears(a)} - {"output"}
    tw = predict_memory(a, tokens=8192, recipe="fp8-tensorwise", converted=groups, compiled=True)
    assert tw.parts["low-precision weight copies"] < one.parts["low-precision weight copies"]
    small = predict_memory(PRESETS["125m"], tokens=4096, recipe="bf16", converted=set(), compiled=True)
    assert 1 < small.total / 1e9 < GPUS["rtx5090"].mem_gb