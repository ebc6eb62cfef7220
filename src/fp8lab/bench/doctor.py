"""`fp8lab doctor`: what this machine's stack can run, found by running it.

Versions against the tested stack (constraints.txt), the device and its place in the GPU
table, and probes that execute: a bf16 linear forward + backward, for every FP8 recipe a tiny
scaled matmul of its kind and a converted linear (fp8lab's own support check first; on CPU the emulated
path), torch.compile on a tiny function, NCCL all-reduce when several GPUs are present, and on
a GPU its BF16 / FP8 matmul rates (perf.measure, cached for `fp8lab advise`).

Every function that reads the device is a module-level function (device_info, probe_*,
driver_version, measure_rates), so a test on a machine without a GPU can stand in for them.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fp8lab.env import cpu_has_native_bf16, package_version
from fp8lab.procs import Child, run_child

PASS, WARN, FAIL, INFO = "pass", "warn", "fail", "info"


@dataclass
class Check:
    name: str
    status: str  # pass, warn, fail, info
    detail: str
    fix: str = ""


@dataclass
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] | None
    memory_gb: float | None
    count: int
    hip: bool = False


@dataclass
class Report:
    checks: list[Check]
    device: DeviceInfo
    versions: dict
    runs_natively: list[str] = field(default_factory=list)
    runs_emulated: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    measured_rates: dict | None = None
    bf16_runs: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.bf16_runs else 1

    def to_dict(self) -> dict:
        return {"checks": [asdict(c) for c in self.checks], "device": asdict(self.device), "versions": self.versions,
                "verdict": {"default_recipe": "bf16", "bf16_runs": self.bf16_runs, "runs_natively": self.runs_natively,
                            "runs_emulated": self.runs_emulated, "unavailable": self.unavailable},
                "measured_rates": self.measured_rates, "exit_code": self.exit_code}


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# -- what is installed ---------------------------------------------------------------------------


def constraints_path() -> Path:
    import fp8lab

    return Path(fp8lab.__file__).resolve().parents[2] / "constraints.txt"


def read_pins(path: Path | None = None) -> dict[str, str]:
    """{package: version} from the `name==version` lines of constraints.txt ({} if absent)."""
    path = path or constraints_path()
    pins = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def triton_version() -> str | None:
    return package_version("triton") or package_version("pytorch-triton") or package_version("pytorch-triton-rocm")


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, None where it cannot be read."""
    try:
        out = run_child(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], timeout_s=20,
                        separate_stderr=True)
    except OSError:  # no nvidia-smi
        return None
    lines = out.output.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _version_check(name: str, have: str | None, want: str | None, *, needed_for: str) -> Check:
    if have is None:
        return Check(name, WARN, f"not installed ({needed_for})", f"pip install -c constraints.txt {name}")
    if want is None:
        return Check(name, INFO, f"{have} (no pin found in constraints.txt)")
    if have.split("+")[0] == want:
        return Check(name, PASS, f"{have} (tested: {want})")
    return Check(name, WARN, f"{have}, tested with {want}: FP8 training APIs change between releases",
                 f"pip install -c constraints.txt {name}=={want}")


# -- the device ------------------------------------------------------------------------------------


def device_info() -> DeviceInfo:
    import torch

    if not torch.cuda.is_available():
        return DeviceInfo("cpu", platform.processor() or platform.machine() or "cpu", None, None, 0)
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo("cuda", torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)),
                      round(props.total_memory / 1e9, 1), torch.cuda.device_count(), hip=bool(torch.version.hip))


def _device(info: DeviceInfo):
    import torch

    return torch.device("cuda", 0) if info.kind == "cuda" else torch.device("cpu")


def probe_bf16(info: DeviceInfo) -> str | None:
    """A bf16-autocast linear forward + backward on the device; None when it works."""
    import torch

    device = _device(info)
    try:
        lin = torch.nn.Linear(64, 64).to(device)
        x = torch.randn(16, 64, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = lin(x)
        y.float().sum().backward()
        if not torch.isfinite(lin.weight.grad).all():
            return "non-finite gradient from a bf16 linear"
        return None
    except Exception as e:  # noqa: BLE001 - the text is the finding
        return _err(e)


def probe_scaled_mm(kind: str, info: DeviceInfo) -> str | None:
    """A tiny torch._scaled_mm of `kind` (tensorwise, rowwise, mxfp8) on the GPU, random data."""
    import torch

    from fp8lab.perf.measure import fp8_dtype

    device = _device(info)
    M, K, N = 128, 256, 128
    try:
        e4m3 = fp8_dtype(device)
        a = torch.randn(M, K, device=device).to(e4m3)
        b = torch.randn(N, K, device=device).to(e4m3).t()
        if kind == "tensorwise":
            one = torch.ones((), device=device)
            out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        elif kind == "rowwise":
            out = torch._scaled_mm(a, b, scale_a=torch.ones(M, 1, device=device),
                                   scale_b=torch.ones(1, N, device=device), out_dtype=torch.bfloat16)
        elif kind == "mxfp8":
            e8m0 = torch.float8_e8m0fnu
            out = torch._scaled_mm(a, b, scale_a=torch.ones(M * K // 32, device=device).to(e8m0),
                                   scale_b=torch.ones(N * K // 32, device=device).to(e8m0), out_dtype=torch.bfloat16)
        else:
            raise ValueError(kind)
        torch.cuda.synchronize(device)
        if not torch.isfinite(out.float()).all():
            return "non-finite output"
        return None
    except Exception as e:  # noqa: BLE001
        return _err(e)


def probe_converted(recipe: str, info: DeviceInfo) -> str | None:
    """A converted linear forward + backward: the real kernels on a GPU (precision.probe),
    TorchAO's emulation on CPU (in fp32, as fp8lab trains FP8 on CPU)."""
    import torch

    if info.kind == "cuda":
        from fp8lab.precision.probe import probe_recipe

        return probe_recipe(recipe, 0)
    from fp8lab.precision.convert import convert

    try:
        lin = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        convert(lin, recipe=recipe, emulate="on", skip_modules=())
        x = torch.randn(32, 64, requires_grad=True)
        lin(x).sum().backward()
        if not torch.isfinite(x.grad).all():
            return "non-finite gradient"
        return None
    except Exception as e:  # noqa: BLE001
        return _err(e)


def probe_compile(info: DeviceInfo) -> str | None:
    """torch.compile of a tiny function, run once on the device."""
    import torch

    device = _device(info)
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
        x = torch.randn(64, device=device)
        if not torch.allclose(fn(x), torch.nn.functional.silu(x) * 2 + 1, atol=1e-5):
            return "compiled result differs from eager"
        return None
    except Exception as e:  # noqa: BLE001
        return _err(e)


_NCCL_SCRIPT = """
import os, sys, datetime, torch, torch.distributed as dist
backend = sys.argv[1]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if backend == "nccl":
    torch.cuda.set_device(rank)
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
t = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
dist.all_reduce(t)
ok = bool((t == world).all())
dist.destroy_process_group()
print("ALLREDUCE_OK" if ok else f"ALLREDUCE_WRONG {t.tolist()}")
"""


def probe_collective(world: int, *, backend: str = "nccl", timeout: float = 120) -> str | None:
    """An all-reduce across `world` local processes with `backend`; None when every rank agrees."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [Child([sys.executable, "-c", _NCCL_SCRIPT, backend], separate_stderr=True,
                   env=os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                     "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
             for rank in range(world)]
    errors, deadline = [], time.monotonic() + timeout  # one limit for all ranks, not one each
    try:
        for rank, child in enumerate(ranks):
            rc, out, err = child.communicate(max(deadline - time.monotonic(), 0.1))
            if rc is None:
                errors.append(f"rank {rank} timed out after {timeout:.0f} s")
            elif "ALLREDUCE_OK" not in out:
                last = (err.strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
                errors.append(f"rank {rank} (exit {rc}): {last[:300]}")
    finally:
        for child in ranks:  # a rank left waiting for a peer that died
            if child.proc.poll() is None:
                child.kill()
    return "; ".join(errors) or None


def measure_rates(info: DeviceInfo, *, remeasure: bool = False) -> tuple[dict, bool]:
    """(measurement, from_cache): this GPU's rates from the cache, else measured and cached."""
    from fp8lab.perf.measure import cached_rates, measure_gpu_rates, save_measured_rates

    cached = cached_rates(info.name)
    if cached and not remeasure:
        return cached, True
    entry = measure_gpu_rates(_device(info))
    save_measured_rates(entry)
    return entry, False


# -- the checks ------------------------------------------------------------------------------------


def run_doctor(*, measure: bool = True, remeasure: bool = False) -> Report:
    import torch

    from fp8lab.gpus import lookup_gpu, mfu_peak
    from fp8lab.precision.recipes import RECIPES
    from fp8lab.precision.swap import import_torchao

    pins = read_pins()
    info = device_info()
    gpu = info.kind == "cuda"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchao": package_version("torchao"),
                "cuda": torch.version.cuda, "hip": torch.version.hip, "triton": triton_version(),
                "driver": driver_version() if gpu and not info.hip else None}
    checks = [Check("python", INFO, versions["python"]),
              _version_check("torch", package_version("torch") or torch.__version__, pins.get("torch"),
                             needed_for="everything"),
              _version_check("torchao", versions["torchao"], pins.get("torchao"), needed_for="FP8 recipes")]
    if not pins:
        checks.append(Check("tested stack", WARN, f"{constraints_path()} not found: cannot compare versions",
                            "run from a source checkout, or compare with the README's tested stack"))
    if versions["cuda"] or versions["hip"]:
        built = f"CUDA {versions['cuda']}" if versions["cuda"] else f"ROCm {versions['hip']}"
        checks.append(Check("CUDA" if versions["cuda"] else "ROCm", PASS if gpu else WARN,
                            f"torch built with {built}" + ("" if gpu else ", but torch sees no GPU"),
                            "" if gpu else "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"))
    else:
        checks.append(Check("CUDA", INFO, "CPU-only build of torch", "install a CUDA build of torch to train on a GPU"))
    if gpu and not info.hip:
        d = versions["driver"]
        checks.append(Check("driver", PASS if d else WARN, f"NVIDIA driver {d}" if d else "nvidia-smi not available",
                            "" if d else "install the NVIDIA driver utilities to see the driver version"))
    t = versions["triton"]
    if gpu:
        checks.append(Check("triton", PASS if t else WARN, t or "not installed: torch.compile cannot build GPU kernels",
                            "" if t else "install the triton that matches torch (pip install triton)"))
    else:
        checks.append(Check("triton", INFO, (t or "not installed") + " (not needed on CPU)"))

    # The device and what the table knows of it.
    if gpu:
        cc = info.capability
        spec = lookup_gpu(info.name)
        checks.append(Check("GPU", PASS, f"{info.name}, compute capability {cc[0]}.{cc[1]}, {info.memory_gb:g} GB"
                            + (f", {info.count} GPUs" if info.count > 1 else "")))
        checks.append(Check("GPU table", PASS if spec else WARN,
                            f"{spec.name}: MFU divides by {mfu_peak(spec):g} TFLOP/s dense BF16 "
                            f"({mfu_peak(spec, 'fp8'):g} for FP8 runs)" if spec
                            else f"{info.name} is not in fp8lab's table: MFU is reported as null",
                            "" if spec else "pass --gpu NAME to `fp8lab advise`; add the card to src/fp8lab/gpus.py"))
    else:
        checks.append(Check("device", INFO, f"no CUDA GPU: CPU ({os.cpu_count()} cores, {torch.get_num_threads()} "
                                            "torch threads); training runs, throughput is not a GPU's"))

    # bf16, the default recipe.
    err = probe_bf16(info)
    bf16_runs = err is None
    where = "GPU" if gpu else "CPU"
    if bf16_runs and not gpu and not cpu_has_native_bf16():
        # It runs, but emulated: training's compute_dtype=auto computes the bf16 recipe in fp32 here.
        checks.append(Check("recipe bf16 (default)", WARN,
                            f"bf16 emulated, slow: fp32 used ({platform.machine()} CPU without AVX-512 BF16 or AMX; "
                            "bf16 autocast runs about 25x slower than fp32 here)",
                            "nothing to do: compute_dtype=auto trains in fp32 here; a GPU (or a CPU with AVX-512 "
                            "BF16/AMX) runs bf16 natively"))
    else:
        checks.append(Check("recipe bf16 (default)", PASS if bf16_runs else FAIL,
                            f"bf16 autocast linear forward + backward runs on {where}" if bf16_runs else err,
                            "" if bf16_runs else ("--precision.compute_dtype=fp32 (no bf16 on this device)" if gpu
                                                  else "reinstall torch")))
    report = Report(checks=checks, device=info, versions=versions, bf16_runs=bf16_runs)
    if bf16_runs:
        report.runs_natively.append("bf16")

    # FP8 recipes.
    torchao_ok = versions["torchao"] is not None
    if torchao_ok:
        try:
            import_torchao()
        except Exception as e:  # noqa: BLE001
            torchao_ok = False
            checks.append(Check("torchao import", FAIL, _err(e), "pip install -c constraints.txt torchao"))
    for name, recipe in RECIPES.items():
        if not recipe.is_low_precision:
            continue
        label = f"recipe {name}"
        if not torchao_ok:
            report.unavailable[name] = "torchao is not importable"
            checks.append(Check(label, WARN, "needs torchao", "pip install -c constraints.txt torchao"))
            continue
        if not gpu:
            err = probe_converted(name, info)
            if err is None:
                report.runs_emulated.append(name)
                checks.append(Check(label, PASS, "runs emulated on CPU (TorchAO emulation, fp32 compute): FP8 "
                                                 "numerics, not FP8 speed"))
            else:
                report.unavailable[name] = err
                checks.append(Check(label, WARN, f"emulated probe failed: {err}", "use bf16 on CPU"))
            continue
        why = native_here(recipe, info)
        if why:
            report.unavailable[name] = why
            checks.append(Check(label, WARN, f"unsupported: {why}", "use bf16 here; FP8 needs sm_89+ "
                                "(MXFP8: sm_100, or sm_12x where the probe passes)"))
            continue
        kind = "mxfp8" if recipe.kind == "mxfp8" else (
            "tensorwise" if recipe.torchao_recipe == "tensorwise" else "rowwise")
        mm_err = probe_scaled_mm(kind, info)
        lin_err = probe_converted(name, info)
        if mm_err is None and lin_err is None:
            report.runs_natively.append(name)
            checks.append(Check(label, PASS, f"{kind} scaled matmul and a converted linear (fwd + bwd) run natively"))
        else:
            err = "; ".join(f"{what}: {e}" for what, e in (("scaled_mm", mm_err), ("converted linear", lin_err)) if e)
            report.unavailable[name] = err
            fix = "use fp8-tensorwise or bf16; a newer torch/cuBLAS may fix it"
            checks.append(Check(label, WARN, f"kernel probe failed: {err}", fix))

    # torch.compile.
    err = probe_compile(info)
    checks.append(Check("torch.compile", PASS if err is None else WARN,
                        "a tiny function compiles and matches eager" if err is None else err,
                        "" if err is None else "--precision.compile=off (slower; FP8 casts are not fused)"))

    # Several GPUs: NCCL.
    if gpu and info.count > 1:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_nccl_available():
            checks.append(Check("NCCL", WARN, "torch.distributed has no NCCL backend", "install a CUDA build of torch"))
        else:
            world = min(info.count, 8)
            err = probe_collective(world, backend="nccl")
            v = torch.cuda.nccl.version()
            v = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
            checks.append(Check("NCCL", PASS if err is None else FAIL,
                                f"NCCL {v}: all-reduce across {world} GPUs agrees" if err is None else err,
                                "" if err is None else "check NCCL_* settings, P2P/IB, and `nvidia-smi topo -m`"))

    # This card's own rates, for advise.
    if gpu and measure:
        try:
            m, cached = measure_rates(info, remeasure=remeasure)
            report.measured_rates = m
            ratio = f" ({m['fp8_tflops'] / m['bf16_tflops']:.2f}x)" if m.get("fp8_tflops") else ""
            parts = [f"BF16 {m['bf16_tflops']:g}", f"FP8 {m.get('fp8_tflops') or '-'}{ratio}",
                     f"FP8 rowwise {m.get('fp8_rowwise_tflops') or '-'}", f"MXFP8 {m.get('mxfp8_tflops') or '-'}"]
            checks.append(Check("measured rates", INFO,
                                ", ".join(parts) + f" TFLOP/s, copy {m['mem_bandwidth_gbs']:g} GB/s "
                                f"({'cached, ' if cached else ''}{m['date']}); `fp8lab advise --gpu auto` uses them",
                                "--remeasure to measure again" if cached else ""))
        except Exception as e:  # noqa: BLE001
            checks.append(Check("measured rates", WARN, f"measurement failed: {_err(e)}"))
    return report


def native_here(recipe, info: DeviceInfo) -> str | None:
    """None when this GPU runs `recipe` natively, else why not: fp8lab's own answer
    (precision.support.native_support), with this module's probes standing in for the kernel."""
    import torch

    from fp8lab.precision.support import native_support, rocm_has_fp8

    return native_support(recipe, name=info.name, cc=info.capability,
                          rocm_fp8=rocm_has_fp8(torch.device("cuda", 0)) if info.hip else None,
                          probe=lambda: probe_converted(recipe.name, info))
