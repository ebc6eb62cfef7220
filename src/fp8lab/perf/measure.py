"""Measure this GPU: its BF16 / FP8 / MXFP8 matmul rates and copy bandwidth, and the time of
one linear layer's forward + backward under a recipe. Results are cached as JSON under
$FP8LAB_CACHE (default ~/.cache/fp8lab), keyed by the device name and the torch version, so
`fp8lab advise` and the `auto` layer filter reuse them. `fp8lab bench` also stores measured
step times here (store_step_time), which `fp8lab advise` anchors its prediction to.

Method (as ../shared/gpu/README.md and the mmapeak caveat ask): random data, never zeros
(zeros draw less power and run faster); warm-up first; CUDA events; the median of the timed
iterations. torch is imported inside the functions that need it. `time_linear` also runs on
CPU (wall clock, FP8 emulated) for `fp8lab bench --layers`; those numbers describe the
emulation, not FP8 hardware.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from fp8lab.env import cache_dir, package_version, torch_version
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write
from fp8lab.gpus import GPUS, lookup_gpu

RATES_FILE = "gpu_rates.json"
LAYERS_FILE = "layer_timings.json"
STEPS_FILE = "step_times.json"
GEMM_SHAPE = (8192, 8192, 8192)  # M, K, N: large enough to approach peak on every GPU we know
COPY_BYTES = 1 << 30


def _read(name: str) -> dict:
    path = cache_dir() / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # a damaged cache is re-measured, not fatal
        return {}
    return data if isinstance(data, dict) else {}


def _write(name: str, data: dict) -> None:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / name, json.dumps(data, indent=1, sort_keys=True))


def rates_key(device_name: str, torch_version: str) -> str:
    return f"{device_name} | torch {torch_version}"


def load_measured_rates(gpu_id: str) -> dict | None:
    """The newest cached measurement of GPU `gpu_id` (a fp8lab.gpus id), preferring one made
    with this torch version; None when the card was never measured."""
    want = GPUS.get(gpu_id)
    entries = [e for e in _read(RATES_FILE).values()
               if isinstance(e, dict) and want is not None and lookup_gpu(e.get("device_name", "")) is want]
    if not entries:
        return None
    same = [e for e in entries if e.get("torch") == torch_version()]
    return max(same or entries, key=lambda e: e.get("date", ""))


def cached_rates(device_name: str) -> dict | None:
    """The cached measurement of the GPU called `device_name` with this torch, if any."""
    return _read(RATES_FILE).get(rates_key(device_name, torch_version()))


def save_measured_rates(entry: dict) -> Path:
    data = _read(RATES_FILE)
    data[rates_key(entry["device_name"], entry["torch"])] = entry
    _write(RATES_FILE, data)
    return cache_dir() / RATES_FILE


def _time_cuda(fn: Callable[[], object], *, warmup: int, iters: int) -> float:
    """Median seconds of fn() on the current CUDA stream, by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def fp8_dtype(device):
    """e4m3 as this GPU's FP8 tensor cores take it: the fnuz variant on MI300 (gfx94x)."""
    import torch

    arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") if torch.version.hip else ""
    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn


def _gemms(device, M: int, K: int, N: int) -> dict:
    """{rate name: a function running one GEMM of that kind} on random (M, K) x (K, N) data."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(N, K, device=device, dtype=torch.bfloat16, generator=gen)
    e4m3 = fp8_dtype(device)
    a8, b8 = a.to(e4m3), b.to(e4m3).t()  # b8: column-major (K, N), as cuBLAS wants
    one = torch.ones((), device=device)
    row_a, row_b = torch.ones(M, 1, device=device), torch.ones(1, N, device=device)
    fns = {
        "bf16_tflops": lambda: a @ b.t(),
        "fp8_tflops": lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "fp8_rowwise_tflops": lambda: torch._scaled_mm(a8, b8, scale_a=row_a, scale_b=row_b,
                                                       out_dtype=torch.bfloat16, use_fast_accum=True),
    }
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if torch.cuda.get_device_capability(device)[0] in (10, 12) and e8m0 is not None:
        # MXFP8: one e8m0 scale per 32 elements along K, in the swizzled (blocked) layout cuBLAS
        # reads; with M, N multiples of 128 and K/32 a multiple of 4 that is a plain reshape.
        # A row-major, B column-major: the TN layout, the one sm_12x's cuBLAS supports.
        sa = torch.ones(M * K // 32, device=device).to(e8m0)
        sb = torch.ones(N * K // 32, device=device).to(e8m0)
        fns["mxfp8_tflops"] = lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return fns


def measure_gpu_rates(device, *, shape: tuple[int, int, int] = GEMM_SHAPE, warmup: int = 5, iters: int = 20) -> dict:
    """Achieved TFLOP/s of a BF16 matmul, FP8 tensorwise / rowwise scaled matmuls and (on
    Blackwell) an MXFP8 scaled matmul, and copy GB/s, on CUDA `device`. A format that fails is
    recorded with its error instead of a number."""
    import torch

    if device.type != "cuda":
        raise FP8LabError("measuring matmul rates needs a CUDA GPU")
    torch.cuda.set_device(device)
    M, K, N = shape
    flops = 2.0 * M * K * N
    out: dict = {"device_name": torch.cuda.get_device_name(device), "torch": torch_version(),
                 "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(device)),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "shape_mkn": [M, K, N],
                 "method": f"random normal inputs, {warmup} warm-up + median of {iters} CUDA-event timings",
                 "errors": {}}
    for key, fn in _gemms(device, M, K, N).items():
        try:
            out[key] = round(flops / _time_cuda(fn, warmup=warmup, iters=iters) / 1e12, 1)
        except Exception as e:  # noqa: BLE001 - unsupported here: say so, keep measuring the rest
            out[key] = None
            out["errors"][key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    fn = None  # drop the last closure's operands before the copy test allocates 2 GiB
    torch.cuda.empty_cache()
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _time_cuda(lambda: dst.copy_(src), warmup=warmup, iters=iters)
    out["mem_bandwidth_gbs"] = round(2 * COPY_BYTES / copy_s / 1e9)  # read + write
    return out


# -- one linear layer, bf16 vs a recipe (the `auto` layer filter) -------------------------------


def layer_key(device_name: str, recipe: str, m: int, k: int, n: int, compiled: bool) -> str:
    ao = package_version("torchao") or "none"
    return f"{device_name} | torch {torch_version()} | torchao {ao} | {recipe} | {m}x{k}x{n} | compile={compiled}"


def _time_wall(fn: Callable[[], object], *, warmup: int, iters: int) -> float:
    """Median seconds of fn() by the wall clock: for CPU, where every call is synchronous."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_linear(m: int, k: int, n: int, recipe: str, device, *, compiled: bool = True,
                warmup: int = 3, iters: int = 10, emulate: bool | None = None, dtype=None) -> float:
    """Median seconds of one forward + backward of a (k -> n) linear on m tokens under
    `recipe` ("bf16": the plain layer under autocast), as the trainer runs it: fp32 master
    weight, its compute dtype, torch.compile when `compiled`.

    CUDA: real FP8 kernels, CUDA events. CPU: TorchAO's emulation, wall clock; the numbers
    say how the emulation compares with CPU bf16, nothing about FP8 hardware.
    emulate: None = emulated on CPU only. dtype: the autocast dtype (torch.float32: none);
    None = the trainer's default for this recipe and device (precision.support.resolve_compute_dtype).
    """
    import torch
    from torch import nn

    # late: torch and torchao; advise reads the caches without them
    from fp8lab.precision.convert import convert
    from fp8lab.precision.recipes import get_recipe
    from fp8lab.precision.support import resolve_compute_dtype

    if device.type not in ("cuda", "cpu"):
        raise FP8LabError(f"timing layers needs a CUDA GPU or the CPU, not {device.type!r}")
    cuda = device.type == "cuda"
    low_precision = get_recipe(recipe).is_low_precision
    if emulate is None:
        emulate = not cuda
    if dtype is None:
        dtype, _ = resolve_compute_dtype("auto", low_precision=low_precision, device=device)
    # The trainer calls this between seeding and training: leave its RNG streams untouched.
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(k, n, bias=False)).to(device)
        if low_precision:
            convert(model, recipe=recipe, emulate="on" if emulate else "off", skip_modules=())
        if compiled:
            # A fresh module per call recompiles nn.Sequential.forward; past dynamo's recompile
            # limit it would silently run eager. Called before the trainer compiles anything.
            torch._dynamo.reset()
            model = torch.compile(model)
        x = torch.randn(m, k, device=device, requires_grad=True)
        grad = torch.randn(m, n, device=device)

        def step():
            if dtype == torch.float32:
                y = model(x)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    y = model(x)
            y.backward(grad.to(y.dtype))

        if cuda:
            return _time_cuda(step, warmup=warmup, iters=iters)
        return _time_wall(step, warmup=warmup, iters=iters)


def cached_layer_times(device, recipe: str, m: int, k: int, n: int, *, compiled: bool = True) -> dict:
    """{'bf16_s', 'recipe_s', 'cached'} for this layer shape on this GPU, measured once and
    then read from $FP8LAB_CACHE/layer_timings.json."""
    import torch

    name = torch.cuda.get_device_name(device)
    key = layer_key(name, recipe, m, k, n, compiled)
    data = _read(LAYERS_FILE)
    if key in data:
        return data[key] | {"cached": True}
    entry = store_layer_times(name, recipe, m, k, n, compiled,
                              bf16_s=time_linear(m, k, n, "bf16", device, compiled=compiled),
                              recipe_s=time_linear(m, k, n, recipe, device, compiled=compiled))
    return entry | {"cached": False}


def store_layer_times(device_name: str, recipe: str, m: int, k: int, n: int, compiled: bool, *,
                      bf16_s: float, recipe_s: float, source: str = "layer filter") -> dict:
    """Record one shape's bf16 and recipe timings on GPU `device_name` where the `auto` layer
    filter looks them up: `fp8lab bench --layers` on a GPU fills the same cache."""
    entry = {"bf16_s": bf16_s, "recipe_s": recipe_s, "source": source,
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data = _read(LAYERS_FILE)  # read just before writing: another process may have written meanwhile
    data[layer_key(device_name, recipe, m, k, n, compiled)] = entry
    _write(LAYERS_FILE, data)
    return entry


# -- whole training steps (`fp8lab bench` stores them, `fp8lab advise` anchors to them) ----------

# What a step time is stored under: the settings that change its speed. Build it with step_key.
STEP_KEY_FIELDS = ("model", "tokens", "seq_len", "recipe", "grad_accum", "loss_head", "residual_dtype",
                   "activation_checkpoint", "optimizer", "compiled")
_RESIDUAL = {"compute": "bf16"}  # precision.residual_dtype=compute is bf16 under bf16 autocast


def step_key(args, *, tokens: int, seq_len: int, grad_accum: int = 1, recipe: str = "bf16",
             loss_head: str = "fused", residual_dtype: str = "fp32", activation_checkpoint: str = "none",
             optimizer: str = "adamw", compiled: bool = True) -> dict:
    """The key a measured step of model `args` (ModelArgs) is stored and looked up under: tokens
    per micro-batch, sequence length, micro-batches per optimizer step, recipe, and the step
    settings that change its speed (train.loss_head, precision.residual_dtype,
    train.activation_checkpoint, optim.name, torch.compile on or off)."""
    model = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    return {"model": model, "tokens": int(tokens), "seq_len": int(seq_len), "recipe": recipe,
            "grad_accum": int(grad_accum), "loss_head": loss_head,
            "residual_dtype": _RESIDUAL.get(residual_dtype, residual_dtype),
            "activation_checkpoint": activation_checkpoint, "optimizer": optimizer, "compiled": bool(compiled)}


def _canonical(key: dict) -> str:
    """One string per key: sorted JSON, residual dtype named one way."""
    if not isinstance(key, dict):
        raise FP8LabError(f"a step key is a dict (perf.measure.step_key), not {type(key).__name__}")
    missing = [f for f in STEP_KEY_FIELDS if f not in key]
    if missing:
        raise FP8LabError(f"step key lacks {', '.join(missing)}: build it with perf.measure.step_key")
    key = dict(key, residual_dtype=_RESIDUAL.get(key["residual_dtype"], key["residual_dtype"]))
    try:
        return json.dumps(key, sort_keys=True)
    except TypeError as e:
        raise FP8LabError(f"step key is not plain data: {e}") from None


def store_step_time(device_name: str, *, key: dict, step_s: float, source: str) -> None:
    """Record a measured optimizer step of `step_s` seconds on the GPU called `device_name`
    (torch.cuda.get_device_name) under `key` (step_key), with where it came from (`source`,
    e.g. "fp8lab bench, median of 15 steps"). Atomic; the newest measurement of a key wins."""
    if not (isinstance(step_s, (int, float)) and math.isfinite(step_s) and step_s > 0):
        raise FP8LabError(f"a step time is a positive number of seconds, not {step_s!r}")
    canon = _canonical(key)
    entry = {"device_name": device_name, "key": json.loads(canon), "step_s": float(step_s), "source": source,
             "torch": torch_version(), "torchao": package_version("torchao"),
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data = _read(STEPS_FILE)  # read just before writing: another process may have written meanwhile
    data[f"{device_name} | torch {torch_version()} | {canon}"] = entry
    _write(STEPS_FILE, data)


def load_step_time(device_name: str, *, key: dict) -> dict | None:
    """The newest measured step under `key` on this GPU model, preferring one made with this
    torch version: {'step_s', 'source', 'device_name', 'date', 'torch', 'torchao', 'key'}.
    `device_name` is a torch device name or a GPU table id ("h200"): entries match when both name
    the same GPU in fp8lab's table (or, for a card not in it, the same device name)."""
    canon = _canonical(key)
    spec = lookup_gpu(device_name)

    def same_gpu(name: str) -> bool:
        return name == device_name or (spec is not None and lookup_gpu(name) is spec)

    entries = []
    for e in _read(STEPS_FILE).values():
        if not (isinstance(e, dict) and isinstance(e.get("step_s"), (int, float)) and e["step_s"] > 0):
            continue  # a damaged entry is ignored, as a damaged cache is
        try:
            match = same_gpu(str(e.get("device_name", ""))) and _canonical(e.get("key")) == canon
        except FP8LabError:
            continue
        if match:
            entries.append(e)
    if not entries:
        return None
    same = [e for e in entries if e.get("torch") == torch_version()]
    return dict(max(same or entries, key=lambda e: e.get("date", "")))
