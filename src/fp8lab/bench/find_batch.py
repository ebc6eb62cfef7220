"""`fp8lab bench --find-batch`: the largest micro-batch that fits this GPU, per recipe.

FP8 frees memory (a converted linear keeps no bf16 weight copy; low-bit optimizer states,
activation checkpointing free more), and a larger micro-batch turns it into speed: fewer
accumulation steps, larger GEMMs. The search starts where the memory model (perf/memory.py)
puts the largest micro-batch under MEMORY_HEADROOM of the card, then tries real training steps,
each size in its own worker process (the bench worker: build, 1 warm-up, 2 timed steps): a CUDA
out-of-memory fails a size, and the search steps up or down by GROWTH until it has a fitting and a
failing size (halving when the guess does not fit), then bisects between them, at most MAX_TRIALS processes per recipe. Every size that
fits reports its tokens/s, so the answer says the largest and the fastest.

Without a GPU nothing can run out of device memory, so there is nothing to try: the command
says so and exits 2 (`fp8lab advise` predicts memory for a named GPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from fp8lab.errors import FP8LabError

MEMORY_HEADROOM = 0.92  # of the card: the CUDA context, allocator fragmentation, compile's workspaces
GROWTH = 1.25  # step up while nothing failed yet: the memory model is within ~5% (README, Memory)
MAX_TRIALS = 6
OOM_MARKERS = ("outofmemoryerror", "out of memory", "cublas_status_alloc_failed")  # matched lower-case


def search(fits: Callable[[int], bool], start: int, *, max_trials: int = MAX_TRIALS,
           limit: int = 1 << 16) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest size in [1, limit] for which `fits` holds, searched from `start` (sizes fit up
    to some bound and not beyond), in at most `max_trials` calls; with every (size, fits) tried.
    None when even size 1 does not fit. When trials run out the answer is the largest known fit."""
    good, bad = 0, limit + 1  # largest size known to fit; smallest known not to
    trials: list[tuple[int, bool]] = []
    size = max(1, min(start, limit))
    while len(trials) < max_trials:
        ok = fits(size)
        trials.append((size, ok))
        good, bad = (size, bad) if ok else (good, size)
        if bad - good <= 1:
            break
        if bad > limit:  # no failure yet: grow
            size = min(limit, max(good + 1, math.ceil(good * GROWTH)))
        elif good == 0:  # no fit yet: halve (an out-of-memory at the model's guess is the surprise)
            size = max(1, bad // 2)
        else:
            size = (good + bad) // 2
    return (good or None), trials


def predicted_start(cfg, args, recipe: str, memory_bytes: float) -> int:
    """The largest micro-batch whose predicted peak is under MEMORY_HEADROOM x `memory_bytes`
    (compiled, bf16 autocast, every eligible linear converted but the skipped ones), at least 1."""
    from fp8lab.models.head import resolve_head
    from fp8lab.perf.memory import predict_memory
    from fp8lab.perf.roofline import model_linears
    from fp8lab.precision.convert import eligible
    from fp8lab.precision.recipes import get_recipe

    r = get_recipe(recipe)
    converted = {g.name for g in model_linears(args) if r.is_low_precision and
                 eligible(g.name, g.k, g.n, r, list(cfg.precision.skip_modules)) is None}

    def peak(batch: int) -> float:
        return predict_memory(args, tokens=batch * cfg.data.seq_len, recipe=recipe, converted=converted,
                              optimizer=cfg.optim.name, activation_checkpoint=cfg.train.activation_checkpoint,
                              compute_bytes=2, loss_chunk_tokens=cfg.train.loss_chunk_tokens, compiled=True,
                              loss_head=head).total

    try:
        head = resolve_head(cfg.train.loss_head, compiled_cuda=cfg.precision.compile != "off",
                            output_converted="output" in converted, chunk_tokens=cfg.train.loss_chunk_tokens)
    except ValueError as e:
        raise FP8LabError(f"--find-batch {recipe}: {e}") from None

    budget = MEMORY_HEADROOM * memory_bytes
    batch = 1
    while batch < 1 << 16 and peak(batch * 2) <= budget:
        batch *= 2
    lo, hi = batch, batch * 2  # peak(lo) fits (or lo is 1); peak(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def is_oom(row: dict) -> bool:
    text = " ".join([str(row.get("reason") or ""), *row.get("log_tail", [])])
    return any(m in text.lower() for m in OOM_MARKERS)


def find_batch(opts, cfg, args, *, recipe: str, overrides: dict, memory_bytes: float, workdir: Path,
               launch: Callable, progress: Callable[[str], None], limit: int) -> dict:
    """One recipe's search: {'recipe', 'predicted', 'largest', 'fastest', 'trials': [rows]}."""
    start = min(predicted_start(cfg, args, recipe, memory_bytes), limit)
    progress(f"{recipe}: the memory model puts the largest micro-batch at {start}; trying real steps")
    rows: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        spec = {"config": opts.config, "overrides": overrides | {"precision.recipe": recipe,
                                                                 "data.micro_batch_size": str(batch)},
                "warmup": 1, "steps": 2, "layers": False, "store": False}  # too few steps to anchor advise
        row = launch(spec, workdir, timeout_s=opts.timeout_s, tag=f"find-{recipe}-{batch}")
        if row["status"] != "ok" and not is_oom(row):
            raise FP8LabError(f"--find-batch: {recipe} at micro-batch {batch} failed for another reason than "
                              f"memory: {row['reason']}")
        rows[batch] = row
        progress(f"{recipe} x{batch}: " + (f"fits, {row['tokens_per_s']:,.0f} tokens/s, peak "
                                           f"{row['mem_peak_gb']:.1f} GB" if row["status"] == "ok"
                                           else "out of memory"))
        return row["status"] == "ok"

    largest, trials = search(fits, start, limit=limit)
    ok = {b: r for b, r in rows.items() if r["status"] == "ok"}
    fastest = max(ok, key=lambda b: ok[b]["tokens_per_s"], default=None)
    return {"recipe": recipe, "predicted": start, "largest": largest, "fastest": fastest,
            "trials": [{"micro_batch_size": b, "fits": f, "tokens_per_s": rows[b].get("tokens_per_s"),
                        "mem_peak_gb": rows[b].get("mem_peak_gb"),
                        "mem_predicted_gb": rows[b].get("mem_predicted_gb")} for b, f in trials]}


def run_find_batch(opts, cfg, args, *, here: dict, overrides: dict, launch: Callable,
                   progress: Callable[[str], None], notes: list[str], versions: dict) -> dict:
    """--find-batch for every recipe of `opts` on this GPU: the result dict (README, "fp8lab bench")."""
    import tempfile

    from fp8lab.gpus import lookup_gpu

    if opts.vs_plain or opts.layers or any(":" in e for e in opts.recipes):
        raise FP8LabError("--find-batch searches sizes for plain recipe names: drop --vs-plain, --layers and "
                          "':KEY=VALUE' settings (set them as --precision.KEY=VALUE for every recipe)")
    if not here["cuda"]:
        raise FP8LabError("--find-batch tries real steps until one runs out of GPU memory, and there is no GPU "
                          "here; `fp8lab advise -c CONFIG --gpu NAME` predicts the memory of a micro-batch instead")
    spec = lookup_gpu(here["device"])
    if spec is None:
        raise FP8LabError(f"--find-batch: {here['device']} is not in fp8lab's GPU table, so its memory is unknown; "
                          "bench at a few --data.micro_batch_size values instead")
    from fp8lab.train.build import open_data

    limit = len(open_data(cfg).split("train"))  # a micro-batch cannot hold more sequences than there are
    found = []
    with tempfile.TemporaryDirectory(prefix="fp8lab-find-batch-") as tmp:
        for entry in opts.recipes:
            if entry in here["unsupported"]:
                found.append({"recipe": entry, "unsupported": here["unsupported"][entry]})
                continue
            found.append(find_batch(opts, cfg, args, recipe=entry, overrides=overrides,
                                    memory_bytes=spec.mem_gb * 1e9, workdir=Path(tmp), launch=launch,
                                    progress=progress, limit=limit))
    return {"format": 1, "find_batch": found, "device": here["device"], "seq_len": cfg.data.seq_len,
            "memory_gb": spec.mem_gb, "headroom": MEMORY_HEADROOM, "notes": notes, "versions": versions,
            "how": (f"each size: its own process, 1 warm-up + 2 timed steps; out of memory = does not fit; start "
                    f"from the memory model's largest size under {MEMORY_HEADROOM:.0%} of {spec.mem_gb:g} GB, "
                    f"then x{GROWTH} up or down and bisect, at most {MAX_TRIALS} sizes per recipe")}


def find_batch_lines(result: dict) -> list[str]:
    """The answer as markdown lines (console and --md alike)."""
    out = [f"# fp8lab bench --find-batch on {result['device']} ({result['memory_gb']:g} GB), sequences of "
           f"{result['seq_len']}", "", result["how"], "",
           "| recipe | predicted | largest that fits | fastest | tried (micro-batch: tokens/s, peak GB / predicted GB) |",
           "|---|---|---|---|---|"]
    for r in result["find_batch"]:
        if "unsupported" in r:
            out.append(f"| {r['recipe']} | - | unsupported: {r['unsupported']} | - | - |")
            continue
        tried = "; ".join(f"{t['micro_batch_size']}: " + (f"{t['tokens_per_s']:,.0f} tok/s, {t['mem_peak_gb']:.1f} / "
                                                          f"{t['mem_predicted_gb']:.1f} GB" if t["fits"] else "OOM")
                          for t in r["trials"])
        none = "none (1 does not fit)" if {"micro_batch_size": 1, "fits": False} in [
            {k: t[k] for k in ("micro_batch_size", "fits")} for t in r["trials"]] else "none found in the sizes tried"
        out.append(f"| {r['recipe']} | {r['predicted']} | {r['largest'] or none} | "
                   f"{r['fastest'] or '-'} | {tried} |")
    return out + [""] + [f"- {n}" for n in result["notes"]]
