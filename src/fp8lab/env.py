"""What this machine and this Python have: the cache folder, the installed stack, the device
to train on, its name and its peak memory. A leaf: it knows nothing of models, precision or
training, so every layer above can ask it. torch is imported inside the functions that need
it, so the CLI's argument parsing stays fast.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import platform
import resource
from pathlib import Path

from fp8lab.errors import FP8LabError


def cache_dir() -> Path:
    """$FP8LAB_CACHE, else ~/.cache/fp8lab: the embedded corpus, random bench data, and the
    GPU rate and layer timing caches all live here."""
    env = os.environ.get("FP8LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fp8lab"


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def torch_version() -> str:
    """torch's version as pip installed it (cache keys use it), without importing torch."""
    return package_version("torch") or "unknown"


def stack_versions() -> dict:
    """torch, torchao, Python and CUDA versions, as every summary and bench result records them."""
    import torch

    return {"torch": torch.__version__, "torchao": package_version("torchao"), "python": platform.python_version(),
            "cuda": torch.version.cuda}


def pick_device(name: str):
    """The torch.device for `train.device` (auto, cpu or cuda)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise FP8LabError("train.device=cuda but torch sees no CUDA GPU; use --train.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN, the library
    behind CPU autocast, reports it. Without it bf16 is emulated: a bf16-autocast linear
    forward + backward measured ~25x slower than fp32 on an AVX2 machine (issue 11)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: nothing native to use
        return False


def device_name(device) -> str:
    """The GPU's marketing name (what the GPU table is keyed by), or the device type."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return device.type


def device_memory_bytes(device) -> int | None:
    """All the memory of `device`: the GPU's, or this machine's RAM; None where unknown."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory_gb(device) -> float:
    """CUDA: torch's peak allocated on `device`. CPU: the process's peak resident set
    (ru_maxrss, KiB on Linux), Python and torch included."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
