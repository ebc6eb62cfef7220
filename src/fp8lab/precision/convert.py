"""Apply a precision recipe to any nn.Module, from outside the model.

`convert(model, recipe=...)` swaps eligible nn.Linear layers for TorchAO's Float8Linear
(tensorwise / rowwise recipes) or wraps their weights in TorchAO's MXFP8 training tensor,
and returns a report of what was converted and what was skipped and why. BF16 is the
no-op conversion: the trainer's autocast does the rest. Weights stay fp32 (the master
copy); the casts to FP8 happen on the fly in each matmul.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from fp8lab.errors import FP8LabError
from fp8lab.precision.capability import EMULATION_NOTE, resolve_emulation
from fp8lab.precision.recipes import Recipe, get_recipe

log = logging.getLogger("fp8lab")


def _import_torchao() -> None:
    # torchao logs a warning for each prebuilt CUDA extension it cannot load (always, on
    # CPU-only installs) and torch warns about its Enum registrations: noise, not news.
    # The kernel probe in capability.py checks what really runs.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao  # noqa: F401


@dataclass
class ConversionReport:
    recipe: str
    emulated: bool
    converted: list[dict] = field(default_factory=list)  # {"name", "in_features", "out_features"}
    skipped: list[dict] = field(default_factory=list)  # {"name", "in_features", "out_features", "reason"}

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def summary(self) -> str:
        if self.recipe == "bf16":
            return "bf16: no conversion (autocast)"
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        skipped = "; ".join(f"{n} {r}" for r, n in reasons.items()) or "none"
        mode = "emulated" if self.emulated else "native kernels"
        return f"{self.recipe} ({mode}): converted {self.num_converted} linears; skipped: {skipped}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"num_converted": self.num_converted}


def _matches(fqn: str, pattern: str) -> bool:
    # Exact name, a dotted suffix ("w2" matches "layers.3.feed_forward.w2"), or fnmatch.
    return fqn == pattern or fqn.endswith("." + pattern) or fnmatch.fnmatchcase(fqn, pattern)


def heuristic_keep_high_precision(recipe: Recipe, k: int, n: int) -> bool:
    """TorchAO's H100 rules for when FP8 does not pay (K = in, N = out features): the casts
    cost more than the faster GEMM saves. Tensorwise loses for K <= 4096 with N <= 1024;
    rowwise loses for N <= 2048, for K <= 1024, or for N <= 4096 with K <= 2048.
    Source: torchao/float8/float8_linear_utils.py `_auto_filter_for_recipe` (0.18), which
    has no rule for rowwise_with_gw_hp; we apply the rowwise rule to it (same forward and
    grad_input GEMMs, a cheaper grad_weight), an extrapolation, not TorchAO's.
    """
    if recipe.torchao_recipe == "tensorwise":
        return k <= 4096 and n <= 1024
    if recipe.torchao_recipe in ("rowwise", "rowwise_with_gw_hp"):
        return n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)
    raise FP8LabError(f"precision.filter_mode=heuristic has no published rule for {recipe.name}; use filter_mode=all")


def plan_conversion(
    model: nn.Module,
    recipe: Recipe,
    *,
    skip_modules: Iterable[str],
    filter_mode: str = "all",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    filter_gpu: str = "auto",
    filter_tokens: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Decide, for every nn.Linear in `model`, convert or skip (with a reason).

    filter_mode "auto" / "roofline" ask precision.layer_filter about each distinct shape that
    passed the other checks (timed on this GPU, or predicted for `filter_gpu` at
    `filter_tokens` tokens per micro-batch); its reason, with the numbers, is kept either way.
    """
    skip_modules = list(skip_modules)
    converted, skipped = [], []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        k, n = mod.in_features, mod.out_features
        entry = {"name": fqn, "in_features": k, "out_features": n}
        m = recipe.dim_multiple
        if any(_matches(fqn, p) for p in skip_modules):
            reason = "named in precision.skip_modules"
        elif k % m or n % m:
            reason = f"dims not multiples of {m}"
        elif filter_fn is not None and not filter_fn(mod, fqn):
            reason = "rejected by filter_fn"
        elif filter_mode == "heuristic" and heuristic_keep_high_precision(recipe, k, n):
            reason = "too small to gain (heuristic filter)"
        else:
            converted.append(entry)
            continue
        skipped.append(entry | {"reason": reason})
    if filter_mode in ("auto", "roofline") and converted:
        from fp8lab.precision.layer_filter import decide

        device = next(model.parameters()).device
        decisions = decide(recipe, [(c["in_features"], c["out_features"]) for c in converted], mode=filter_mode,
                           device=device, filter_gpu=filter_gpu, tokens=filter_tokens)
        kept = []
        for c in converted:
            d = decisions[(c["in_features"], c["out_features"])]
            (kept if d.convert else skipped).append(c | ({"filter": d.reason} if d.convert else {"reason": d.reason}))
        converted = kept
    return converted, skipped


def convert(
    model: nn.Module,
    *,
    recipe: str | Recipe,
    emulate: str = "auto",
    skip_modules: Iterable[str] = ("output",),
    filter_mode: str = "all",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    filter_gpu: str = "auto",
    filter_tokens: int | None = None,
    fsdp_float8_all_gather: bool = False,
    _gate: bool = True,
) -> ConversionReport:
    """Convert `model`'s linears in place for `recipe` and report what happened.

    recipe: a name from `fp8lab.precision.RECIPES` (e.g. "fp8-rowwise") or a Recipe.
    emulate: "auto" runs TorchAO's emulation on CPU and the real kernels on a capable GPU;
        "on" forces emulation; "off" forbids it. An incapable GPU is an FP8LabError.
    skip_modules: names kept in high precision (exact, dotted suffix, or fnmatch pattern);
        the output head by default, whose accuracy matters most and whose dims are often odd.
    filter_mode: "all" eligible linears, "heuristic" (TorchAO's H100 size rules), "roofline"
        (only the shapes bench.roofline predicts to win on `filter_gpu` at `filter_tokens`
        tokens per micro-batch) or "auto" (time each shape on this GPU; roofline on CPU).
    filter_gpu: the GPU id the roofline judges for; "auto": this device's (h100-sxm on CPU).
    filter_tokens: tokens per micro-batch (batch size x sequence length) for auto/roofline.
    filter_fn: optional extra `(module, fqn) -> bool`; False keeps the layer in high precision.
    fsdp_float8_all_gather: (tensorwise) FSDP2 all-gathers the weights in FP8; call
        torchao.float8.precompute_float8_dynamic_scale_for_fsdp(model) after each optimizer step.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if isinstance(model, nn.Linear):
        raise FP8LabError("convert() swaps children in place; wrap a bare nn.Linear in nn.Sequential")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise FP8LabError("convert(): the model has no parameters") from None
    emulated = resolve_emulation(recipe, device, emulate) if _gate else emulate == "on"
    report = ConversionReport(recipe=recipe.name, emulated=emulated)
    if not recipe.is_low_precision:
        return report
    report.converted, report.skipped = plan_conversion(
        model, recipe, skip_modules=skip_modules, filter_mode=filter_mode, filter_fn=filter_fn,
        filter_gpu=filter_gpu, filter_tokens=filter_tokens,
    )
    chosen = {c["name"] for c in report.converted}
    _import_torchao()
    if recipe.kind == "float8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe.torchao_recipe), emulate=emulated,
                                     enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in chosen, config=config)
    elif recipe.kind == "mxfp8":
        from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
        from torchao.quantization import quantize_

        name = "mxfp8_emulated_rceil" if emulated else recipe.torchao_recipe
        config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe(name))
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in chosen)
    else:
        raise AssertionError(f"recipe kind {recipe.kind!r} has no converter")
    if emulated:
        log.warning(EMULATION_NOTE)
    return report


def _is_torchao_subclass(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and type(t).__module__.startswith("torchao")


def to_plain(t: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside a TorchAO training subclass (MXFP8 weight wrapper,
    float8 all-gather weight), sharing its storage; other tensors (DTensor included) as is.
    Checkpoints hold plain tensors so they load under any recipe.
    """
    t = t.data if isinstance(t, nn.Parameter) else t
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and _is_torchao_subclass(t._local_tensor):
        # FSDP2 with FP8 all-gather: a shard whose local tensor is TorchAO's weight wrapper.
        return DTensor.from_local(to_plain(t._local_tensor), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    while _is_torchao_subclass(t):
        inner, _ = t.__tensor_flatten__()
        if len(inner) != 1:
            raise TypeError(f"cannot unwrap {type(t).__name__}: it holds {inner}")
        t = getattr(t, inner[0])
    return t
