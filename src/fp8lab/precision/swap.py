"""The TorchAO calls themselves: swap the chosen linears for a recipe's training modules.

No decisions are made here (convert.py decides which layers, support.py whether this
hardware can run the recipe); this is the one place that knows TorchAO's conversion APIs,
which change between releases (constraints.txt pins the tested one).
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from fp8lab.precision.recipes import Recipe


def import_torchao() -> None:
    """Import torchao without its noise: it logs a warning for each prebuilt CUDA extension it
    cannot load (always, on CPU-only installs) and torch warns about its Enum registrations.
    The kernel probe (probe.py) checks what really runs."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao  # noqa: F401


def swap_linears(model: nn.Module, recipe: Recipe, *, names: set[str], emulated: bool,
                 fsdp_float8_all_gather: bool = False) -> None:
    """Convert the nn.Linear layers of `model` whose qualified names are in `names`, in place,
    with TorchAO's modules for `recipe` (emulated: TorchAO's reference path, any device).
    Does not check the hardware: `fp8lab.precision.convert` does, and is what users call."""
    import_torchao()
    if recipe.kind == "float8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe.torchao_recipe), emulate=emulated,
                                     enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in names, config=config)
    elif recipe.kind == "mxfp8":
        from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
        from torchao.quantization import quantize_

        name = "mxfp8_emulated_rceil" if emulated else recipe.torchao_recipe
        config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe(name))
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
    else:
        raise AssertionError(f"recipe kind {recipe.kind!r} has no converter")
