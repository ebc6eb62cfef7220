"""Per-layer FP8 telemetry: how well each converted layer's tensors survive the FP8 cast.

Dynamic scaling maps a tensor's (row's, block's) amax to the FP8 format's largest value, so
saturation is close to impossible; what goes wrong is everything far below the amax
underflowing to zero or to FP8's subnormals, which happens when one outlier sets the scale
(outlier pressure = amax / median). For each converted linear we replicate its recipe's
cast on the real tensors (the input, the weight, and the gradient of the output) and
report amax, scale, amax/median, the fraction of non-zero values that land on zero or a
subnormal, non-finite counts, and the SQNR of the FP8 round trip against the original.

The replica follows TorchAO 0.18's recipes: tensorwise (e4m3 for input and weight, e5m2 for
gradients, one scale per tensor), rowwise and rowwise-gw-hp (e4m3, one power-of-two scale
per row), MXFP8 (e4m3, one power-of-two scale per 32 elements along the row). It measures
the cast, not TorchAO's kernels, and runs in a separate eager pass (see `collect`), so
turning telemetry on does not change the training trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.precision.plain import is_torchao_subclass, to_plain
from fp8lab.precision.recipes import Recipe

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@dataclass(frozen=True)
class CastSpec:
    dtype: torch.dtype
    granularity: str  # "tensor", "row" or "block32"
    pow2: bool  # scales rounded down to a power of two


def cast_specs(recipe: Recipe) -> dict[str, CastSpec]:
    """How `recipe` casts each operand: {"input", "weight", "grad_output"} -> CastSpec."""
    if recipe.torchao_recipe == "tensorwise":
        return {"input": CastSpec(E4M3, "tensor", False), "weight": CastSpec(E4M3, "tensor", False),
                "grad_output": CastSpec(E5M2, "tensor", False)}
    if recipe.torchao_recipe in ("rowwise", "rowwise_with_gw_hp"):
        spec = CastSpec(E4M3, "row", True)
        return {"input": spec, "weight": spec, "grad_output": spec}
    if recipe.kind == "mxfp8":
        spec = CastSpec(E4M3, "block32", True)
        return {"input": spec, "weight": spec, "grad_output": spec}
    raise ValueError(f"recipe {recipe.name} has no FP8 casts")


def _fmt(x: float) -> float | None:
    return x if math.isfinite(x) else None


def cast_stats(x: torch.Tensor, spec: CastSpec) -> dict:
    """Statistics of casting `x` (any shape, last dim = the scaled dim) the way `spec` says."""
    xf = x.detach().float().reshape(-1, x.shape[-1])
    finite = torch.isfinite(xf)
    nonfinite = int((~finite).sum())
    xf = torch.where(finite, xf, torch.zeros_like(xf))
    absx = xf.abs()
    info = torch.finfo(spec.dtype)
    if spec.granularity == "tensor":
        amax = absx.amax().reshape(1, 1)
    elif spec.granularity == "row":
        amax = absx.amax(dim=-1, keepdim=True)
    else:
        k = xf.shape[-1]
        pad = (-k) % 32
        blocks = torch.nn.functional.pad(absx, (0, pad)).reshape(xf.shape[0], -1, 32)
        amax = blocks.amax(dim=-1).repeat_interleave(32, dim=-1)[:, :k]
    scale = info.max / amax.clamp(min=1e-12)  # TorchAO: amax maps to the format's max
    if spec.pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = (xf * scale).clamp(-info.max, info.max).to(spec.dtype).float()
    deq = q / scale
    nonzero = xf != 0
    n_nonzero = int(nonzero.sum())
    err = (xf - deq).norm()
    sqnr = float(20 * torch.log10(xf.norm() / err)) if err > 0 else math.inf
    median = float(absx[nonzero].median()) if n_nonzero else 0.0
    amax_all = float(absx.max()) if absx.numel() else 0.0
    return {
        "amax": amax_all,
        "scale": float(scale.median()),  # one value for tensorwise; the median row/block scale otherwise
        "scale_min": float(scale.min()),
        "amax_over_median": _fmt(amax_all / median) if median > 0 else None,
        "underflow_frac": float(((q.abs() < info.tiny) & nonzero).sum()) / n_nonzero if n_nonzero else 0.0,
        "zero_frac": float(((q == 0) & nonzero).sum()) / n_nonzero if n_nonzero else 0.0,
        "nonfinite": nonfinite,
        "sqnr_db": _fmt(sqnr),
    }


def converted_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linears a recipe converted: Float8Linear, or nn.Linear with a TorchAO weight."""
    out = {}
    for name, mod in model.named_modules():
        mx = isinstance(mod, nn.Linear) and is_torchao_subclass(mod.weight.data)  # MXFP8 wraps the weight
        if type(mod).__name__ == "Float8Linear" or mx:
            out[name] = mod
    return out


def collect(model: nn.Module, recipe: Recipe, *, inputs: torch.Tensor, loss_fn, autocast) -> list[dict]:
    """One extra eager forward and backward on `inputs` with hooks on every converted linear;
    returns one record per (layer, operand). Gradients are cleared afterwards and nothing
    else changes, so the training step that follows is the one it would have been."""
    specs = cast_specs(recipe)
    layers = converted_linears(model)
    seen: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def forward_hook(name):
        def hook(mod, args, out):
            seen[(name, "input")] = args[0].detach()
            out.register_hook(lambda g: seen.__setitem__((name, "grad_output"), g.detach()))
        return hook

    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(forward_hook(name)))
    try:
        with torch.compiler.set_stance("force_eager"), autocast():
            logits = model(inputs)
        loss_fn(logits).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    records = []
    for name, mod in layers.items():
        seen[(name, "weight")] = to_plain(mod.weight).detach()
        for operand in ("input", "weight", "grad_output"):
            if (name, operand) in seen:
                records.append({"layer": name, "tensor": operand, **cast_stats(seen[(name, operand)], specs[operand])})
    return records


def riskiest(records: list[dict], *, top: int | None = None) -> list[dict]:
    """Records ordered from the riskiest: non-finite first, then lowest SQNR, then most underflow."""
    def key(r):
        sqnr = r["sqnr_db"] if r["sqnr_db"] is not None else math.inf
        return (-r["nonfinite"], sqnr, -r["underflow_frac"])
    ordered = sorted(records, key=key)
    return ordered[:top] if top else ordered


def worst_layers(records: list[dict]) -> list[str]:
    """Layer names, riskiest first (each layer ranked by its worst operand)."""
    out: list[str] = []
    for r in riskiest(records):
        if r["layer"] not in out:
            out.append(r["layer"])
    return out
