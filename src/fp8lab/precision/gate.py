"""Which recipes this machine can train, asked without keeping hold of a GPU.

`fp8lab compare` and `fp8lab bench` train each recipe in a child process. Were the parent to
ask torch about the GPU itself, it would create a CUDA context (some hundreds of MB of the
card) and hold it while the children train. So where CUDA is present the question goes to a
short-lived child process; on a CPU-only machine it is answered in place.

    python -m fp8lab.precision.gate '{"recipes": [...], "device": "auto", "emulate": "auto", "compute_dtype": "auto"}'
"""

from __future__ import annotations

import json
import subprocess
import sys

from fp8lab.errors import FP8LabError


def _check(recipes: list[str], *, device: str, emulate: str, compute_dtype: str) -> dict:
    """{"device": name, "cuda": bool, "unsupported": {recipe: reason}}, decided exactly as
    training decides (build.pick_device, capability.resolve_emulation, build.resolve_compute_dtype)."""
    from fp8lab.precision.capability import device_name, resolve_emulation
    from fp8lab.precision.recipes import get_recipe
    from fp8lab.train.build import pick_device, resolve_compute_dtype

    dev = pick_device(device)
    unsupported = {}
    for name in recipes:
        recipe = get_recipe(name)
        try:
            resolve_emulation(recipe, dev, emulate)
            resolve_compute_dtype(compute_dtype, low_precision=recipe.is_low_precision, device=dev)
        except FP8LabError as e:
            unsupported[name] = str(e)
    return {"device": device_name(dev), "cuda": dev.type == "cuda", "unsupported": unsupported}


def check_recipes_here(recipes: list[str], *, device: str, emulate: str, compute_dtype: str) -> dict:
    """See _check; in a child process when this machine has CUDA."""
    import torch

    spec = {"recipes": recipes, "device": device, "emulate": emulate, "compute_dtype": compute_dtype}
    if device == "cpu" or not torch.cuda.is_available():  # no CUDA context is created here
        return _check(**spec)
    try:
        proc = subprocess.run([sys.executable, "-m", "fp8lab.precision.gate", json.dumps(spec)],
                              capture_output=True, text=True, timeout=600)  # an MXFP8 probe may compile
    except subprocess.TimeoutExpired:
        raise FP8LabError("checking which recipes this GPU runs took over 10 minutes; is the GPU busy or hung?") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FP8LabError(f"checking which recipes this GPU runs failed: {tail}")
    return json.loads(proc.stdout)


def main() -> int:
    try:
        print(json.dumps(_check(**json.loads(sys.argv[1]))))
    except FP8LabError as e:
        print(f"fp8lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
