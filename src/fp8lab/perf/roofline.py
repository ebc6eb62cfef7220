"""A roofline model of one training step, per linear layer and for the whole step.

Each kernel costs max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth, launch
overhead). A linear layer is three GEMMs (output, grad_input, grad_weight) plus the
memory-bound kernels its recipe adds: amax reductions, casts to FP8 in one or two layouts,
transposes, rescales, and (in every recipe, BF16 included) the fp32 master weight's cast and
its gradient's cast back to fp32. Everything that is not a linear (attention, norms, RoPE,
SwiGLU, residual adds, embedding, loss, optimizer) stays BF16/fp32 under every recipe and is
costed from its FLOPs and bytes; the step's speedup is Amdahl over the sum.

Kernel structure (which tensor is read and written how often) follows TorchAO's own roofline,
torchao/testing/training/roofline_utils.py (pytorch/ao, commit 0598012), re-derived here for
fp8lab's fp32 master weights. Constants, none fitted to an answer:

* GEMM_EFFICIENCY 0.78 of datasheet peak, MEM_BW_EFFICIENCY 0.92 of peak bandwidth,
  KERNEL_LAUNCH_S 2 us: TorchAO roofline_utils ("experimental observation with sample large
  inputs" on H100; pointwise Triton kernels; a one-element Triton kernel's GPU time). TorchAO
  applies the same GEMM fraction to BF16 and FP8; FBGEMM's H100 numbers agree (8192^3: BF16
  585, FP8 rowwise 1125 TFLOP/s, ratio 1.92; pytorch/FBGEMM#2546).
* ROWWISE_GEMM_REL 0.90: PyTorch's rowwise (CUTLASS) scaled GEMM with fast accumulation runs
  "within 90-100% of tensor-wise efficiency" for most shapes (pytorch/pytorch#147971); we take
  the low end. Without fast accumulation (the two backward GEMMs) TorchAO calls the
  tensorwise cuBLAS GEMM and rescales the output in a separate kernel (torchao
  float8_ops.addmm_float8_unwrapped; pytorch/ao#1325, #2184), costed as such.
* Attention: FlashAttention-2 reaches 35% of peak on H100 (FlashAttention-3 paper,
  arXiv:2407.08608, abstract) and 50-73% on A100 (FlashAttention-2 paper, arXiv:2307.08691);
  we use 0.35 on Hopper and 0.50 elsewhere (an extrapolation for Ada/Blackwell/MI300X).
  Backward is 2.5x the forward FLOPs (5 matmuls vs 2, FlashAttention-2 paper); causal
  attention does half the FLOPs of full attention.

What the model leaves out: wave quantisation and tile effects of small GEMMs (TorchAO notes its
roofline undercounts ~2x for M, K, N <= 1k), fusion of FP8 casts into the previous op (none
assumed: conservative for FP8), communication (FSDP all-gathers, reduce-scatters), activation
checkpointing, CPU overhead, and power/clock limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fp8lab.errors import FP8LabError
from fp8lab.gpus import ADVISOR_RATES, GPUS, GPUSpec, get_gpu, gpu_id_of, mfu_peak
from fp8lab.models.flops import param_counts
from fp8lab.models.llama import ModelArgs
from fp8lab.precision.recipes import RECIPES, Recipe, get_recipe

TORCHAO_ROOFLINE = ("pytorch/ao torchao/testing/training/roofline_utils.py (commit 0598012): "
                    "pct_achievable_gemm_tops, pct_achievable_mem_bw, KERNEL_LAUNCH_OVERHEAD_SEC")
GEMM_EFFICIENCY = 0.78
MEM_BW_EFFICIENCY = 0.92
KERNEL_LAUNCH_S = 2e-6
ROWWISE_GEMM_REL = 0.90
ROWWISE_SOURCE = "pytorch/pytorch#147971 (rowwise vs tensorwise _scaled_mm, fast accum, H100)"
ATTENTION_EFFICIENCY = {"hopper": 0.35, "other": 0.50}
ATTENTION_SOURCE = ("FlashAttention-3 paper arXiv:2407.08608 (FA2: 35% of H100 peak); FlashAttention-2 paper "
                    "arXiv:2307.08691 (50-73% of A100 peak; low end used off Hopper)")
FA_BWD_OVER_FWD = 2.5

CONSTANTS = {
    "gemm_efficiency": (GEMM_EFFICIENCY, TORCHAO_ROOFLINE),
    "mem_bw_efficiency": (MEM_BW_EFFICIENCY, TORCHAO_ROOFLINE),
    "kernel_launch_s": (KERNEL_LAUNCH_S, TORCHAO_ROOFLINE),
    "rowwise_gemm_rel": (ROWWISE_GEMM_REL, ROWWISE_SOURCE),
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

    def mfu_peak(self, recipe: Recipe) -> float:
        """MFU's denominator for `recipe`: the one training uses (gpus.mfu_peak), and never below a
        rate this model uses (a doctor measurement can beat a datasheet), so every kernel's FLOP
        rate is at most this and a predicted MFU cannot pass 100%."""
        used = {"bf16": (self.bf16,), "fp8": (self.fp8, self.fp8_rowwise), "mxfp8": (self.mxfp8,)}
        rates = [r for m in {"bf16", recipe.math} for r in used[m] if r is not None]
        return max(mfu_peak(GPUS[self.gpu_id], recipe.math), *rates)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu_id, "source": self.source, "bf16_tflops": round(self.bf16, 1),
                "fp8_tflops": _r(self.fp8), "fp8_rowwise_tflops": _r(self.fp8_rowwise),
                "mxfp8_tflops": _r(self.mxfp8), "mem_gbs": round(self.mem_gbs), "sources": self.sources}


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
    if source == "measured":
        # Measured figures are achieved rates on large random GEMMs / copies: no efficiency factor.
        where = f"fp8lab doctor on {measured.get('device_name', gpu_id)}, {measured.get('date', '?')}"
        for key, field_ in (("bf16", "bf16_tflops"), ("fp8", "fp8_tflops"), ("fp8_rowwise", "fp8_rowwise_tflops"),
                            ("mxfp8", "mxfp8_tflops"), ("mem_gbs", "mem_bandwidth_gbs")):
            if measured.get(field_) and (key == "bf16" or key == "mem_gbs" or r[key] is not None):
                r[key] = float(measured[field_])
                sources[key] = where
    hopper = spec.compute_capability is not None and spec.compute_capability[0] == 9
    return Rates(gpu_id=gpu_id, gpu_name=spec.name, source=source, bf16_peak=bf16,
                 attention_eff=ATTENTION_EFFICIENCY["hopper" if hopper else "other"], sources=sources, **r)


# -- one linear layer ---------------------------------------------------------------------------


def _mem(rates: Rates, nbytes: float) -> float:
    return max(nbytes / (rates.mem_gbs * 1e9), KERNEL_LAUNCH_S)


def _gemm(rates: Rates, m: int, k: int, n: int, *, tflops: float, in_bytes: float, out_bytes: float = B_BF16) -> float:
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


def linear_cost(m: int, k: int, n: int, recipe: str | Recipe, rates: Rates) -> LinearCost:
    """Forward + backward of one linear (m tokens, k in, n out features) under `recipe`."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    why = supports(recipe, rates)
    if why:
        raise FP8LabError(f"{recipe.name}: {why}")
    x, w, go = m * k, k * n, m * n  # elements of input, weight, grad_output
    mem = lambda nbytes: _mem(rates, nbytes)  # noqa: E731
    launch = KERNEL_LAUNCH_S
    # Weight gradient: the GEMM writes bf16, autograd casts it to the fp32 parameter's dtype.
    grad_to_fp32 = ("grad_weight to fp32", mem(w * (B_BF16 + B_FP32)))
    name = recipe.torchao_recipe
    if recipe.kind == "none":
        g = dict(tflops=rates.bf16, in_bytes=B_BF16)
        ks = [("gemm output", _gemm(rates, m, k, n, **g)), ("gemm grad_input", _gemm(rates, m, n, k, **g)),
              ("gemm grad_weight", _gemm(rates, n, m, k, **g)),
              ("weight fp32->bf16 (autocast)", mem(w * (B_WEIGHT + B_BF16))), grad_to_fp32]
    elif name == "tensorwise":
        g = dict(tflops=rates.fp8, in_bytes=B_FP8)
        ks = [("gemm output", _gemm(rates, m, k, n, **g)), ("gemm grad_input", _gemm(rates, m, n, k, **g)),
              ("gemm grad_weight", _gemm(rates, n, m, k, **g)),
              # per tensor: amax (read) + a second tiny reduction stage + one cast writing both layouts
              ("input amax", mem(x * B_BF16)), ("input amax stage 2", launch),
              ("input cast (2 layouts)", mem(x * (B_BF16 + 2 * B_FP8))),
              ("weight amax", mem(w * B_WEIGHT)), ("weight amax stage 2", launch),
              ("weight cast fwd", mem(w * (B_WEIGHT + B_FP8))), ("weight cast bwd", mem(w * (B_WEIGHT + B_FP8))),
              ("grad_output amax", mem(go * B_BF16)), ("grad_output amax stage 2", launch),
              ("grad_output cast (2 layouts)", mem(go * (B_BF16 + 2 * B_FP8))), grad_to_fp32]
    elif name in ("rowwise", "rowwise_with_gw_hp"):
        # Output GEMM: CUTLASS rowwise with fast accumulation. Backward GEMMs run without fast
        # accumulation: cuBLAS tensorwise plus a separate rescale of the bf16 output.
        ks = [("gemm output", _gemm(rates, m, k, n, tflops=rates.fp8_rowwise, in_bytes=B_FP8)),
              ("gemm grad_input", _gemm(rates, m, n, k, tflops=rates.fp8, in_bytes=B_FP8)),
              ("grad_input rescale", mem(x * 2 * B_BF16))]
        if name == "rowwise":
            ks += [("gemm grad_weight", _gemm(rates, n, m, k, tflops=rates.fp8, in_bytes=B_FP8)),
                   ("grad_weight rescale", mem(w * 2 * B_BF16)),
                   # per tensor: cast along dim 0 + a transposed bf16 copy, then cast the copy
                   ("input cast dim0 + transpose", mem(x * (B_BF16 + B_FP8 + B_BF16))),
                   ("input cast dim1", mem(x * (B_BF16 + B_FP8))),
                   ("weight cast dim0", mem(w * (B_WEIGHT + B_FP8))), ("weight transpose", mem(w * 2 * B_WEIGHT)),
                   ("weight cast dim1", mem(w * (B_WEIGHT + B_FP8))),
                   ("grad_output cast dim0 + transpose", mem(go * (B_BF16 + B_FP8 + B_BF16))),
                   ("grad_output cast dim1", mem(go * (B_BF16 + B_FP8)))]
        else:  # grad_weight in bf16 from the saved high-precision tensors; weight tensorwise for grad_input
            ks += [("gemm grad_weight (bf16)", _gemm(rates, n, m, k, tflops=rates.bf16, in_bytes=B_BF16)),
                   ("input cast dim0", mem(x * (B_BF16 + B_FP8))),
                   ("weight cast rowwise", mem(w * (B_WEIGHT + B_FP8))), ("weight scale reduce", launch),
                   ("weight cast tensorwise", mem(w * (B_WEIGHT + B_FP8))),
                   ("grad_output cast dim0", mem(go * (B_BF16 + B_FP8)))]
        ks.append(grad_to_fp32)
    elif recipe.kind == "mxfp8":
        sb = B_FP8 / 32  # one e8m0 scale byte per 32 elements
        g = dict(tflops=rates.mxfp8, in_bytes=B_FP8 + sb)
        ks = [("gemm output", _gemm(rates, m, k, n, **g)), ("gemm grad_input", _gemm(rates, m, n, k, **g)),
              ("gemm grad_weight", _gemm(rates, n, m, k, **g))]
        for label, numel, src in (("input", x, B_BF16), ("weight", w, B_WEIGHT), ("grad_output", go, B_BF16)):
            # block scales come out of the cast kernel itself: no separate amax pass
            ks += [(f"{label} cast dim0", mem(numel * (src + B_FP8 + sb))),
                   (f"{label} cast dim1", mem(numel * (src + B_FP8 + sb)))]
        ks += [(f"scale swizzle {i}", mem(2 * sb * max(x, w, go))) for i in range(6)]  # 2 per GEMM
        ks.append(grad_to_fp32)
    else:
        raise AssertionError(f"no cost model for recipe {recipe.name}")
    return LinearCost(recipe.name, tuple(ks))


def layer_speedup(m: int, k: int, n: int, recipe: str | Recipe, rates: Rates) -> float | None:
    """bf16 time / recipe time for one linear's forward + backward; None if unsupported."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if supports(recipe, rates):
        return None
    return linear_cost(m, k, n, "bf16", rates).total_s / linear_cost(m, k, n, recipe, rates).total_s


# -- the whole step -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGroup:
    """Identical linears across blocks, named by their suffix ('attention.wq')."""
    name: str
    k: int  # in_features
    n: int  # out_features
    count: int


def model_linears(args: ModelArgs) -> list[LinearGroup]:
    """The model's nn.Linear layers (names as in models/llama.py), grouped across blocks."""
    d, hd, L = args.dim, args.head_dim, args.n_layers
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    return [LinearGroup("attention.wq", d, q, L), LinearGroup("attention.wk", d, kv, L),
            LinearGroup("attention.wv", d, kv, L), LinearGroup("attention.wo", q, d, L),
            LinearGroup("feed_forward.w1", d, args.ffn_dim, L), LinearGroup("feed_forward.w3", d, args.ffn_dim, L),
            LinearGroup("feed_forward.w2", args.ffn_dim, d, L), LinearGroup("output", d, args.vocab_size, 1)]


@dataclass(frozen=True)
class StepTime:
    parts: dict[str, float]  # seconds per micro-batch, by part

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())


def step_time(args: ModelArgs, *, tokens: int, seq_len: int, rates: Rates, recipe: str, converted: set[str],
              grad_accum: int = 1, num_gpus: int = 1) -> StepTime:
    """Seconds per micro-batch of `tokens` tokens (sequences of `seq_len`): the linears in
    `converted` (group names) under `recipe`, everything else BF16. The optimizer step is
    amortised over `grad_accum` micro-batches and sharded over `num_gpus` (FSDP2)."""
    m, d, L = tokens, args.dim, args.n_layers
    kv = args.n_kv_heads * args.head_dim
    gemm = casts = 0.0
    for g in model_linears(args):
        cost = linear_cost(m, g.k, g.n, recipe if g.name in converted else "bf16", rates)
        gemm += g.count * cost.gemm_s
        casts += g.count * cost.overhead_s
    # Causal attention: 2 matmuls of 2*T*d_attn FLOPs per token (full), halved; backward 2.5x.
    attn_fwd = 2.0 * seq_len * args.n_heads * args.head_dim * m * L
    attention = attn_fwd * (1 + FA_BWD_OVER_FWD) / (rates.attention_eff * rates.bf16_peak * 1e12)
    # Pointwise work of a compiled block, bytes per token (bf16 activations, fp32 residual):
    # two RMSNorms (read fp32 4d, write bf16 2d), RoPE on q and k, two residual adds (read 4d +
    # 2d, write 4d), SwiGLU (read 2 x 2f, write 2f); backward moves about twice the forward.
    fwd_bytes = 2 * 6 * d + 2 * B_BF16 * (d + kv) + 2 * 10 * d + 3 * B_BF16 * args.ffn_dim
    kernels_per_block = 15  # ~5 fused pointwise groups forward, ~10 backward
    elementwise = L * (3 * fwd_bytes * m / (rates.mem_gbs * 1e9) + kernels_per_block * KERNEL_LAUNCH_S)
    elementwise += _mem(rates, 18 * d * m)  # final norm, forward and backward
    V = args.vocab_size
    embedding = _mem(rates, 8 * m * d) + _mem(rates, B_FP32 * V * d) + _mem(rates, 12 * m * d)
    # Loss: logits.float() (2+4), log_softmax (4+4), its backward (4+4+4), cast back (4+2) bytes/logit.
    loss = 4 * _mem(rates, 8 * m * V)
    # AdamW (fused): read param, grad, m, v, write param, m, v = 28 B; clip_grad_norm_: 12 B.
    n_params = param_counts(args).total
    optimizer = _mem(rates, 40 * n_params / num_gpus) / grad_accum
    return StepTime({"linear GEMMs": gemm, "linear casts and scales": casts, "attention": attention,
                     "norms, RoPE, SwiGLU, residuals": elementwise, "embedding": embedding, "loss": loss,
                     "optimizer": optimizer})


def all_recipes() -> list[str]:
    return list(RECIPES)
