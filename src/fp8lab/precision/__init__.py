from fp8lab.precision.capability import EMULATION_NOTE, resolve_emulation
from fp8lab.precision.convert import ConversionReport, convert, plan_conversion, to_plain
from fp8lab.precision.recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "RECIPES", "Recipe", "get_recipe", "convert", "ConversionReport", "plan_conversion",
    "to_plain", "resolve_emulation", "EMULATION_NOTE",
]
