"""Can this recipe run here, and how: the one answer that training, compare, bench and doctor
share.

TorchAO does not refuse to run FP8 on a GPU without FP8 tensor cores (it fails late, inside a
kernel) and happily runs on CPU, so fp8lab decides up front: real kernels where the hardware
has them, TorchAO's emulation on CPU (loudly), and a clear error everywhere else. The compute
dtype (bf16 autocast or fp32) is decided here too, because it is part of "can it run here".

`fp8lab compare` and `fp8lab bench` ask before launching their runs. Were they to ask torch
about the GPU themselves, the parent would create a CUDA context (some hundreds of MB of the
card) and hold it while the children train; so where CUDA is present the question goes to a
short-lived child process:

    python -m fp8lab.precision.support \
        '{"recipes": [...], "device": "auto", "emulate": "auto", "compute_dtype": "auto"}'
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

from fp8lab.env import cpu_has_native_bf16, device_name, pick_device
from fp8lab.errors import FP8LabError
from fp8lab.precision.probe import probe_recipe
from fp8lab.precision.recipes import Recipe, get_recipe
from fp8lab.procs import run_child

EMULATION_NOTE = (
    "FP8 runs in TorchAO's emulation on this device: numerics are FP8's, "
    "throughput is NOT representative of FP8 hardware"
)
CPU_FP8_FP32_NOTE = (
    "FP8 recipes on CPU compute in fp32 (no bf16 autocast): TorchAO's Float8Linear follows "
    "the CUDA autocast dtype, and emulated rowwise_with_gw_hp fails under CPU bf16 autocast"
)
CPU_NO_BF16_NOTE = (
    "this CPU has no native bf16 (no AVX-512 BF16 or AMX): bf16 autocast would be emulated, about 25x "
    "slower than fp32, so the bf16 recipe computes in fp32 here (--precision.compute_dtype=bf16 forces bf16)"
)
CPU_FORCED_BF16_NOTE = (
    "precision.compute_dtype=bf16 on a CPU without native bf16: autocast is emulated, about 25x slower than fp32"
)
_FIX = "use --precision.recipe=bf16, or --precision.emulate=on to run it emulated (slow)"


def rocm_has_fp8(device: torch.device) -> bool:
    """MI300 (gfx942) and MI350 (gfx950) have FP8 matrix cores; TorchAO picks the fnuz dtypes."""
    arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
    return arch.startswith(("gfx94", "gfx95"))


def native_support(recipe: Recipe, *, name: str, cc: tuple[int, int] | None, probe: Callable[[], str | None],
                   rocm_fp8: bool | None = None) -> str | None:
    """None when the GPU `name` runs `recipe` with real kernels, else why not (one line).

    cc: its CUDA compute capability; rocm_fp8: on ROCm, whether it has FP8 matrix cores (None
    on NVIDIA). `probe()` runs the real kernel (None = it works) where the capability number
    alone does not settle it. Takes facts, not a device, so doctor's tests can stand in a GPU."""
    if not recipe.is_low_precision:
        return None
    if rocm_fp8 is not None:
        return None if recipe.kind == "float8" and rocm_fp8 else f"{recipe.name} is not supported on {name} (ROCm)"
    if recipe.kind == "mxfp8":
        if cc[0] == 10:  # sm_100 family: B200, GB200
            return None
        if cc[0] == 12:  # sm_12x (RTX 50xx): only if the kernel runs here
            err = probe()
            return None if err is None else (f"precision.recipe=mxfp8 failed its kernel probe on {name} "
                                              f"(compute capability {cc[0]}.{cc[1]}): {err}")
        return (f"precision.recipe=mxfp8 needs compute capability 10.0 (B200/GB200) or a passing probe "
                f"on 12.x; {name} has {cc[0]}.{cc[1]}")
    need = recipe.min_capability
    if tuple(cc) < need:
        return (f"precision.recipe={recipe.name} needs compute capability >= {need[0]}.{need[1]} "
                f"(FP8 tensor cores: Ada, Hopper, Blackwell); {name} has {cc[0]}.{cc[1]}")
    return None


def check_cuda_capability(recipe: Recipe, *, name: str, cc: tuple[int, int], probe: Callable[[], str | None]) -> None:
    """native_support as an FP8LabError that says what to do instead."""
    why = native_support(recipe, name=name, cc=cc, probe=probe)
    if why:
        raise FP8LabError(f"{why}; {_FIX}")


def resolve_emulation(recipe: Recipe, device: torch.device, emulate: str) -> bool:
    """Whether `recipe` must run emulated on `device`; raise FP8LabError if it cannot run.

    emulate: "auto" (emulate on CPU only), "on" (always), "off" (never).
    """
    if not recipe.is_low_precision:
        return False
    if emulate == "on":
        return True
    if device.type == "cpu":
        if emulate == "off":
            raise FP8LabError(
                f"precision.recipe={recipe.name} has no native CPU kernels; "
                "use --precision.emulate=auto (TorchAO emulation) or a CUDA GPU"
            )
        return True
    if device.type != "cuda":
        raise FP8LabError(f"precision.recipe={recipe.name} is not supported on device type {device.type!r}")
    hip = bool(torch.version.hip)
    why = native_support(recipe, name=device_name(device), cc=None if hip else torch.cuda.get_device_capability(device),
                         rocm_fp8=rocm_has_fp8(device) if hip else None,
                         probe=lambda: probe_recipe(recipe.name, device.index or 0))
    if why:
        raise FP8LabError(f"{why}; {_FIX}")
    return False


def resolve_compute_dtype(setting: str, *, low_precision: bool, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype of everything that is not FP8 (autocast's), and a note for the user when it is
    not what `setting` suggests. bf16 autocast is the baseline; FP8 on CPU computes in fp32 (see
    CPU_FP8_FP32_NOTE), and so does `auto` on a CPU without native bf16 (CPU_NO_BF16_NOTE)."""
    if device.type == "cpu" and low_precision:
        if setting == "bf16":
            raise FP8LabError("precision.compute_dtype=bf16 with an FP8 recipe is not supported on CPU "
                              "(TorchAO's emulation fails under CPU bf16 autocast); use auto or fp32")
        return torch.float32, CPU_FP8_FP32_NOTE
    if setting == "fp32":
        return torch.float32, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FP8LabError(f"{device_name(device)} does not support bf16; use --precision.compute_dtype=fp32")
    if device.type == "cpu" and not cpu_has_native_bf16():
        return (torch.float32, CPU_NO_BF16_NOTE) if setting == "auto" else (torch.bfloat16, CPU_FORCED_BF16_NOTE)
    return torch.bfloat16, None


def run_label(recipe: Recipe, compute_dtype: torch.dtype, *, setting: str) -> str:
    """What ran, in a few words: the recipe's name, except a bf16 recipe that computed in fp32,
    by the user's word (`setting` fp32) or because this CPU has no native bf16 (auto)."""
    if recipe.is_low_precision or compute_dtype == torch.bfloat16:
        return recipe.name
    if setting == "fp32":
        return "fp32 (bf16 recipe, precision.compute_dtype=fp32)"
    return "fp32 (bf16 recipe on a CPU without native bf16)"


def unsupported_here(recipes: list[str], *, device: str, emulate: str, compute_dtype: str) -> dict:
    """{"device": name, "cuda": bool, "unsupported": {recipe: reason}}, decided exactly as
    training decides (env.pick_device, resolve_emulation, resolve_compute_dtype)."""
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
    """unsupported_here, asked in a child process when this machine has CUDA."""
    spec = {"recipes": recipes, "device": device, "emulate": emulate, "compute_dtype": compute_dtype}
    if device == "cpu" or not torch.cuda.is_available():  # no CUDA context is created here
        return unsupported_here(**spec)
    # An MXFP8 probe may compile kernels: minutes, not hours.
    child = run_child([sys.executable, "-m", "fp8lab.precision.support", json.dumps(spec)], timeout_s=600,
                      separate_stderr=True)
    if child.returncode is None:
        raise FP8LabError("checking which recipes this GPU runs took over 10 minutes; is the GPU busy or hung?")
    if child.returncode != 0:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise FP8LabError(f"checking which recipes this GPU runs failed: {tail}")
    return json.loads(child.output)


def main() -> int:
    try:
        print(json.dumps(unsupported_here(**json.loads(sys.argv[1]))))
    except FP8LabError as e:
        print(f"fp8lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
