"""Precision recipes as a converter applied from outside the model: the registry, whether a
recipe runs here, the conversion with its report, FSDP2 hooks and FP8 telemetry."""

from fp8lab.precision.convert import ConversionReport, LayerChoice, convert, eligible, plan_conversion
from fp8lab.precision.fsdp import post_optimizer_hook
from fp8lab.precision.plain import to_plain
from fp8lab.precision.recipes import RECIPES, Recipe, get_recipe
from fp8lab.precision.support import EMULATION_NOTE, resolve_emulation

__all__ = [
    "RECIPES", "Recipe", "get_recipe", "convert", "ConversionReport", "LayerChoice", "eligible", "plan_conversion",
    "post_optimizer_hook", "to_plain", "resolve_emulation", "EMULATION_NOTE",
]
