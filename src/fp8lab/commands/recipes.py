"""fp8lab recipes: the precision recipes and the hardware each needs."""

from __future__ import annotations

ORDER = 30


def register(sub) -> None:
    sub.add_parser("recipes", help="list the precision recipes and the hardware they need").set_defaults(fn=run)


def run(args, rest) -> int:
    from fp8lab.precision.recipes import RECIPES

    for r in RECIPES.values():
        tail = "; emulated on CPU, refused on other GPUs" if r.is_low_precision else ""
        print(f"{r.name:<18} {r.summary}\n{'':<18} runs on: {r.hardware}{tail}")
    return 0
