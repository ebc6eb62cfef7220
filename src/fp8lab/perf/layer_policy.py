"""Which linears to convert, by measured or predicted speed (precision.filter_mode auto and
roofline): a layer policy the trainer hands to the converter as its `filter_fn`.

* `roofline`: perf.roofline predicts each distinct (in, out) shape's forward + backward time
  in bf16 and under the recipe on a named GPU (`precision.filter_gpu`; "auto" = this device's
  GPU, or h100-sxm on CPU) at the micro-batch's token count; no timing.
* `auto`: times each distinct shape on this GPU at start-up (bf16 vs the recipe, forward +
  backward, compiled, CUDA events, warm-up, median; perf.measure), cached per GPU, torch
  version, recipe and shape. On CPU there is nothing to time: falls back to `roofline`,
  with a warning and in every reason string.

A layer converts when the recipe wins by WIN_MARGIN; every decision carries its numbers in a
reason string, which the ConversionReport keeps (converted entries under "filter", skipped
ones under "reason"), so the run's summary shows why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from fp8lab.env import device_name
from fp8lab.errors import FP8LabError
from fp8lab.gpus import GPUS, get_gpu, gpu_id_of, lookup_gpu
from fp8lab.perf.measure import cached_layer_times, load_measured_rates
from fp8lab.perf.roofline import layer_speedup, rates_for, supports
from fp8lab.precision.convert import LayerChoice
from fp8lab.precision.recipes import Recipe

log = logging.getLogger("fp8lab")

WIN_MARGIN = 1.05  # convert when the recipe is at least 5% faster: below that, noise and model error
DEFAULT_TOKENS = 8192  # used when the caller does not say how many tokens a micro-batch holds
CPU_FILTER_GPU = "h100-sxm"
CPU_FILTER_GPU_MX = "b200"  # h100-sxm has no MXFP8: on CPU, mxfp8 is judged for a B200
MODES = ("auto", "roofline")
AUTO_ON_CPU = "precision.filter_mode=auto needs a GPU to time layers on; using the roofline prediction instead"


@dataclass(frozen=True)
class Decision:
    convert: bool
    reason: str
    speedup: float | None  # recipe vs bf16 for this layer (measured or predicted)


def resolve_filter_gpu(filter_gpu: str, device, recipe: Recipe) -> tuple[str, str | None]:
    """The GPU table id the roofline uses, and a note when it is not this device's GPU."""
    if filter_gpu != "auto":
        return gpu_id_of(get_gpu(filter_gpu)), None  # unknown names: FP8LabError listing the known ids
    if device.type != "cuda":
        gpu = CPU_FILTER_GPU_MX if recipe.kind == "mxfp8" else CPU_FILTER_GPU
        return gpu, f"no GPU here, {gpu} assumed: set precision.filter_gpu"
    name = device_name(device)
    spec = lookup_gpu(name)
    if spec is None:
        raise FP8LabError(f"precision.filter_mode=roofline: {name} is not in fp8lab's GPU table; set "
                          f"precision.filter_gpu to the closest of: {', '.join(GPUS)}")
    return gpu_id_of(spec), None


def _verdict(text: str, speedup: float) -> Decision:
    win = speedup >= WIN_MARGIN
    return Decision(win, text if win else text + f", below {WIN_MARGIN}x", speedup)


def _roofline(recipe: Recipe, shapes: list[tuple[int, int]], *, device, filter_gpu: str, tokens: int,
              prefix: str) -> dict[tuple[int, int], Decision]:
    gpu_id, note = resolve_filter_gpu(filter_gpu, device, recipe)
    rates = rates_for(gpu_id, measured=load_measured_rates(gpu_id))
    why = supports(recipe, rates)
    if why:
        raise FP8LabError(f"precision.filter_mode=roofline cannot judge {recipe.name}: {why}; "
                          "set precision.filter_gpu to a GPU that runs it")
    where = f"{gpu_id}, {rates.source} rates, {tokens} tokens" + (f"; {note}" if note else "")
    return {(k, n): _verdict(f"{prefix}roofline ({where}): {recipe.name} {s:.2f}x of bf16", s)
            for k, n in shapes for s in [layer_speedup(tokens, k, n, recipe, rates)]}


def _measured(recipe: Recipe, shapes: list[tuple[int, int]], *, device, tokens: int) -> dict[tuple[int, int], Decision]:
    name = device_name(device)
    out = {}
    for k, n in shapes:
        t = cached_layer_times(device, recipe.name, tokens, k, n)
        s = t["bf16_s"] / t["recipe_s"]
        out[(k, n)] = _verdict(f"measured on {name} ({tokens}x{k}x{n}, fwd+bwd, compiled): {recipe.name} {s:.2f}x "
                               f"of bf16 ({t['recipe_s'] * 1e3:.3f} vs {t['bf16_s'] * 1e3:.3f} ms)", s)
    return out


def decide(recipe: Recipe, shapes: Iterable[tuple[int, int]], *, mode: str, device, filter_gpu: str = "auto",
           tokens: int | None = None, quiet: bool = False) -> dict[tuple[int, int], Decision]:
    """Convert or not, with a reason, for each distinct (in_features, out_features) shape."""
    if mode not in MODES:
        raise ValueError(f"layer_policy.decide handles {' and '.join(MODES)}, not {mode!r}")
    shapes = sorted(set(shapes))
    prefix = ""
    if tokens is None:
        tokens = DEFAULT_TOKENS
        prefix = f"tokens per micro-batch not given, {DEFAULT_TOKENS} assumed; "
    if mode == "auto" and device.type == "cuda":
        return _measured(recipe, shapes, device=device, tokens=tokens)
    if mode == "auto":
        if not quiet:
            log.warning(AUTO_ON_CPU)
        prefix = "auto fell back to roofline (no GPU to time on); " + prefix
    return _roofline(recipe, shapes, device=device, filter_gpu=filter_gpu, tokens=tokens, prefix=prefix)


def layer_policy(recipe: Recipe, *, mode: str, device, filter_gpu: str = "auto",
                 tokens: int | None = None) -> Callable[[nn.Module, str], LayerChoice]:
    """A `filter_fn` for `fp8lab.precision.convert`: each distinct linear shape is decided once
    (timed or predicted) when the converter first asks about it."""
    if mode not in MODES:
        raise FP8LabError(f"precision.filter_mode={mode!r} is not a layer policy; choose one of: {', '.join(MODES)}")
    if mode == "auto" and device.type != "cuda":
        log.warning(AUTO_ON_CPU)
    seen: dict[tuple[int, int], Decision] = {}

    def filter_fn(module: nn.Module, fqn: str) -> LayerChoice:
        shape = (module.in_features, module.out_features)
        if shape not in seen:
            seen.update(decide(recipe, [shape], mode=mode, device=device, filter_gpu=filter_gpu, tokens=tokens,
                               quiet=True))
        d = seen[shape]
        return LayerChoice(d.convert, d.reason)

    return filter_fn
