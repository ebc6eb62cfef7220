"""The training loop: batches, the step (step.py), guard, log, eval, checkpoint. The one
device-to-host transfer per step (in step.py) carries the loss and the gradient norm and
serves the guard and the log. Rollbacks live in recovery.py."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from fp8lab.bench.gpus import bf16_peak_tflops
from fp8lab.bench.measure import stack_versions
from fp8lab.config import JobConfig
from fp8lab.data.loader import IGNORE_INDEX  # padding targets, made by the loader
from fp8lab.data.shards import sha256_file
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write
from fp8lab.precision import telemetry
from fp8lab.precision.capability import EMULATION_NOTE, device_name
from fp8lab.train.build import Built, build
from fp8lab.train.checkpoint import (
    list_complete, load_tensors, newest_verified, quarantine, read_state, remove_stale, save_checkpoint,
)
from fp8lab.train.console import TrainProgress, console, setup_logging
from fp8lab.train.faults import kill_point
from fp8lab.train.fingerprint import batch_crc, weights_digest
from fp8lab.train import dist
from fp8lab.train.guard import Guard
from fp8lab.train.logs import NullLogs, RunLogs, TensorBoardWriter, read_jsonl
from fp8lab.train.recovery import GuardStopped, Recovery
from fp8lab.train.rng import capture_rng, restore_rng
from fp8lab.train.rundir import check_run_dir, write_run_config
from fp8lab.train.step import (
    StepResult, finite_or_none, fp8_gathered_weights, model_loss, peak_memory_gb, refresh_fp8_gather_scales,
    to_device, token_loss, train_step,
)


def data_fingerprint(dataset) -> str:
    """sha256 of the data set's manifest, which lists every shard's sha256: a resumed run
    must continue on the data it started on."""
    return sha256_file(Path(dataset.path) / "manifest.json")


class Trainer(Recovery):
    def __init__(self, cfg: JobConfig, run_dir: Path):
        setup_logging()
        self.run_dir = Path(run_dir)
        # Under torchrun with FSDP2 every rank runs this; rank 0 alone writes files and prints.
        self.env = dist.init(cfg.parallel.data_parallel, cfg.train.device)
        self.cfg, resume, messages = check_run_dir(self.run_dir, cfg)
        dist.barrier()  # every rank has read the run directory before rank 0 writes to it
        state = read_state(resume[1]) if resume is not None else {}
        # Guard state that shapes the model and the data order (see recovery.py).
        self.bf16_layers: list[str] = state.get("bf16_layers", [])
        self.skip_windows: list[list[int]] = state.get("skip_windows", [])
        self.recipe_history: list[dict] = state.get("recipe_history", [])
        # Bad data, device, recipe or a missing extra fail here, before the run dir is touched.
        if self.cfg.logging.tensorboard:
            TensorBoardWriter.check_available()
        self.b: Built = build(self.cfg, extra_skip=self.bf16_layers)
        self.guard = Guard(self.cfg.guard)
        self.step = 0
        self.skipped_steps = 0
        if resume is not None:
            self._restore(resume[1], state)
        refresh_fp8_gather_scales(self.b)  # the first step's FP8 gathers use precomputed scales too
        # Taken before the first step: what every recipe of a comparison must share.
        self.init_digest: str | None = state.get("init_digest") if resume is not None else (
            weights_digest(self.b.model) if self.cfg.logging.fingerprint else None)
        removed, damaged = [], []
        if self.env.main:
            write_run_config(self.run_dir, self.cfg)
            removed = remove_stale(self.run_dir)
            _, damaged = newest_verified(self.run_dir)
        dist.barrier()
        self.tokens_per_step = self.cfg.tokens_per_step * self.env.world_size  # over all ranks
        dev = self.b.device
        self.peak_tflops = bf16_peak_tflops(device_name(dev)) if dev.type == "cuda" else None
        self.logs = RunLogs(self.run_dir, resume_step=self.step if resume else None,
                            tensorboard=self.cfg.logging.tensorboard) if self.env.main else NullLogs()
        self.ckpt_steps = [s for s, _ in list_complete(self.run_dir)]
        for m in messages:
            self.event("config", m)
        for path, why in damaged:
            self.event("damaged", f"checkpoint {path.name} failed verification ({why}); moved to "
                                  f"{quarantine(path).name} and not used")
        if removed:
            self.event("cleanup", f"removed unfinished checkpoint folders left by a killed run: {', '.join(removed)}")
        if resume is not None:
            self.event("resume", f"resumed from {resume[1]} at step {self.step}")

    # -- state ------------------------------------------------------------------------

    def _restore(self, path: Path, state: dict) -> None:
        """Load a checkpoint into the built model, optimizer, loader, RNG and guard."""
        saved_args = state.get("model_args", {})
        now = dataclasses.asdict(self.b.model_args)
        diff = [k for k in now if k in saved_args and saved_args[k] != now[k]]
        if diff:
            raise FP8LabError(f"checkpoint {path} has a different model shape: "
                              + ", ".join(f"{k} {saved_args[k]} vs {now[k]}" for k in diff))
        if state.get("world_size", 1) != self.env.world_size:
            raise FP8LabError(f"checkpoint {path} was written by {state.get('world_size', 1)} rank(s), this run has "
                              f"{self.env.world_size}: each rank's share of the data would change; resume with "
                              f"--nproc_per_node={state.get('world_size', 1)}")
        if state.get("data_fingerprint") not in (None, data_fingerprint(self.b.dataset)):
            raise FP8LabError(f"the data at {self.b.dataset.path} is not the data this run was trained on "
                              f"(its manifest changed since {path}); point data.path at the original data "
                              "or start a new --run-dir")
        load_tensors(path, model=self.b.model, optimizer=self.b.optimizer)
        self.b.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def save(self, *, new_revision: bool = False) -> None:
        state = {
            "format": 1, "step": self.step, "recipe": self.cfg.precision.recipe,
            "tokens": self.step * self.tokens_per_step, "data": self.b.loader.state_dict(),
            "data_fingerprint": data_fingerprint(self.b.dataset), "rng": capture_rng(),
            "model_args": dataclasses.asdict(self.b.model_args), "skipped_steps": self.skipped_steps,
            "guard": self.guard.state_dict(), "bf16_layers": self.bf16_layers,
            "skip_windows": self.skip_windows, "recipe_history": self.recipe_history,
            "init_digest": self.init_digest, "world_size": self.env.world_size,
        }
        good = self.guard.last_good_step
        save_checkpoint(self.run_dir, step=self.step, model=self.b.model, optimizer=self.b.optimizer,
                        state=state, keep=self.cfg.checkpoint.keep, protect=() if good is None else (good,),
                        new_revision=new_revision)
        self.ckpt_steps = [s for s, _ in list_complete(self.run_dir)]

    def event(self, kind: str, message: str, **fields) -> None:
        """Something the user must hear about: to the console and to events.jsonl (rank 0)."""
        if self.env.main:
            console.print(f"[yellow]{kind}: {message}[/]")
        self.logs.event({"step": self.step, "kind": kind, "message": message, **fields})

    # -- one step ---------------------------------------------------------------------

    def _batch_index(self) -> int:
        """The loader's position as one number: micro-batches served since the run began."""
        loader = self.b.loader
        return loader.epoch * loader.batches_per_epoch + loader.position

    def next_batches(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This step's micro-batches, passing over the data windows a rollback skipped, and
        the index of the first one."""
        out, first = [], None
        while len(out) < self.cfg.train.grad_accum_steps:
            index = self._batch_index()
            batch = self.b.loader.next_batch()
            if any(start <= index < end for start, end in self.skip_windows):
                continue
            first = index if first is None else first
            out.append(batch)
        return out, first

    def train_step(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                   drill: float = 1.0) -> StepResult:
        return train_step(self.b, self.cfg, step, batches, drill=drill)

    @torch.no_grad()
    def evaluate(self) -> float:
        b = self.b
        # On CPU, eval runs the compiled blocks eagerly: compiling the no-grad graph too
        # would cost more than the few eval batches save.
        stance = "force_eager" if b.device.type == "cpu" else "default"
        b.model.eval()
        total, count = torch.zeros((), device=b.device), 0
        with torch.compiler.set_stance(stance):
            for x, y in b.eval_batches:
                count += int((y != IGNORE_INDEX).sum())  # on the host copy: no device sync
                x, y = to_device(x, b.device), to_device(y, b.device)
                with b.autocast():
                    total += model_loss(b.model, x, y, chunk_tokens=self.cfg.train.loss_chunk_tokens)
        b.model.train()
        if self.env.active:
            # Each rank evaluated its rows of the held-out batches: add them up. FSDP2 leaves the
            # root's weights gathered after a forward with no backward; shard them again.
            from torch.distributed.fsdp import FSDPModule

            # float64: a token count above 2**24 is not exact in float32.
            both = torch.stack([total.double(), torch.tensor(float(count), device=b.device, dtype=torch.float64)])
            torch.distributed.all_reduce(both)
            for m in b.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            total_all, count_all = both.tolist()
            return total_all / count_all
        return total.item() / count

    def collect_telemetry(self, batch: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        """Per-layer FP8 cast statistics on `batch` (an extra pass; training is unaffected)."""
        recipe = self.b.report.recipe
        if recipe == "bf16" or not self.b.report.converted:
            return []
        from fp8lab.precision.recipes import get_recipe

        x, y = to_device(batch[0], self.b.device), to_device(batch[1], self.b.device)
        return telemetry.collect(self.b.model, get_recipe(recipe), inputs=x,
                                 loss_fn=lambda logits: token_loss(logits, y, reduction="mean"),
                                 autocast=self.b.autocast)

    # -- the loop ---------------------------------------------------------------------

    def _drill(self, first_index: int) -> float:
        """The fault drills' loss multiplier for the step whose first micro-batch is
        `first_index`. A drill belongs to the data that step N first trains on, so a
        rollback that skips that data removes it, as it would a bad batch."""
        d, accum = self.cfg.debug, self.cfg.train.grad_accum_steps
        if d.inject_nan_at_step and first_index == (d.inject_nan_at_step - 1) * accum:
            return float("nan")
        if d.inject_spike_at_step and first_index == (d.inject_spike_at_step - 1) * accum:
            return d.inject_spike_factor
        return 1.0

    def _header(self) -> None:
        b, cfg = self.b, self.cfg
        n_params = sum(p.numel() for p in b.model.parameters())
        if not self.env.main:
            return
        if self.env.world_size > 1:
            console.print(f"FSDP2 over {self.env.world_size} ranks"
                          + (", weights all-gathered in FP8" if b.float8_all_gather else ""))
        console.print(
            f"[bold]fp8lab train[/] {self.run_dir}: {cfg.model.preset} ({n_params / 1e6:.1f}M params) "
            f"on {device_name(b.device)}, recipe {cfg.precision.recipe}, "
            f"compute {str(b.compute_dtype).removeprefix('torch.')}, compile {'on' if b.compiled else 'off'}, "
            f"{self.tokens_per_step:,} tokens/step"
        )
        console.print(f"  {b.report.summary()}")
        for note in b.notes:
            if note != EMULATION_NOTE:  # convert() already said it, loudly
                console.print(f"  [yellow]note:[/] {note}")

    def _record(self, step: int, r: StepResult, dt: float, batches, *, first_in_process: bool) -> dict:
        tps = self.tokens_per_step / dt  # all ranks together
        tflops = self.b.flops_per_token * tps / self.env.world_size / 1e12  # per GPU, as the peak is
        rec = {
            "step": step, "loss": finite_or_none(r.loss), "lr": r.lr, "grad_norm": finite_or_none(r.grad_norm),
            "tokens": step * self.tokens_per_step, "step_time_s": dt, "tokens_per_s": tps, "tflops": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "mem_peak_gb": peak_memory_gb(self.b.device), "recipe": self.cfg.precision.recipe,
            "data_crc": batch_crc(batches),
        }
        if first_in_process:
            rec["warmup"] = True  # includes compile and cold caches: left out of the median
        if not r.stepped:
            rec["skipped"] = "nonfinite"
        return rec

    def run(self) -> dict:
        try:
            return self._run()
        except GuardStopped as stop:
            self._finish(None, status="stopped-by-guard", reason=str(stop))
            raise

    def _run(self) -> dict:
        self._header()
        progress = self.start_loop()
        try:
            while self.step < self.cfg.train.steps:
                if self.advance(progress):
                    self.event("stop", f"debug.stop_at_step={self.step}: stopping as if interrupted")
                    self.logs.close()
                    self.b.loader.close()
                    return {"stopped_at": self.step}
        finally:
            progress.close()
        if self.final_eval is None:  # resumed a run that had already finished: nothing trained now
            self.final_eval = self.evaluate()
        if self.cfg.checkpoint.at_end:
            self.save()
        return self._finish(self.final_eval, status="completed")

    def start_loop(self) -> TrainProgress:
        """Reset the loop's clocks; returns the progress display advance() updates."""
        self._last = time.perf_counter()
        self._first_step = self.step + 1
        self.final_eval: float | None = None
        cfg = self.cfg
        return TrainProgress(total=cfg.train.steps, start=self.step,
                             mode=cfg.logging.progress if self.env.main else "quiet",
                             log_interval=cfg.logging.log_interval)

    def advance(self, progress: TrainProgress) -> bool:
        """One iteration of the loop: a step with everything around it (guard, log, eval,
        checkpoint). True when debug.stop_at_step asks to stop here."""
        cfg = self.cfg  # a rollback may have changed the recipe
        step = self.step + 1
        batches, first_index = self.next_batches()
        if cfg.logging.telemetry_interval and step % cfg.logging.telemetry_interval == 0:
            self.logs.layer_stats(step, self.collect_telemetry(batches[0]))
        result = self.train_step(step, batches, drill=self._drill(first_index))
        now = time.perf_counter()
        self.step = step
        rec = self._record(step, result, now - self._last, batches, first_in_process=step == self._first_step)
        if not result.stepped:
            self.skipped_steps += 1
            self.event("skip", f"step {step}: non-finite loss {result.loss} or grad norm "
                               f"{result.grad_norm}; optimizer step skipped",
                       loss=rec["loss"], grad_norm=rec["grad_norm"])
        alarm = self.guard.observe(step, result.loss, result.grad_norm)
        if alarm is not None:
            rec["alarm"] = alarm.kind
        elif step == cfg.train.steps or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0):
            self.final_eval = self.evaluate()
            rec["eval_loss"] = finite_or_none(self.final_eval)
        self.logs.step(rec)
        progress.update(rec)
        kill_point("step-end", step)
        if alarm is not None:
            self.on_alarm(alarm)  # may roll back: self.step, self.b and self.cfg change
            self.final_eval = None
            self._first_step = self.step + 1
            self._last = time.perf_counter()
            return False
        self.guard.update_good(self.ckpt_steps, step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.steps:
            self.save()
        self._last = time.perf_counter()  # eval and checkpoint time is not step time
        return step == cfg.debug.stop_at_step

    def _finish(self, final_eval: float | None, *, status: str, reason: str | None = None) -> dict:
        cfg, b = self.cfg, self.b
        if not self.env.main:  # rank 0 writes the summary
            self.b.loader.close()
            return {"status": status, "steps": self.step, "final_eval_loss": final_eval}
        recs = read_jsonl(self.run_dir / "metrics.jsonl")
        timed = [r["tokens_per_s"] for r in recs if not r.get("warmup") and not r.get("skipped")]
        losses = [r["loss"] for r in recs if r["loss"] is not None]
        summary = {
            "run_dir": str(self.run_dir), "status": status, "recipe": cfg.precision.recipe,
            "emulated": b.report.emulated, "compute_dtype": str(b.compute_dtype).removeprefix("torch."),
            "compiled": b.compiled, "device": device_name(b.device), "conversion": b.report.to_dict(),
            "steps": self.step, "skipped_steps": self.skipped_steps, "rollbacks": self.guard.rollbacks,
            "recipe_history": self.recipe_history, "bf16_layers": self.bf16_layers,
            "final_train_loss": losses[-1] if losses else None,
            "final_eval_loss": None if final_eval is None else finite_or_none(final_eval),
            "tokens_per_s_median": statistics.median(timed) if timed else None,
            "mem_peak_gb": max((r["mem_peak_gb"] for r in recs), default=None),
            "params": sum(p.numel() for p in b.model.parameters()), "flops_per_token": b.flops_per_token,
            "peak_bf16_tflops": self.peak_tflops, "notes": b.notes, "init_digest": self.init_digest,
            "parallel": {"data_parallel": cfg.parallel.data_parallel, "world_size": self.env.world_size,
                         "fp8_gathered_weights": fp8_gathered_weights(b.model)},
            "versions": stack_versions(),
        }
        if reason:
            summary["reason"] = reason
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.logs.close()
        self.b.loader.close()
        if status == "completed":
            tps = summary["tokens_per_s_median"]
            console.print(f"[bold green]done[/] step {self.step}: train loss {summary['final_train_loss']}, "
                          f"eval loss {final_eval:.4f}, median {'-' if tps is None else f'{tps:,.0f}'} tok/s, "
                          f"recipe {cfg.precision.recipe} -> {self.run_dir / 'summary.json'}")
        return summary


def train(cfg: JobConfig, run_dir: Path) -> dict:
    """Train (or resume) the run in `run_dir`; returns the summary."""
    return Trainer(cfg, run_dir).run()
