"""One linear layer's forward + backward under each recipe, kernel by kernel, and the rates the
model prices kernels at. The whole step (perf/roofline.py) sums these over the model's linears.

A linear is three GEMMs (output, grad_input, grad_weight) plus the memory-bound kernels its recipe
adds; each kernel costs max(FLOPs / rate, bytes / bandwidth, one launch). Which tensor is read and
written how often, per recipe, is read off TorchAO 0.18's code (torchao/float8/float8_linear.py
matmul_with_hp_or_float8_args, float8_ops.preprocess_addmm and addmm_float8_unwrapped, config.py
Float8LinearConfig.from_recipe_name) and compared with TorchAO's own byte model
(torchao/testing/training/roofline_utils.py); fp8lab's master weights are fp32, so weight casts
read 4 bytes an element. Constants, none fitted to an answer, each with its source in CONSTANTS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fp8lab.errors import FP8LabError
from fp8lab.gpus import ADVISOR_RATES, GPUS, GPUSpec, get_gpu, gpu_id_of, mfu_peak
from fp8lab.precision.recipes import Recipe, get_recipe

TORCHAO_ROOFLINE = ("pytorch/ao torchao/testing/training/roofline_utils.py (commit 0598012): "
                    "pct_achievable_gemm_tops, pct_achievable_mem_bw, KERNEL_LAUNCH_OVERHEAD_SEC")
GEMM_EFFICIENCY = 0.78
MEM_BW_EFFICIENCY = 0.92
KERNEL_LAUNCH_S = 2e-6
ROWWISE_GEMM_REL = 0.90
ROWWISE_SOURCE = "pytorch/pytorch#147971 (rowwise vs tensorwise _scaled_mm, fast accum, H100)"
# A cast that writes the transposed layout a backward GEMM needs reaches ~1.4 TB/s on an H100
# where TorchAO's other FP8 cast kernels reach ~2.2 TB/s: 0.64 of the bandwidth.
TRANSPOSE_BW_REL = 1.4 / 2.2
TRANSPOSE_SOURCE = ("pytorch/pytorch#133242 (vkuzo, 2024-08-12: float8 cast + transpose of grad_output tops out "
                    "at ~1.4 TB/s on H100, other float8 overhead kernels at ~2.2 TB/s)")
ATTENTION_EFFICIENCY = {"hopper": 0.35, "other": 0.50}
ATTENTION_SOURCE = ("FlashAttention-3 paper arXiv:2407.08608 (FA2: 35% of H100 peak); FlashAttention-2 paper "
                    "arXiv:2307.08691 (50-73% of A100 peak; low end used off Hopper)")
FA_BWD_OVER_FWD = 2.5

CONSTANTS = {
    "gemm_efficiency": (GEMM_EFFICIENCY, TORCHAO_ROOFLINE),
    "mem_bw_efficiency": (MEM_BW_EFFICIENCY, TORCHAO_ROOFLINE),
    "kernel_launch_s": (KERNEL_LAUNCH_S, TORCHAO_ROOFLINE),
    "rowwise_gemm_rel": (ROWWISE_GEMM_REL, ROWWISE_SOURCE),
    "transpose_bw_rel": (TRANSPOSE_BW_REL, TRANSPOSE_SOURCE),
    "attention_efficiency_hopper": (ATTENTION_EFFICIENCY["hopper"], ATTENTION_SOURCE),
    "attention_efficiency_other": (ATTENTION_EFFICIENCY["other"], ATTENTION_SOURCE),
    "attention_bwd_over_fwd": (FA_BWD_OVER_FWD, ATTENTION_SOURCE),
}

B_BF16, B_FP8, B_FP32 = 2, 1, 4
B_WEIGHT = B_FP32  # fp8lab keeps fp32 master weights under every recipe


@dataclass(frozen=True)
class Rates:
    """Achievable rates of one GPU, as the model uses them (already times the efficiency)."""
    gpu_id: str
    gpu_name: str
    source: str  # "vendor", "microbench" or "measured"
    bf16: float  # TFLOP/s
    fp8: float | None  # tensorwise cuBLAS FP8, FP32 accumulate; None: no FP8
    fp8_rowwise: float | None
    mxfp8: float | None  # None: no MXFP8
    mem_gbs: float
    bf16_peak: float  # the peak attention efficiency refers to
    attention_eff: float
    sources: dict[str, str] = field(default_factory=dict)
    measured_on: str | None = None  # "NVIDIA H200, 2026-11-30T...": where doctor measured, when source is measured

    def mfu_peak(self, recipe: Recipe) -> float:
        """MFU's denominator for `recipe`: the one training uses (gpus.mfu_peak), and never below a
        rate this model uses (a doctor measurement can beat a datasheet), so every kernel's FLOP
        rate is at most this and a predicted MFU cannot pass 100%."""
        used = {"bf16": (self.bf16,), "fp8": (self.fp8, self.fp8_rowwise), "mxfp8": (self.mxfp8,)}
        rates = [r for m in {"bf16", recipe.math} for r in used[m] if r is not None]
        return max(mfu_peak(GPUS[self.gpu_id], recipe.math), *rates)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu_id, "source": self.source, "measured_on": self.measured_on,
                "bf16_tflops": round(self.bf16, 1), "fp8_tflops": _r(self.fp8),
                "fp8_rowwise_tflops": _r(self.fp8_rowwise), "mxfp8_tflops": _r(self.mxfp8),
                "mem_gbs": round(self.mem_gbs), "sources": self.sources}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def rates_for(gpu: str | GPUSpec, *, source: str = "auto", measured: dict | None = None) -> Rates:
    """The model's rates for `gpu` from its datasheet ("vendor"), the microbenchmark in the
    table's `alternatives` ("microbench"), `fp8lab doctor`'s measurement ("measured", the dict
    perf.measure stores), or "auto": measured when given, else ADVISOR_RATES."""
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    gpu_id = gpu_id_of(spec)
    if source == "auto":
        source = "measured" if measured else ADVISOR_RATES[gpu_id]
    if source not in ("vendor", "microbench", "measured"):
        raise FP8LabError(f"unknown rate source {source!r}: use auto, vendor, microbench or measured")
    if source == "microbench" and not any(f in spec.alternatives for f in ("bf16_dense_tflops", "mxfp8_tflops")):
        raise FP8LabError(f"{gpu_id} has no microbenchmark rates in fp8lab's table; use --rates vendor")
    if source == "measured" and not measured:
        raise FP8LabError(f"no measured rates for {gpu_id}: run `fp8lab doctor` on that GPU first, "
                          "or use --rates vendor")

    base = ADVISOR_RATES[gpu_id] if source == "measured" else source  # for what was not measured

    def peak(name: str) -> tuple[float | None, str]:
        value, src = getattr(spec, name), spec.sources.get(name, "")
        if base == "microbench" and name in spec.alternatives and value is not None:
            value, src = spec.alternatives[name]
        return value, src

    bf16, s_bf16 = peak("bf16_dense_tflops")
    fp8, s_fp8 = peak("fp8_fp32acc_tflops")
    mx, s_mx = peak("mxfp8_tflops")
    eff = f" x {GEMM_EFFICIENCY} ({TORCHAO_ROOFLINE})"
    r = dict(bf16=bf16 * GEMM_EFFICIENCY, fp8=fp8 and fp8 * GEMM_EFFICIENCY,
             fp8_rowwise=fp8 and fp8 * GEMM_EFFICIENCY * ROWWISE_GEMM_REL, mxfp8=mx and mx * GEMM_EFFICIENCY,
             mem_gbs=spec.mem_bandwidth_gbs * MEM_BW_EFFICIENCY)
    sources = {"bf16": s_bf16 + eff, "fp8": s_fp8 + eff if fp8 else "unsupported",
               "fp8_rowwise": f"fp8 x {ROWWISE_GEMM_REL} ({ROWWISE_SOURCE})" if fp8 else "unsupported",
               "mxfp8": s_mx + eff if mx else "unsupported",
               "mem_gbs": spec.sources.get("mem_bandwidth_gbs", "") + f" x {MEM_BW_EFFICIENCY} ({TORCHAO_ROOFLINE})"}
    where = None
    if source == "measured":
        # Measured figures are achieved rates on large random GEMMs / copies: no efficiency factor.
        where = f"{measured.get('device_name', gpu_id)}, {measured.get('date', '?')}"
        for key, field_ in (("bf16", "bf16_tflops"), ("fp8", "fp8_tflops"), ("fp8_rowwise", "fp8_rowwise_tflops"),
                            ("mxfp8", "mxfp8_tflops"), ("mem_gbs", "mem_bandwidth_gbs")):
            if measured.get(field_) and (key == "bf16" or key == "mem_gbs" or r[key] is not None):
                r[key] = float(measured[field_])
                sources[key] = f"fp8lab doctor on {where}"
    hopper = spec.compute_capability is not None and spec.compute_capability[0] == 9
    return Rates(gpu_id=gpu_id, gpu_name=spec.name, source=source, bf16_peak=bf16,
                 attention_eff=ATTENTION_EFFICIENCY["hopper" if hopper else "other"], sources=sources,
                 measured_on=where, **r)


# -- kernels ------------------------------------------------------------------------------------


def mem_s(rates: Rates, nbytes: float, *, transposed: bool = False) -> float:
    """A memory-bound kernel moving `nbytes`; `transposed`: it writes a transposed layout, which
    runs at TRANSPOSE_BW_REL of the bandwidth. Never below one launch."""
    bw = rates.mem_gbs * 1e9 * (TRANSPOSE_BW_REL if transposed else 1.0)
    return max(nbytes / bw, KERNEL_LAUNCH_S)


def gemm_s(rates: Rates, m: int, k: int, n: int, *, tflops: float, in_bytes: float, out_bytes: float = B_BF16) -> float:
    """(m x k) @ (k x n): compute- or memory-bound, never below one launch."""
    compute = 2.0 * m * k * n / (tflops * 1e12)
    memory = ((m * k + k * n) * in_bytes + m * n * out_bytes) / (rates.mem_gbs * 1e9)
    return max(compute, memory, KERNEL_LAUNCH_S)


@dataclass(frozen=True)
class LinearCost:
    recipe: str
    kernels: tuple[tuple[str, float], ...]  # (what, seconds), GEMMs first

    @property
    def total_s(self) -> float:
        return sum(t for _, t in self.kernels)

    @property
    def gemm_s(self) -> float:
        return sum(t for name, t in self.kernels if name.startswith("gemm"))

    @property
    def overhead_s(self) -> float:
        return self.total_s - self.gemm_s


def supports(recipe: Recipe, rates: Rates) -> str | None:
    """None when `rates`' GPU has the tensor cores `recipe` needs, else why not."""
    if recipe.kind == "float8" and rates.fp8 is None:
        return f"{rates.gpu_id} has no FP8 tensor cores"
    if recipe.kind == "mxfp8" and rates.mxfp8 is None:
        return f"{rates.gpu_id} has no MXFP8 (block-scaled) tensor cores"
    return None


def _three_gemms(rates: Rates, m: int, k: int, n: int, *, tflops: float, in_bytes: float) -> list[tuple[str, float]]:
    g = dict(tflops=tflops, in_bytes=in_bytes)
    return [("gemm output", gemm_s(rates, m, k, n, **g)), ("gemm grad_input", gemm_s(rates, m, n, k, **g)),
            ("gemm grad_weight", gemm_s(rates, n, m, k, **g))]


def _bf16(rates: Rates, m: int, k: int, n: int) -> list[tuple[str, float]]:
    w = k * n
    return _three_gemms(rates, m, k, n, tflops=rates.bf16, in_bytes=B_BF16) + [
        ("weight fp32->bf16 (autocast)", mem_s(rates, w * (B_WEIGHT + B_BF16)))]


def _tensorwise(rates: Rates, m: int, k: int, n: int) -> list[tuple[str, float]]:
    """TorchAO tensorwise: per tensor an amax (and a one-block second stage), then a cast; the
    activations' casts also write the transposed copy their backward GEMM takes."""
    x, w, go = m * k, k * n, m * n
    mem, launch = (lambda nb, t=False: mem_s(rates, nb, transposed=t)), KERNEL_LAUNCH_S
    return _three_gemms(rates, m, k, n, tflops=rates.fp8, in_bytes=B_FP8) + [
        ("input amax", mem(x * B_BF16)), ("input amax stage 2", launch),
        ("input cast (2 layouts)", mem(x * (B_BF16 + 2 * B_FP8), True)),
        ("weight amax", mem(w * B_WEIGHT)), ("weight amax stage 2", launch),
        ("weight cast fwd", mem(w * (B_WEIGHT + B_FP8))), ("weight cast bwd (transposed)", mem(w * (B_WEIGHT + B_FP8), True)),
        ("grad_output amax", mem(go * B_BF16)), ("grad_output amax stage 2", launch),
        ("grad_output cast (2 layouts)", mem(go * (B_BF16 + 2 * B_FP8), True))]


def _axiswise_casts(rates: Rates, label: str, numel: int, src: int) -> list[tuple[str, float]]:
    """One tensor under rowwise scaling, both directions, as TorchAO 0.18 runs them compiled:
    along its rows, one kernel (a row fits on chip: amax and cast in one read); along its columns,
    an amax pass down the columns, then a cast that writes the transposed layout the backward
    GEMM wants (preprocess_addmm's .t().contiguous(), fused into the cast)."""
    return [(f"{label} cast along rows", mem_s(rates, numel * (src + B_FP8))),
            (f"{label} amax along columns", mem_s(rates, numel * src)),
            (f"{label} cast along columns, transposed", mem_s(rates, numel * (src + B_FP8), transposed=True))]


def _rowwise(rates: Rates, m: int, k: int, n: int) -> list[tuple[str, float]]:
    """TorchAO rowwise (Float8LinearConfig.from_recipe_name("rowwise")): every operand scaled per
    row (axiswise, power-of-two scales), e4m3 throughout. Only the output GEMM has fast
    accumulation; without it the rowwise CUTLASS kernel is so slow that TorchAO runs the two
    backward GEMMs on the tensorwise cuBLAS kernel with unit scales and multiplies the scales
    into the bf16 result in a separate kernel (float8_ops.addmm_float8_unwrapped; pytorch/ao#2184)."""
    x, w, go = m * k, k * n, m * n
    return [("gemm output", gemm_s(rates, m, k, n, tflops=rates.fp8_rowwise, in_bytes=B_FP8)),
            ("gemm grad_input", gemm_s(rates, m, n, k, tflops=rates.fp8, in_bytes=B_FP8)),
            ("gemm grad_weight", gemm_s(rates, n, m, k, tflops=rates.fp8, in_bytes=B_FP8)),
            ("grad_input rescale", mem_s(rates, x * 2 * B_BF16)), ("grad_weight rescale", mem_s(rates, w * 2 * B_BF16)),
            *_axiswise_casts(rates, "input", x, B_BF16), *_axiswise_casts(rates, "weight", w, B_WEIGHT),
            *_axiswise_casts(rates, "grad_output", go, B_BF16)]


def _rowwise_gw_hp(rates: Rates, m: int, k: int, n: int) -> list[tuple[str, float]]:
    """rowwise_with_gw_hp: output rowwise, grad_input against a tensorwise weight (still the
    rescale: grad_output's scales are per row), grad_weight in bf16 from the saved bf16 input."""
    x, w, go = m * k, k * n, m * n
    mem = lambda nb, t=False: mem_s(rates, nb, transposed=t)  # noqa: E731
    return [("gemm output", gemm_s(rates, m, k, n, tflops=rates.fp8_rowwise, in_bytes=B_FP8)),
            ("gemm grad_input", gemm_s(rates, m, n, k, tflops=rates.fp8, in_bytes=B_FP8)),
            ("gemm grad_weight (bf16)", gemm_s(rates, n, m, k, tflops=rates.bf16, in_bytes=B_BF16)),
            ("grad_input rescale", mem(x * 2 * B_BF16)),
            ("input cast along rows", mem(x * (B_BF16 + B_FP8))),
            ("weight cast along rows", mem(w * (B_WEIGHT + B_FP8))), ("weight scale to tensorwise", KERNEL_LAUNCH_S),
            ("weight cast tensorwise, transposed", mem(w * (B_WEIGHT + B_FP8), True)),
            ("grad_output cast along rows", mem(go * (B_BF16 + B_FP8)))]


def _mxfp8(rates: Rates, m: int, k: int, n: int) -> list[tuple[str, float]]:
    x, w, go = m * k, k * n, m * n
    sb = B_FP8 / 32  # one e8m0 scale byte per 32 elements
    ks = _three_gemms(rates, m, k, n, tflops=rates.mxfp8, in_bytes=B_FP8 + sb)
    for label, numel, src in (("input", x, B_BF16), ("weight", w, B_WEIGHT), ("grad_output", go, B_BF16)):
        # block scales come out of the cast kernel itself: no separate amax pass
        ks += [(f"{label} cast dim0", mem_s(rates, numel * (src + B_FP8 + sb))),
               (f"{label} cast dim1", mem_s(rates, numel * (src + B_FP8 + sb)))]
    return ks + [(f"scale swizzle {i}", mem_s(rates, 2 * sb * max(x, w, go))) for i in range(6)]  # 2 per GEMM


def linear_cost(m: int, k: int, n: int, recipe: str | Recipe, rates: Rates) -> LinearCost:
    """Forward + backward of one linear (m tokens, k in, n out features) under `recipe`."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    why = supports(recipe, rates)
    if why:
        raise FP8LabError(f"{recipe.name}: {why}")
    name = recipe.torchao_recipe
    if recipe.kind == "none":
        ks = _bf16(rates, m, k, n)
    elif name == "tensorwise":
        ks = _tensorwise(rates, m, k, n)
    elif name == "rowwise":
        ks = _rowwise(rates, m, k, n)
    elif name == "rowwise_with_gw_hp":
        ks = _rowwise_gw_hp(rates, m, k, n)
    elif recipe.kind == "mxfp8":
        ks = _mxfp8(rates, m, k, n)
    else:
        raise AssertionError(f"no cost model for recipe {recipe.name}")
    # Weight gradient: every GEMM writes bf16; autograd casts it to the fp32 parameter's dtype.
    ks.append(("grad_weight to fp32", mem_s(rates, k * n * (B_BF16 + B_FP32))))
    return LinearCost(recipe.name, tuple(ks))


def layer_speedup(m: int, k: int, n: int, recipe: str | Recipe, rates: Rates) -> float | None:
    """bf16 time / recipe time for one linear's forward + backward; None if unsupported."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if supports(recipe, rates):
        return None
    return linear_cost(m, k, n, "bf16", rates).total_s / linear_cost(m, k, n, recipe, rates).total_s
