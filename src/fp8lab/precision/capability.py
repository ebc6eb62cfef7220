"""Hardware gating. TorchAO does not refuse to run FP8 on a GPU without FP8 tensor cores
(it fails late, inside a kernel) and happily runs on CPU, so fp8lab decides up front:
real kernels where the hardware has them, TorchAO's emulation on CPU (loudly), and a clear
error everywhere else.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from fp8lab.errors import FP8LabError
from fp8lab.precision.recipes import Recipe

EMULATION_NOTE = (
    "FP8 runs in TorchAO's emulation on this device: numerics are FP8's, "
    "throughput is NOT representative of FP8 hardware"
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability, or None on CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _rocm_fp8(device: torch.device) -> bool:
    # MI300 (gfx942) and MI350 (gfx950) have FP8 matrix cores; TorchAO picks the fnuz dtypes.
    arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
    return arch.startswith(("gfx94", "gfx95"))


@functools.cache
def _probe(recipe_name: str, device_index: int) -> str | None:
    """Run one tiny converted linear forward and backward with the real kernels.

    Returns None when it works, else the error text. Used where the capability number
    alone does not settle it: MXFP8 on sm_12x (RTX 50xx) works in some releases and
    layouts only, and cuBLAS has rejected rowwise scaled matmuls there.
    """
    from fp8lab.precision.convert import convert  # late: convert imports torchao

    device = torch.device("cuda", device_index)
    try:
        lin = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(device)
        convert(lin, recipe=recipe_name, emulate="off", skip_modules=(), _gate=False)
        x = torch.randn(64, 256, device=device, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lin(x).float().sum().backward()
        torch.cuda.synchronize(device)
        return None
    except Exception as e:  # any failure means "does not run here"; the text says why
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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

    name = device_name(device)
    if torch.version.hip:
        if recipe.kind == "float8" and _rocm_fp8(device):
            return False
        raise FP8LabError(f"precision.recipe={recipe.name} is not supported on {name} (ROCm); {_FIX}")
    check_cuda_capability(recipe, name=name, cc=capability(device),
                          probe=lambda: _probe(recipe.name, device.index or 0))
    return False


_FIX = "use --precision.recipe=bf16, or --precision.emulate=on to run it emulated (slow)"


def check_cuda_capability(recipe: Recipe, *, name: str, cc: tuple[int, int], probe: Callable[[], str | None]) -> None:
    """Raise FP8LabError unless an NVIDIA GPU `name` with compute capability `cc` runs
    `recipe` natively. `probe()` runs the real kernel (None = it works) where the
    capability number alone does not settle it."""
    need = recipe.min_capability
    if recipe.kind == "mxfp8":
        if cc[0] == 10:  # sm_100 family: B200, GB200
            return
        if cc[0] == 12:  # sm_12x (RTX 50xx): only if the kernel runs here
            err = probe()
            if err is None:
                return
            raise FP8LabError(f"precision.recipe=mxfp8 failed its kernel probe on {name} "
                              f"(compute capability {cc[0]}.{cc[1]}): {err}; {_FIX}")
        raise FP8LabError(f"precision.recipe=mxfp8 needs compute capability 10.0 (B200/GB200) or a passing probe "
                          f"on 12.x; {name} has {cc[0]}.{cc[1]}; {_FIX}")
    if tuple(cc) < need:
        raise FP8LabError(f"precision.recipe={recipe.name} needs compute capability >= {need[0]}.{need[1]} "
                          f"(FP8 tensor cores: Ada, Hopper, Blackwell); {name} has {cc[0]}.{cc[1]}; {_FIX}")
