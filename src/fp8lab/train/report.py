"""What a run says about itself: the header it prints at the start, one metrics.jsonl record per
step, and summary.json at the end. Plain functions of what the trainer hands them."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from rich.markup import escape

from fp8lab.config import JobConfig
from fp8lab.env import device_name, peak_memory_gb, stack_versions
from fp8lab.precision.fsdp import fp8_gathered_weights
from fp8lab.precision.support import EMULATION_NOTE
from fp8lab.train.build import RunParts
from fp8lab.train.dist import DistEnv
from fp8lab.train.fingerprint import batch_crc
from fp8lab.train.step import StepResult, describe_step, finite_or_none
from fp8lab.ui import console


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_header(run_dir: Path, cfg: JobConfig, parts: RunParts, env: DistEnv, *, tokens_per_step: int) -> None:
    """What the run is about to do: where, which recipe and dtype really compute, what converted,
    the resolved config (one line per section) and the notes. Rank 0 speaks."""
    if not env.main:
        return
    if env.world_size > 1:
        console.print(f"FSDP2 over {env.world_size} ranks"
                      + (", weights all-gathered in FP8" if parts.report.fsdp_float8_all_gather else ""))
    n_params = sum(p.numel() for p in parts.model.parameters())
    console.print(
        f"[bold]fp8lab train[/] {run_dir}: {escape(cfg.model.init_from or cfg.model.preset)} ({n_params / 1e6:.1f}M params) "
        f"on {device_name(parts.device)}, recipe {parts.label}, compute {dtype_name(parts.compute_dtype)}, "
        f"compile {'on' if parts.compiled else 'off'}, {tokens_per_step:,} tokens/step"
    )
    console.print(f"  {parts.report.summary()}")
    console.print(f"  step: {describe_step(parts, cfg)}", style="dim")
    console.print("  config: " + "\n          ".join(escape(line) for line in cfg.compact()), style="dim")
    for note in parts.notes:
        if note != EMULATION_NOTE:  # convert() already said it, loudly
            console.print(f"  [yellow]note:[/] {note}")


def step_record(step: int, r: StepResult, dt: float, batches, *, cfg: JobConfig, parts: RunParts, env: DistEnv,
                tokens_per_step: int, first_in_process: bool) -> dict:
    """One metrics.jsonl record (README, "What a run writes")."""
    tps = tokens_per_step / dt  # all ranks together
    tflops = parts.flops_per_token * tps / env.world_size / 1e12  # per GPU, as the peak is
    peak = parts.mfu_peak_tflops
    rec = {
        "step": step, "loss": finite_or_none(r.loss), "lr": r.lr, "grad_norm": finite_or_none(r.grad_norm),
        "tokens": step * tokens_per_step, "step_time_s": dt, "tokens_per_s": tps, "tflops": tflops,
        "mfu": tflops / peak if peak else None, "mem_peak_gb": peak_memory_gb(parts.device),
        "recipe": cfg.precision.recipe, "data_crc": batch_crc(batches),
    }
    if first_in_process:
        rec["warmup"] = True  # includes compile and cold caches: left out of the median
        # What computed, once per process (a resume or a rollback may change it).
        rec["compute_dtype"], rec["label"] = dtype_name(parts.compute_dtype), parts.label
    if not r.stepped:
        rec["skipped"] = "nonfinite"
    return rec


def run_summary(run_dir: Path, cfg: JobConfig, parts: RunParts, env: DistEnv, recs: list[dict], *, status: str,
                final_eval: float | None, facts: dict) -> dict:
    """summary.json: what ran, how far, the final losses and the speed (median over the steps
    that were neither a process's first nor skipped). `facts`: the trainer's own counts (steps,
    skipped_steps, rollbacks, recipe_history, bf16_layers, init_digest)."""
    timed = [r["tokens_per_s"] for r in recs if not r.get("warmup") and not r.get("skipped")]
    losses = [r["loss"] for r in recs if r["loss"] is not None]
    return {
        "run_dir": str(run_dir), "status": status, "recipe": cfg.precision.recipe, "label": parts.label,
        "emulated": parts.report.emulated, "compute_dtype": dtype_name(parts.compute_dtype),
        "compiled": parts.compiled, "step": describe_step(parts, cfg), "device": device_name(parts.device),
        "conversion": parts.report.to_dict(),
        **facts,
        "final_train_loss": losses[-1] if losses else None,
        "final_eval_loss": None if final_eval is None else finite_or_none(final_eval),
        "tokens_per_s_median": statistics.median(timed) if timed else None,
        "mem_peak_gb": max((r["mem_peak_gb"] for r in recs), default=None),
        "params": sum(p.numel() for p in parts.model.parameters()), "flops_per_token": parts.flops_per_token,
        "mfu_peak_tflops": parts.mfu_peak_tflops, "notes": parts.notes,
        "parallel": {"data_parallel": cfg.parallel.data_parallel, "world_size": env.world_size,
                     "fp8_gathered_weights": fp8_gathered_weights(parts.model)},
        "versions": stack_versions(),
    }
