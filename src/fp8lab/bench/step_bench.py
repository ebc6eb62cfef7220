"""`fp8lab bench`: steady-state training-step throughput per recipe, measured side by side.

Each recipe runs in its own worker process (`python -m fp8lab.bench.step_bench --worker`):
its peak memory is its own, its compile caches start cold, and a crash or an out-of-memory
becomes a "failed" row with the reason instead of the end of the benchmark. The worker builds
the run as `fp8lab train` does (train.build.build) and times train.step.train_step, the step
the trainer runs: forward, loss, backward, clip, optimizer. Every recipe starts from the same
weights (build seeds train.seed before building) and trains on the same micro-batches (the
loader's first `train.grad_accum_steps`, taken once and reused every step).

Timing: `warmup` steps first (compile, cold caches, allocator growth), reported together with
the build as startup_s; then `steps` timed steps, each by CUDA events on a GPU and by the wall
clock on CPU. The figure is the median; the spread is min/max tokens/s and the interquartile
range of the step times as a percentage of the median. Speedups are against the bf16 row of
the same invocation, never another baseline.

A --recipes entry may set a [precision] key for its row alone, e.g. `fp8-rowwise:filter_mode=auto`,
so a filter is measured against bf16 in the same invocation. --vs-plain also runs the plain
reference loop (plain_loop.py) per recipe, alternating with fp8lab's worker (vs_plain.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fp8lab.env import device_name
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write
from fp8lab.procs import failure_reason, run_child

FORMAT = 1
BASELINE = "bf16"
DEFAULT_RECIPES = "bf16,fp8-tensorwise,fp8-rowwise"
LAYER_WARMUP, LAYER_ITERS = 3, 10
EMULATED_SPEED_NOTE = ("emulated FP8 speed is NOT representative of FP8 hardware: on this device the "
                       "speedup compares TorchAO's emulation (fp32 compute) with bf16, and says nothing "
                       "about an FP8 GPU")


@dataclass
class BenchOptions:
    config: str | None
    overrides: dict[str, str] = field(default_factory=dict)  # section.key -> text, as on the command line
    recipes: list[str] = field(default_factory=lambda: DEFAULT_RECIPES.split(","))
    warmup: int = 3
    steps: int = 10
    layers: bool = False
    random_data: bool = False
    timeout_s: float | None = None  # per recipe; None: no limit
    vs_plain: bool = False  # also run the plain reference loop per recipe (vs_plain.py)
    find_batch: bool = False  # search the largest micro-batch that fits instead (find_batch.py)


FIND_BATCH_SEQUENCES = 4096  # --find-batch --random-data: enough sequences for the largest micro-batch tried

# [precision] keys a --recipes entry may set for its own row ('fp8-rowwise:filter_mode=auto'):
# those the recipe support check does not depend on, with values that hold no comma.
ENTRY_KEYS = ("filter_mode", "filter_gpu", "compile")


def split_entry(entry: str) -> tuple[str, dict[str, str]]:
    """'fp8-rowwise:filter_mode=auto' -> ('fp8-rowwise', {'precision.filter_mode': 'auto'})."""
    name, *settings = (s.strip() for s in entry.split(":"))
    extra = {}
    for setting in settings:
        key, eq, value = (s.strip() for s in setting.partition("="))
        if not eq or key not in ENTRY_KEYS or not value:
            raise FP8LabError(f"--recipes entry {entry!r}: after the recipe, ':KEY=VALUE' sets one of "
                              f"{', '.join(ENTRY_KEYS)} of [precision] for that row alone, "
                              "e.g. fp8-rowwise:filter_mode=auto")
        extra[f"precision.{key}"] = value
    return name, extra


def parse_recipes(text: str) -> list[str]:
    """'bf16, fp8-rowwise' -> ['bf16', 'fp8-rowwise']; an unknown name is an FP8LabError
    naming it and listing the known ones; duplicates are dropped. Entries with settings
    ('fp8-rowwise : filter_mode=auto') come back in one spelling ('fp8-rowwise:filter_mode=auto')."""
    from fp8lab.precision.recipes import get_recipe

    entries = []
    for s in (s.strip() for s in text.split(",")):
        if s:
            name, extra = split_entry(s)
            get_recipe(name)  # raises with the known names
            entries.append(":".join([name, *(f"{k.removeprefix('precision.')}={v}" for k, v in extra.items())]))
    if not entries:
        raise FP8LabError(f"--recipes {text!r} names no recipe; e.g. --recipes {DEFAULT_RECIPES}")
    return list(dict.fromkeys(entries))


def check_options(opts: BenchOptions) -> None:
    for flag, value, low in (("--steps", opts.steps, 1), ("--warmup", opts.warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FP8LabError(f"{flag} {value!r} must be an integer >= {low}")
    if opts.timeout_s is not None and not opts.timeout_s > 0:
        raise FP8LabError(f"--timeout {opts.timeout_s!r} must be a number of seconds > 0")
    if opts.overrides.get("parallel.data_parallel", "none") != "none":
        raise FP8LabError("bench measures one process: drop --parallel.data_parallel")
    if "precision.recipe" in opts.overrides:
        raise FP8LabError("--precision.recipe has no effect in bench: name the recipes with --recipes")
    if not opts.recipes:
        raise FP8LabError("--recipes names no recipe")


# -- data without a prepared data set ------------------------------------------------------------


def random_dataset(*, vocab: int, seq_len: int, count: int) -> Path:
    """A data directory of `count` random sequences (speed does not depend on what the tokens
    say), written once into the cache and reused, keyed by vocabulary, length and count."""
    import numpy as np

    from fp8lab.data import DatasetExistsError, write_dataset
    from fp8lab.env import cache_dir

    path = cache_dir() / "bench-data" / f"random-v{vocab}-s{seq_len}-n{count}-eos"
    if (path / "manifest.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab - 1, size=(count, seq_len + 1))
    # Documents of random lengths (mean seq_len / 4) end in the last id, its EOS, so that
    # data.document_mask has documents to keep apart and its cost is measured on real structure.
    tokens[rng.random(tokens.shape) < 4 / seq_len] = vocab - 1
    try:
        # val: build() needs one held-out batch even though bench never evaluates.
        return write_dataset(path, train=[tokens], val=[tokens], seq_len=seq_len, vocab_size=vocab, eos_id=vocab - 1,
                             tokenizer={"type": "random"}, sources=[{"kind": "random", "seed": 0}])
    except DatasetExistsError:
        if (path / "manifest.json").exists():  # another bench wrote it first
            return path
        raise


# -- the worker: one recipe, in its own process ------------------------------------------------


def summarise(times: list[float], tokens_per_step: int) -> dict:
    """Median step time and tokens/s, and the spread over the timed steps."""
    med = statistics.median(times)
    q1, q3 = (statistics.quantiles(times, n=4, method="inclusive")[::2] if len(times) > 1 else (med, med))
    return {"step_time_s": med, "tokens_per_s": tokens_per_step / med,
            "tokens_per_s_min": tokens_per_step / max(times), "tokens_per_s_max": tokens_per_step / min(times),
            "iqr_pct": 100.0 * (q3 - q1) / med}


def linear_shapes(model, converted: set[str]) -> list[dict]:
    """The model's distinct nn.Linear shapes: {'names', 'k', 'n', 'count', 'converted'}, names
    without the block index ('attention.wq'), `converted` how many of them the recipe converted."""
    from torch import nn

    groups: dict[tuple[int, int], dict] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            k, n = mod.in_features, mod.out_features
            g = groups.setdefault((k, n), {"names": [], "k": k, "n": n, "count": 0, "converted": 0})
            name = re.sub(r"^layers\.\d+\.", "", fqn)
            if name not in g["names"]:
                g["names"].append(name)
            g["count"] += 1
            g["converted"] += fqn in converted
    return list(groups.values())


def time_layers(shapes: list[dict], *, recipe, m: int, device, compiled: bool, emulated: bool, dtype,
                bf16_dtype) -> list[dict]:
    """Each shape's forward + backward in bf16 and under `recipe`, in this process, one after
    the other (perf.measure.time_linear). A shape that fails is a row with its error."""
    from fp8lab.perf.measure import store_layer_times, time_linear
    from fp8lab.precision.convert import eligible

    rows = []
    for s in shapes:
        row = {**s, "m": m, "recipe": recipe.name, "bf16_ms": None, "recipe_ms": None, "ratio": None}
        why = eligible(s["names"][0], s["k"], s["n"], recipe, skip_modules=())
        if why:
            rows.append(row | {"error": f"{why}: {recipe.name} cannot convert it"})
            continue
        try:
            b = time_linear(m, s["k"], s["n"], "bf16", device, compiled=compiled, dtype=bf16_dtype,
                            warmup=LAYER_WARMUP, iters=LAYER_ITERS)
            r = time_linear(m, s["k"], s["n"], recipe.name, device, compiled=compiled, emulate=emulated, dtype=dtype,
                            warmup=LAYER_WARMUP, iters=LAYER_ITERS)
            row.update(bf16_ms=b * 1e3, recipe_ms=r * 1e3, ratio=b / r)
            if device.type == "cuda" and not emulated:  # real kernels: what filter_mode=auto wants
                store_layer_times(device_name(device), recipe.name, m, s["k"], s["n"], compiled,
                                  bf16_s=b, recipe_s=r, source="fp8lab bench --layers")
        except Exception as e:  # noqa: BLE001 - one shape failing is a finding; time the others
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        rows.append(row)
    return rows


def measure(spec: dict) -> dict:
    """Build the run of `spec` (config, overrides incl. precision.recipe), warm up, time the
    steps; the result row. Runs in the worker process."""
    import gc

    import torch

    from fp8lab.bench.memory import predict_for
    from fp8lab.config import load_config
    from fp8lab.env import peak_memory_gb
    from fp8lab.precision import get_recipe
    from fp8lab.precision.support import resolve_compute_dtype
    from fp8lab.train.build import build
    from fp8lab.train.step import describe_step, finite_or_none, train_step

    cfg = load_config(spec["config"], spec["overrides"])
    # A fresh process: CUDA's peak-allocated counter and ru_maxrss both start here, so the
    # peak is this recipe's alone (build, warm-up and timed steps; not the layer timings).
    t0 = time.perf_counter()
    parts = build(cfg)
    batches = [parts.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)]
    parts.loader.close()
    cuda = parts.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(parts.device)) if cuda else (lambda: None)
    sync()
    build_s = time.perf_counter() - t0
    step = 0
    for _ in range(spec["warmup"]):
        step += 1
        train_step(parts, cfg, step, batches)
    sync()
    startup_s = time.perf_counter() - t0
    times, losses, skipped = [], [], 0
    for _ in range(spec["steps"]):
        step += 1
        if cuda:
            # train_step syncs once (loss and norm to the host; with train.deferred_sync after the
            # optimizer is queued, else before): the end event waits for everything the step queued.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            r = train_step(parts, cfg, step, batches)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            r = train_step(parts, cfg, step, batches)
            dt = time.perf_counter() - t
        times.append(dt)
        losses.append(r.loss)
        skipped += not r.stepped
    mem = peak_memory_gb(parts.device)

    name = device_name(parts.device)
    tokens_per_step = cfg.tokens_per_step
    stats = summarise(times, tokens_per_step)
    tflops = parts.flops_per_token * stats["tokens_per_s"] / 1e12
    peak = parts.mfu_peak_tflops
    row = {
        "recipe": cfg.precision.recipe, "label": parts.label, "status": "ok", "reason": None,
        "emulated": parts.report.emulated,
        "compute_dtype": str(parts.compute_dtype).removeprefix("torch."), "compiled": parts.compiled,
        "converted": parts.report.num_converted, "fp8_linears": parts.report.linear_groups(),
        "params": sum(p.numel() for p in parts.model.parameters()),
        "flops_per_token": parts.flops_per_token, "tokens_per_step": tokens_per_step, "device": name,
        "build_s": build_s, "startup_s": startup_s, "warmup_steps": spec["warmup"], "steps": len(times),
        "step_times_s": times, **stats, "tflops": tflops, "mfu": tflops / peak if peak else None,
        "mfu_peak_tflops": peak, "mem_peak_gb": mem, "mem_predicted_gb": predict_for(parts, cfg).total / 1e9,
        "skipped_steps": skipped,
        "loss_first": finite_or_none(losses[0]), "loss_last": finite_or_none(losses[-1]), "notes": list(parts.notes),
        "step": describe_step(parts, cfg),
    }
    # Stored only for the settings step_key names (others at their defaults): advise looks these up.
    plain_settings = (not cfg.train.loss_chunk_tokens and not cfg.data.document_mask and cfg.train.deferred_sync
                      and cfg.optim.fused == "auto" and cfg.precision.compute_dtype == "auto")
    if cuda and cfg.precision.recipe == BASELINE and not skipped and spec.get("store", True) and plain_settings:
        # `fp8lab advise` anchors its step predictions to the measured bf16 step of the same shapes and settings.
        from fp8lab.perf.measure import step_key, store_step_time

        key = step_key(parts.model_args, tokens=cfg.data.micro_batch_size * cfg.data.seq_len, seq_len=cfg.data.seq_len,
                       grad_accum=cfg.train.grad_accum_steps, loss_head=parts.loss_head,
                       residual_dtype=cfg.precision.residual_dtype, activation_checkpoint=cfg.train.activation_checkpoint,
                       optimizer=cfg.optim.name, compiled=parts.compiled)
        store_step_time(name, key=key, step_s=stats["step_time_s"], source=f"fp8lab bench, median of {len(times)} steps")
    if spec.get("layers") and parts.report.recipe != BASELINE:
        shapes = linear_shapes(parts.model, {c["name"] for c in parts.report.converted})
        recipe, device, compiled = get_recipe(parts.report.recipe), parts.device, parts.compiled
        dtype = parts.compute_dtype
        emulated = parts.report.emulated
        del parts, batches  # the step's memory is measured; the layers get the device to themselves
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        bf16_dtype, _ = resolve_compute_dtype(cfg.precision.compute_dtype, low_precision=False, device=device)
        row["layers"] = time_layers(shapes, recipe=recipe, m=cfg.data.micro_batch_size * cfg.data.seq_len,
                                    device=device, compiled=compiled, emulated=emulated, dtype=dtype,
                                    bf16_dtype=bf16_dtype)
    return row


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fp8lab.bench.step_bench", description="one recipe of `fp8lab bench`")
    p.add_argument("--worker", required=True, help="the spec, as JSON")
    p.add_argument("--result", required=True, type=Path, help="where to write the result row (JSON)")
    args = p.parse_args(argv)
    try:
        row = measure(json.loads(args.worker))
    except FP8LabError as e:
        print(f"fp8lab: error: {e}", file=sys.stderr)
        return 2
    atomic_write(args.result, json.dumps(row))
    return 0


# -- the parent: check, launch, collect ----------------------------------------------------------


def _worker_env() -> dict[str, str]:
    # The worker must import this same fp8lab, installed or not.
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def launch(spec: dict, workdir: Path, *, timeout_s: float | None, tag: str,
           module: str = "fp8lab.bench.step_bench") -> dict:
    """Run one worker (`python -m module --worker SPEC --result FILE`; files named by `tag`); its
    row, or a failed row with the reason and the log's tail."""
    result, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec), "--result", str(result)]
    child = run_child(cmd, env=_worker_env(), log=log, timeout_s=timeout_s)  # a Ctrl-C here ends it at once
    if child.returncode == 0 and result.exists():
        return json.loads(result.read_text()) | {"wall_s": child.wall_s}
    return {"status": "failed", "reason": failure_reason(child.returncode, child.output, timeout_s),
            "wall_s": child.wall_s, "log_tail": child.output.splitlines()[-30:]}


def run_bench(opts: BenchOptions, *, progress: Callable[[str], None] = lambda s: None) -> dict:
    """The whole benchmark: the result dict (see README, "fp8lab bench")."""
    check_options(opts)
    from fp8lab.config import load_config
    from fp8lab.env import stack_versions
    from fp8lab.models.presets import PRESETS
    from fp8lab.precision import get_recipe
    from fp8lab.precision.support import check_recipes_here
    from fp8lab.train.build import model_args_for, open_data

    overrides = dict(opts.overrides)
    cfg = load_config(opts.config, overrides)
    if opts.vs_plain:
        from fp8lab.bench.vs_plain import MODULE as PLAIN_MODULE
        from fp8lab.bench.vs_plain import PlainRuns, check_comparable

        check_comparable(cfg)  # before anything is written or started
    entries = {e: split_entry(e) for e in opts.recipes}
    for _, extra in entries.values():
        load_config(opts.config, overrides | extra)  # a bad value in an entry fails here, not in its worker
    notes: list[str] = []
    if opts.random_data:
        vocab = cfg.model.vocab_size or PRESETS[cfg.model.preset].vocab_size
        count = FIND_BATCH_SEQUENCES if opts.find_batch else cfg.data.micro_batch_size * cfg.train.grad_accum_steps
        path = random_dataset(vocab=vocab, seq_len=cfg.data.seq_len, count=count)
        overrides["data.path"] = str(path)
        cfg = load_config(opts.config, overrides)
        notes.append(f"--random-data: {count} random sequences of vocabulary {vocab} ({path})")
    if cfg.data.document_mask:
        notes.append("data.document_mask=true: each position attends only within its document (SDPA with a "
                     "boolean mask; on CUDA that rules out the flash kernel); bench again without it for its cost")
    # The trainer's own support check (in a child process where there is CUDA: this process must
    # not hold a CUDA context while the workers measure): what it would refuse is unsupported.
    here = check_recipes_here(list(dict.fromkeys(n for n, _ in entries.values())), device=cfg.train.device,
                              emulate=cfg.precision.emulate, compute_dtype=cfg.precision.compute_dtype)
    # Data and model errors surface here, once, before any worker starts (and the embedded
    # corpus is built once, not raced by the workers).
    args = model_args_for(cfg, open_data(cfg).vocab_size)
    name, cuda = here["device"], here["cuda"]
    tokens_per_step = cfg.tokens_per_step
    if opts.find_batch:
        from fp8lab.bench.find_batch import run_find_batch

        return run_find_batch(opts, cfg, args, here=here, overrides=overrides, launch=launch, progress=progress,
                              notes=notes, versions=stack_versions())

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fp8lab-bench-") as tmp:
        plain = None
        if opts.vs_plain:
            def run_plain(spec: dict, tag: str) -> dict:
                return launch(spec, Path(tmp), timeout_s=opts.timeout_s, tag=tag, module=PLAIN_MODULE)
            plain = PlainRuns(cfg, args, opts, cuda=cuda, run=run_plain, baseline=BASELINE, progress=progress)
        for i, (entry, (rname, extra)) in enumerate(entries.items()):
            recipe = get_recipe(rname)
            if rname in here["unsupported"]:
                rows.append({"recipe": entry, "status": "unsupported", "reason": here["unsupported"][rname]})
                progress(f"{entry}: unsupported: {here['unsupported'][rname]}")
                continue
            # With --vs-plain, fp8lab and the plain loop take turns going first (A B, B A, ...),
            # so a drift over the run (clocks, temperature) does not fall on one side only.
            entry_overrides = overrides | extra | {"precision.recipe": rname}
            plain_first = plain is not None and i % 2 == 1
            if plain_first:
                plain.measure(entry, load_config(opts.config, entry_overrides), tag=f"{i:02d}-{rname}-plain")
            layers = opts.layers and recipe.is_low_precision and not extra  # an entry's settings: the same layers
            progress(f"{entry}: build + {opts.warmup} warm-up + {opts.steps} timed steps"
                     + (" + layer timings" if layers else "") + " ...")
            spec = {"config": opts.config, "overrides": entry_overrides,
                    "warmup": opts.warmup, "steps": opts.steps, "layers": layers}
            # The worker names the recipe; the row is the entry's (which may carry settings).
            row = launch(spec, Path(tmp), timeout_s=opts.timeout_s, tag=f"{i:02d}-{rname}") | {"recipe": entry}
            if extra and row["status"] == "ok":
                row["label"] = f"{row['label']} {entry.partition(':')[2].replace(':', ' ')}"
            rows.append(row)
            if row["status"] == "ok":
                progress(f"{entry}: {row['tokens_per_s']:,.0f} tokens/s (startup {row['startup_s']:.1f} s, "
                         f"{row['wall_s']:.0f} s in all)")
            else:
                progress(f"{entry}: failed: {row['reason']}")
            if plain is not None and not plain_first:
                plain.measure(entry, load_config(opts.config, entry_overrides), tag=f"{i:02d}-{rname}-plain")

    base = next((r for r in rows if r["recipe"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:  # emulated rows already carry EMULATION_NOTE (build's notes)
        if r["status"] == "ok":
            r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    if base is None:
        notes.append("no speedups: bf16, the baseline, " + ("was not measured" if BASELINE not in opts.recipes
                                                            else "did not run") + " in this invocation")
    if any(r.get("emulated") for r in rows):
        notes.append(EMULATED_SPEED_NOTE)
    ok = [r for r in rows if r["status"] == "ok"]
    if any(r["skipped_steps"] for r in ok):
        notes.append("some timed steps had a non-finite loss or gradient norm and skipped the optimizer step "
                     "(see skipped_steps): those steps are cheaper than real ones")
    if plain is not None:
        notes += plain.merge(rows)
    layer_rows = [lr for r in rows for lr in r.pop("layers", [])]
    compiled = next((r["compiled"] for r in ok), None)
    return {
        "format": FORMAT, "config": opts.config, "overrides": overrides, "device": name,
        "model": {"preset": cfg.model.preset, **dataclasses.asdict(args)},
        "params": next((r["params"] for r in ok), None), "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.data.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
        "tokens_per_step": tokens_per_step, "warmup_steps": opts.warmup, "timed_steps": opts.steps,
        "timing": ("CUDA events around each train_step" if cuda
                   else "wall clock (time.perf_counter) around each train_step"),
        "compiled": compiled,
        "startup": ("startup_s = build + warm-up steps, torch.compile included when compiled; torch's on-disk "
                    "compile caches outlive the process, so a repeated run starts faster"),
        "memory": ("torch.cuda.max_memory_allocated of the recipe's process" if cuda
                   else "peak resident set (ru_maxrss) of the recipe's process, Python and torch included")
                  + "; predicted: fp8lab's memory model (perf/memory.py) for the same step, tensors only",
        "baseline": BASELINE,
        "plain": plain.describe() if plain is not None else None,
        "recipes": rows,
        "layers": None if not opts.layers else {
            "what": (f"one nn.Linear (in k -> out n, fp32 master weight) forward + backward on m = "
                     f"micro_batch_size x seq_len = {cfg.data.micro_batch_size * cfg.data.seq_len} random tokens, "
                     f"bf16 and the recipe each timed in that recipe's worker process, "
                     f"{'compiled' if compiled else 'eager'}, median of {LAYER_ITERS} after {LAYER_WARMUP} warm-up, "
                     + ("CUDA events" if cuda else "wall clock, FP8 emulated") + "; ratio = bf16 ms / recipe ms "
                     "(> 1: the recipe is faster); converted = how many of these layers the step above converted"),
            "rows": layer_rows},
        "notes": notes, "versions": stack_versions(),
    }


def exit_code(result: dict) -> int:
    """0 when every supported recipe ran (unsupported rows are findings), 1 when one failed
    (with --vs-plain: the plain loop's run of it too)."""
    return 1 if any("failed" in (r["status"], (r.get("plain") or {}).get("status")) for r in result["recipes"]) \
        else 0


if __name__ == "__main__":
    sys.exit(worker_main())
