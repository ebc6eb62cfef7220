"""`fp8lab advise`: per recipe, the predicted step speedup over BF16, memory, the layers worth
converting, the recommendation, and the caveats of the GPU, from perf.roofline.

Pure arithmetic on the model's shape, the GPU table, and what `fp8lab doctor` / `fp8lab bench`
measured on the card (rates; a bf16 step to anchor to): nothing is run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fp8lab.gpus import ADVISOR_RATES_WHY, GPUS, MEASURED_GEMMS, get_gpu, gpu_id_of
from fp8lab.models.flops import flops_per_token, param_counts
from fp8lab.models.llama import ModelArgs
from fp8lab.perf.layer_policy import WIN_MARGIN
from fp8lab.perf.memory import predict_memory
from fp8lab.perf.roofline import (
    CONSTANTS,
    Rates,
    anchored_s,
    layer_speedup,
    model_linears,
    rates_for,
    step_time,
    supports,
)
from fp8lab.precision.convert import eligible
from fp8lab.precision.recipes import RECIPES, get_recipe

RECOMMEND_MARGIN = 1.05  # a recipe is recommended over bf16 only if the whole step is 5% faster


@dataclass
class RecipeAdvice:
    recipe: str
    supported: bool
    speedup: float | None  # step speedup over bf16, converting the layers worth converting
    speedup_all: float | None  # converting every eligible linear (precision.filter_mode=all)
    step_ms: float | None
    tokens_per_s: float | None
    mfu: float | None  # against the peak of the fastest math the recipe runs (Rates.mfu_peak), as training reports it
    memory_gb: float | None
    fits: bool | None
    converted: list[str] = field(default_factory=list)  # linear groups worth converting
    layer_speedups: dict[str, float] = field(default_factory=dict)  # group -> predicted x of bf16
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    memory_breakdown_gb: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Anchored to a measured bf16 step (perf.roofline.anchored_s); None without an anchor.
    step_ms_anchored: float | None = None
    speedup_anchored: float | None = None
    speedup_all_anchored: float | None = None
    tokens_per_s_anchored: float | None = None


@dataclass
class Advice:
    model: dict
    gpu: dict
    rates: dict
    tokens: int
    seq_len: int
    grad_accum: int
    num_gpus: int
    recipes: list[RecipeAdvice]
    memory_settings: dict  # optimizer, activation_checkpoint, loss_chunk_tokens the memory is predicted for
    step_settings: dict  # loss_head, residual_dtype, loss_chunk_tokens the step time is predicted for
    anchor: dict | None  # the measured bf16 step: step_ms, source, predicted_ms (un-anchored), error
    recommended: str
    why: str
    caveats: list[str]
    constants: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def get(self, recipe: str) -> RecipeAdvice:
        return next(r for r in self.recipes if r.recipe == recipe)


def _caveats(gpu_id: str, rates: Rates, args: ModelArgs, skip_modules: list[str], step_kw: dict) -> list[str]:
    """What the prediction rests on and what it leaves out, for this GPU. `step_kw`: step_time's
    settings besides the rates, recipe and converted layers."""
    spec = GPUS[gpu_id]
    cc = spec.compute_capability
    why = ADVISOR_RATES_WHY.get(gpu_id) if rates.source == "microbench" else None
    out = [f"rate source: {rates.source}" + (f" - {why}" if why else "")
           + (f" (fp8lab doctor on {rates.measured_on})" if rates.measured_on else "")]
    if spec.fp8_fp16acc_tflops is not None:
        out.append(f"GeForce: FP8 with FP32 accumulation (what training's torch._scaled_mm uses) runs at half the "
                   f"FP16-accumulate rate ({spec.fp8_fp32acc_tflops:g} vs {spec.fp8_fp16acc_tflops:g} TFLOP/s "
                   "in NVIDIA's table)")
    if gpu_id in MEASURED_GEMMS:
        out.append("whole-GEMM measurements on random data: " + "; ".join(
            f"{what}: {v:g} TFLOP/s ({src})" for what, v, src in MEASURED_GEMMS[gpu_id]))
    if gpu_id in ADVISOR_RATES_WHY and rates.source != "measured":
        other = "vendor" if rates.source == "microbench" else "microbench"
        alt = rates_for(gpu_id, source=other)
        kw = dict(step_kw, rates=alt)
        head = kw.pop("loss_head")
        base = step_time(args, recipe="bf16", converted=set(), loss_head=head, **kw).total_s
        parts = []
        for r in ("fp8-tensorwise", "mxfp8"):
            if not supports(get_recipe(r), alt):
                conv = {g.name for g in model_linears(args)
                        if eligible(g.name, g.k, g.n, get_recipe(r), skip_modules) is None}
                t = step_time(args, recipe=r, converted=conv, loss_head=_head_for(head, conv), **kw).total_s
                parts.append(f"{r} {base / t:.2f}x")
        out.append(f"with {other} rates instead: " + ", ".join(parts) + " (all eligible linears converted)")
    if cc is not None and cc[0] == 12:
        out.append("sm_12x: rowwise scaled matmuls have failed in cuBLAS with CUBLAS_STATUS_NOT_SUPPORTED "
                   "(pytorch/pytorch#192707; tensorwise works): run `fp8lab doctor` on the card to probe them")
        out.append("sm_12x MXFP8: cuBLAS runs block-scaled FP8 only in the TN operand layout on 12.x "
                   "(cuBLAS docs, narrow precision; pytorch/pytorch#198126), while training's backward GEMMs "
                   "need others: mxfp8 runs only where fp8lab's kernel probe passes (`fp8lab doctor`)")
    if spec.fp8_fp32acc_tflops is None:
        out.append(f"{gpu_id} has no FP8 tensor cores: FP8 recipes cannot speed it up (fp8lab refuses them there)")
    if gpu_id == "mi300x":
        out.append("MI300X: FP8 is e4m3fnuz (TorchAO picks it); no MXFP8 before MI350")
    out.append("communication is not modelled: single GPU, or FSDP traffic fully overlapped"
               + (f" (--num-gpus {step_kw['num_gpus']}: weights, gradients and optimizer state sharded as "
                  "parallel.data_parallel=fsdp does)" if step_kw["num_gpus"] > 1 else ""))
    out.append("small GEMMs: the roofline ignores tile/wave effects (TorchAO: ~2x undercount at M, K, N <= 1k); "
               "precision.filter_mode=auto measures instead")
    return out


def _head_for(loss_head: str, converted: set[str]) -> str:
    """The fused head computes the output layer's GEMMs itself, in bf16: an FP8 output layer
    (precision.skip_modules without "output") takes the plain head, as the trainer does."""
    return "plain" if loss_head == "fused" and "output" in converted else loss_head


def _anchor_info(bf16_step: dict | None, predicted_s: float) -> dict | None:
    if not bf16_step:
        return None
    measured = float(bf16_step["step_s"])
    return {"step_ms": round(measured * 1e3, 2), "source": bf16_step.get("source", "?"),
            "predicted_ms": round(predicted_s * 1e3, 2), "model_error": round(predicted_s / measured - 1, 4)}


def advise(args: ModelArgs, *, gpu: str, tokens: int, seq_len: int, grad_accum: int = 1, num_gpus: int = 1,
           skip_modules: list[str] | tuple[str, ...] = ("output",), rate_source: str = "auto",
           measured: dict | None = None, optimizer: str = "adamw", activation_checkpoint: str = "none",
           loss_chunk_tokens: int = 0, loss_head: str = "fused", residual_dtype: str = "fp32",
           bf16_step: dict | None = None) -> Advice:
    """Predict every recipe for `args` on `gpu` at `tokens` tokens per micro-batch. Memory is
    predicted for a compiled bf16-autocast step (what a GPU run does) with `optimizer`,
    `activation_checkpoint`, `loss_head` and `loss_chunk_tokens` as in the config; step time for
    `loss_head` and `residual_dtype`. `bf16_step` ({'step_s', 'source'}): a measured bf16
    optimizer step of this configuration; every recipe's step is then also predicted anchored
    to it (perf.roofline.anchored_s)."""
    def memory(recipe: str, converted: set[str], gpus: int) -> dict[str, float]:
        return predict_memory(args, tokens=tokens, recipe=recipe, converted=converted, optimizer=optimizer,
                              activation_checkpoint=activation_checkpoint, compute_bytes=2, num_gpus=gpus,
                              loss_chunk_tokens=loss_chunk_tokens, compiled=True,
                              loss_head=_head_for(loss_head, converted)).gb()

    spec = get_gpu(gpu)
    gpu_id = gpu_id_of(spec)
    rates = rates_for(gpu_id, source=rate_source, measured=measured)
    skip_modules = list(skip_modules)
    groups = model_linears(args)
    kw = dict(tokens=tokens, seq_len=seq_len, rates=rates, grad_accum=grad_accum, num_gpus=num_gpus,
              residual_dtype=residual_dtype, loss_chunk_tokens=loss_chunk_tokens)

    def step(recipe: str, converted: set[str]):
        return step_time(args, recipe=recipe, converted=converted, loss_head=_head_for(loss_head, converted), **kw)

    base = step("bf16", set())
    base_step_s = base.total_s * grad_accum
    anchor = _anchor_info(bf16_step, base_step_s)

    def anchored(t) -> float | None:
        return anchored_s(bf16_step["step_s"], base_step_s, t.total_s * grad_accum) if anchor else None

    fpt = flops_per_token(args, seq_len)
    results = []
    for name, recipe in RECIPES.items():
        why = supports(recipe, rates) if recipe.is_low_precision else None
        if why:
            results.append(RecipeAdvice(name, False, None, None, None, None, None, None, None, notes=[why]))
            continue
        can = [g for g in groups if eligible(g.name, g.k, g.n, recipe, skip_modules) is None]
        layer = {g.name: round(layer_speedup(tokens, g.k, g.n, recipe, rates), 3) for g in can} \
            if recipe.is_low_precision else {}
        worth = {n for n, s in layer.items() if s >= WIN_MARGIN}
        low = recipe.is_low_precision
        t = step(name, worth) if low else base
        t_all = step(name, {g.name for g in can}) if low else base
        mem = memory(name, worth, num_gpus)
        total_mem = sum(mem.values())
        step_s = t.total_s * grad_accum  # one optimizer step
        notes = []
        if recipe.is_low_precision and not worth:
            notes.append(f"no linear wins by {WIN_MARGIN}x at {tokens} tokens: nothing worth converting")
        if _head_for(loss_head, worth) != loss_head:
            notes.append("an FP8 output layer takes the plain loss head (the fused head runs its GEMMs in bf16)")
        a, a_all = anchored(t), anchored(t_all)
        results.append(RecipeAdvice(
            recipe=name, supported=True, speedup=round(base.total_s / t.total_s, 3),
            speedup_all=round(base.total_s / t_all.total_s, 3), step_ms=round(step_s * 1e3, 2),
            tokens_per_s=round(tokens * grad_accum / step_s),
            mfu=round(fpt * tokens / t.total_s / (rates.mfu_peak(recipe) * 1e12), 3),
            memory_gb=round(total_mem, 2), fits=total_mem <= spec.mem_gb, converted=sorted(worth, key=_order),
            layer_speedups=layer, breakdown_ms={k: round(v * 1e3, 3) for k, v in t.parts.items()},
            memory_breakdown_gb={k: round(v, 2) for k, v in mem.items()}, notes=notes,
            step_ms_anchored=None if a is None else round(a * 1e3, 2),
            speedup_anchored=None if a is None else round(bf16_step["step_s"] / a, 3),
            speedup_all_anchored=None if a_all is None else round(bf16_step["step_s"] / a_all, 3),
            tokens_per_s_anchored=None if a is None else round(tokens * grad_accum / a)))
    recommended, why = _recommend(results, spec)
    step_kw = {k: v for k, v in kw.items() if k != "rates"} | {"loss_head": loss_head}
    caveats = _caveats(gpu_id, rates, args, skip_modules, step_kw)
    if anchor:
        caveats.insert(0, f"anchored to a measured bf16 step of {anchor['step_ms']:g} ms ({anchor['source']}); the "
                          f"model alone predicts {anchor['predicted_ms']:g} ms ({anchor['model_error']:+.1%}): each "
                          "recipe's anchored step is the measurement minus the predicted bf16 step plus its own")
    base_adv = results[0]
    if not base_adv.fits:
        n = next((n for n in range(num_gpus + 1, 1025) if sum(memory("bf16", set(), n).values()) <= spec.mem_gb), None)
        need = f"FSDP2 sharding over {n}+ GPUs (--num-gpus {n})" if n else \
            "fewer tokens per micro-batch or activation checkpointing"
        if activation_checkpoint == "none" or optimizer == "adamw":
            need += " (or --activation-checkpoint full, --optimizer adamw-8bit)"
        caveats.insert(0, f"memory: bf16 is predicted at {base_adv.memory_gb:.0f} GB, more than the {spec.mem_gb:g} GB "
                          f"of one {gpu_id}: needs {need}; the speedups assume it fits")
    counts = param_counts(args)
    return Advice(
        model={**asdict(args), "params": counts.total, "matmul_params": counts.matmul},
        gpu={"id": gpu_id, "name": spec.name, "mem_gb": spec.mem_gb}, rates=rates.to_dict(), tokens=tokens,
        seq_len=seq_len, grad_accum=grad_accum, num_gpus=num_gpus, recipes=results,
        memory_settings={"optimizer": optimizer, "activation_checkpoint": activation_checkpoint,
                         "loss_chunk_tokens": loss_chunk_tokens},
        step_settings={"loss_head": loss_head, "residual_dtype": residual_dtype, "loss_chunk_tokens": loss_chunk_tokens},
        anchor=anchor, recommended=recommended, why=why, caveats=caveats,
        constants={k: {"value": v, "source": s} for k, (v, s) in CONSTANTS.items()})


def _recommend(results: list[RecipeAdvice], spec) -> tuple[str, str]:
    """The fastest FP8 recipe if it gains RECOMMEND_MARGIN over bf16 (anchored when anchored), else bf16."""
    def gain(r: RecipeAdvice) -> float:
        return r.speedup_anchored if r.speedup_anchored is not None else r.speedup

    best = max((r for r in results if r.supported and r.recipe != "bf16"), key=gain, default=None)
    if best is not None and gain(best) >= RECOMMEND_MARGIN:
        anchored = " (anchored to the measured bf16 step)" if best.speedup_anchored is not None else ""
        why = (f"{best.recipe} is predicted {gain(best):.2f}x of bf16{anchored}, converting {', '.join(best.converted)}; "
               "bf16 stays the baseline to compare against")
        if best.recipe == "mxfp8" and spec.compute_capability and spec.compute_capability[0] == 12:
            why += "; on sm_12x only if `fp8lab doctor`'s mxfp8 probe passes on the card (see the MXFP8 note)"
        return best.recipe, why
    return "bf16", ("no FP8 recipe is predicted to gain " + f"{RECOMMEND_MARGIN}x or more here" +
                    (f" (best: {best.recipe} {gain(best):.2f}x)" if best else ""))


_ORDER = [g.name for g in model_linears(ModelArgs(dim=64, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=64,
                                                  ffn_dim=64))]


def _order(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)
