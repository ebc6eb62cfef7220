"""Apply a precision recipe to any nn.Module, from outside the model.

`convert(model, recipe=...)` swaps eligible nn.Linear layers for TorchAO's Float8Linear
(tensorwise / rowwise recipes) or wraps their weights in TorchAO's MXFP8 training tensor,
and returns a report of what was converted and what was skipped and why. BF16 is the
no-op conversion: the trainer's autocast does the rest. Weights stay fp32 (the master
copy); the casts to FP8 happen on the fly in each matmul.

Which layers convert is decided in three steps, each with its reason kept in the report:
eligibility (`eligible`: skip_modules, dimensions the recipe can take), TorchAO's size
heuristic when asked (`filter_mode="heuristic"`), then the caller's layer policy
(`filter_fn`, as TorchAO's `module_filter_fn`): fp8lab's measured or predicted policy comes
from `fp8lab.perf.layer_policy`, handed in by the trainer, not looked up here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

from fp8lab.errors import FP8LabError
from fp8lab.precision.plain import to_plain  # noqa: F401  (public: fp8lab.precision.to_plain)
from fp8lab.precision.recipes import Recipe, get_recipe
from fp8lab.precision.support import EMULATION_NOTE, resolve_emulation
from fp8lab.precision.swap import swap_linears

log = logging.getLogger("fp8lab")


@dataclass(frozen=True)
class LayerChoice:
    """What a layer policy (filter_fn) may return instead of a bare bool: the decision and
    the numbers behind it, which the report keeps."""
    convert: bool
    reason: str

    def __bool__(self) -> bool:
        return self.convert


@dataclass
class ConversionReport:
    recipe: str
    emulated: bool
    converted: list[dict] = field(default_factory=list)  # {"name", "in_features", "out_features"[, "filter"]}
    skipped: list[dict] = field(default_factory=list)  # {"name", "in_features", "out_features", "reason"}
    fsdp_float8_all_gather: bool = False  # FSDP2 gathers the converted weights in FP8 (see precision.fsdp)

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def summary(self) -> str:
        if self.recipe == "bf16":
            return "bf16: no linears converted"
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        skipped = "; ".join(f"{n} {r}" for r, n in reasons.items()) or "none"
        mode = "emulated" if self.emulated else "native kernels"
        return f"{self.recipe} ({mode}): converted {self.num_converted} linears; skipped: {skipped}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"num_converted": self.num_converted}

    def linear_groups(self) -> list[dict]:
        return linear_groups(self.converted, self.skipped)


def linear_groups(converted: list[dict], skipped: list[dict]) -> list[dict]:
    """A conversion by layer name without the block index: [{'name': 'attention.wq', 'converted':
    16, 'total': 16, 'skipped': None or the first reason}], in the order first converted. Empty when
    nothing was considered for conversion (bf16)."""
    groups: dict[str, dict] = {}
    for entry, done in [(c, True) for c in converted] + [(s, False) for s in skipped]:
        g = groups.setdefault(re.sub(r"^layers\.\d+\.", "", entry["name"]), {"converted": 0, "total": 0, "skipped": None})
        g["total"] += 1
        g["converted"] += done
        if not done and g["skipped"] is None:
            g["skipped"] = entry.get("reason")
    return [{"name": name, **g} for name, g in groups.items()]


def groups_text(groups: list[dict]) -> str:
    """'7/8: wq wk wv wo w1 w2 w3', as bench and compare print linear_groups: of the model's distinct
    linear names, those converted; '(c/t)' after a name converted in only some blocks."""
    done = [g for g in groups if g["converted"]]
    if not done:
        return "none"
    short = [g["name"].rsplit(".", 1)[-1] for g in groups]
    names = short if len(set(short)) == len(short) else [g["name"] for g in groups]
    said = [n + ("" if g["converted"] == g["total"] else f"({g['converted']}/{g['total']})")
            for n, g in zip(names, groups) if g["converted"]]
    return f"{len(done)}/{len(groups)}: " + " ".join(said)


def matches(fqn: str, pattern: str) -> bool:
    """Exact name, a dotted suffix ("w2" matches "layers.3.feed_forward.w2"), or fnmatch."""
    return fqn == pattern or fqn.endswith("." + pattern) or fnmatch.fnmatchcase(fqn, pattern)


def eligible(name: str, k: int, n: int, recipe: Recipe, skip_modules: Iterable[str]) -> str | None:
    """None when a linear called `name` with k in and n out features can convert under
    `recipe`, else why not. The one rule: the converter, the advisor and the layer
    benchmarks all ask it."""
    if any(matches(name, p) for p in skip_modules):
        return "named in precision.skip_modules"
    if k % recipe.dim_multiple or n % recipe.dim_multiple:
        return f"dims not multiples of {recipe.dim_multiple}"
    return None


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


FILTER_MODES = ("all", "heuristic")


def plan_conversion(model: nn.Module, recipe: Recipe, *, skip_modules: Iterable[str], filter_mode: str = "all",
                    filter_fn: Callable[[nn.Module, str], bool | LayerChoice] | None = None,
                    ) -> tuple[list[dict], list[dict]]:
    """Decide, for every nn.Linear in `model`, convert or skip (with a reason)."""
    if filter_mode not in FILTER_MODES:
        raise FP8LabError(f"convert(filter_mode={filter_mode!r}): the converter applies {' or '.join(FILTER_MODES)}; "
                          "the auto and roofline policies come from fp8lab.perf.layer_policy.layer_policy(...), "
                          "handed in as filter_fn")
    skip_modules = list(skip_modules)
    converted, skipped = [], []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        k, n = mod.in_features, mod.out_features
        entry = {"name": fqn, "in_features": k, "out_features": n}
        reason = eligible(fqn, k, n, recipe, skip_modules)
        if reason is None and filter_mode == "heuristic" and heuristic_keep_high_precision(recipe, k, n):
            reason = "too small to gain (heuristic filter)"
        if reason is None and filter_fn is not None:
            choice = filter_fn(mod, fqn)
            said = choice.reason if isinstance(choice, LayerChoice) else None
            if not choice:
                reason = said or "rejected by filter_fn"
            elif said:
                entry["filter"] = said
        if reason is None:
            converted.append(entry)
        else:
            skipped.append(entry | {"reason": reason})
    return converted, skipped


def convert(
    model: nn.Module,
    *,
    recipe: str | Recipe,
    emulate: str = "auto",
    skip_modules: Iterable[str] = ("output",),
    filter_mode: str = "all",
    filter_fn: Callable[[nn.Module, str], bool | LayerChoice] | None = None,
    fsdp_float8_all_gather: bool = False,
) -> ConversionReport:
    """Convert `model`'s linears in place for `recipe` and report what happened.

    recipe: a name from `fp8lab.precision.RECIPES` (e.g. "fp8-rowwise") or a Recipe.
    emulate: "auto" runs TorchAO's emulation on CPU and the real kernels on a capable GPU;
        "on" forces emulation; "off" forbids it. An incapable GPU is an FP8LabError.
    skip_modules: names kept in high precision (exact, dotted suffix, or fnmatch pattern);
        the output head by default, whose accuracy matters most and whose dims are often odd.
    filter_mode: "all" eligible linears, or "heuristic" (TorchAO's H100 size rules).
    filter_fn: `(module, fqn) -> bool` or a LayerChoice (a bool with its reason); False keeps
        the layer in high precision. `fp8lab.perf.layer_policy.layer_policy(...)` builds the measured
        (auto) and predicted (roofline) policies.
    fsdp_float8_all_gather: (tensorwise) FSDP2 all-gathers the weights in FP8; call
        `fp8lab.precision.post_optimizer_hook(model, report)` after each optimizer step.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if isinstance(model, nn.Linear):
        raise FP8LabError("convert() swaps children in place; wrap a bare nn.Linear in nn.Sequential")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise FP8LabError("convert(): the model has no parameters") from None
    emulated = resolve_emulation(recipe, device, emulate)
    report = ConversionReport(recipe=recipe.name, emulated=emulated, fsdp_float8_all_gather=fsdp_float8_all_gather)
    if not recipe.is_low_precision:
        return report
    report.converted, report.skipped = plan_conversion(model, recipe, skip_modules=skip_modules,
                                                       filter_mode=filter_mode, filter_fn=filter_fn)
    swap_linears(model, recipe, names={c["name"] for c in report.converted}, emulated=emulated,
                 fsdp_float8_all_gather=fsdp_float8_all_gather)
    if emulated:
        log.warning(EMULATION_NOTE)
    return report
