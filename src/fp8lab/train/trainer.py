"""The training loop. `train_step` reads top to bottom: micro-batches, loss, backward,
clip, guard, optimizer step, log. One device-to-host transfer per step carries the loss
and the gradient norm, and serves both the guard and the log."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8lab.bench.gpus import bf16_peak_tflops
from fp8lab.config import JobConfig
from fp8lab.errors import FP8LabError
from fp8lab.precision.capability import EMULATION_NOTE, device_name
from fp8lab.train.build import Built, build
from fp8lab.train.checkpoint import load_tensors, read_state, save_checkpoint
from fp8lab.train.console import TrainProgress, console, setup_logging
from fp8lab.train.rng import capture_rng, restore_rng
from fp8lab.train.rundir import (
    JsonlWriter, TensorBoardWriter, atomic_write, check_run_dir, read_jsonl, write_run_config,
)
from fp8lab.train.schedule import lr_at

IGNORE_INDEX = -100  # targets that carry no loss (padding)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mem_peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path):
        setup_logging()
        self.run_dir = Path(run_dir)
        self.cfg, resume, messages = check_run_dir(self.run_dir, cfg)
        # Bad data, device, recipe or a missing extra fail here, before the run dir is touched.
        if self.cfg.logging.tensorboard:
            TensorBoardWriter.check_available()
        self.b: Built = build(self.cfg)
        write_run_config(self.run_dir, self.cfg)
        self.step = 0
        self.skipped_steps = 0
        if resume is not None:
            self._resume(*resume)
        self.tokens_per_step = self.cfg.data.micro_batch_size * self.cfg.data.seq_len * self.cfg.train.grad_accum_steps
        dev = self.b.device
        self.peak_tflops = bf16_peak_tflops(device_name(dev)) if dev.type == "cuda" else None
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl", keep_through_step=self.step if resume else None)
        self.tensorboard = (TensorBoardWriter(self.run_dir, resume_step=self.step if resume else None)
                            if self.cfg.logging.tensorboard else None)
        self.events = JsonlWriter(self.run_dir / "events.jsonl", keep_through_step=self.step if resume else None)
        for m in messages:
            self.event("config", m)
        if resume is not None:
            self.event("resume", f"resumed from {resume[1]} at step {self.step}")

    # -- setup ------------------------------------------------------------------------

    def _resume(self, step: int, path: Path) -> None:
        state = read_state(path)
        saved_args = state.get("model_args", {})
        now = dataclasses.asdict(self.b.model_args)
        diff = [k for k in now if k in saved_args and saved_args[k] != now[k]]
        if diff:
            raise FP8LabError(f"checkpoint {path} has a different model shape: "
                              + ", ".join(f"{k} {saved_args[k]} vs {now[k]}" for k in diff))
        load_tensors(path, model=self.b.model, optimizer=self.b.optimizer)
        self.b.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def _close_logs(self) -> None:
        for sink in (self.metrics, self.events, self.tensorboard):
            if sink is not None:
                sink.close()

    def event(self, kind: str, message: str, **fields) -> None:
        """Something the user must hear about: to the console and to events.jsonl."""
        console.print(f"[yellow]{kind}: {message}[/]")
        if hasattr(self, "events"):
            self.events.write({"step": self.step, "kind": kind, "message": message, **fields})

    # -- one step ---------------------------------------------------------------------

    def train_step(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, bool]:
        b, dev = self.b, self.b.device
        # Normalise by the loss tokens of *all* micro-batches, counted on the host, so
        # accumulating 4 x 8 sequences gives the gradient of one batch of 32.
        n_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        loss_sum = torch.zeros((), device=dev)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with b.autocast():
                logits = b.forward(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                   reduction="sum", ignore_index=IGNORE_INDEX) / n_tokens
            if i == 0 and step == self.cfg.debug.inject_nan_at_step:
                loss = loss * float("nan")  # fault drill: the real backward and guard paths see it
            loss.backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.optim.grad_clip or float("inf")  # inf: measure without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(b.model.parameters(), max_norm, foreach=True)
        loss_val, norm_val = torch.stack([loss_sum, grad_norm.to(loss_sum.device)]).tolist()  # the one sync
        finite = math.isfinite(loss_val) and math.isfinite(norm_val)
        stepped = finite or not self.cfg.guard.skip_nonfinite
        if stepped:
            lr = lr_at(step, cfg=self.cfg.optim, total_steps=self.cfg.train.steps)
            for group in b.optimizer.param_groups:
                group["lr"] = lr
            b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)
        return loss_val, norm_val, stepped

    @torch.no_grad()
    def evaluate(self) -> float:
        b = self.b
        # On CPU eval runs eager: a second compile for the no-grad graph costs more than
        # the few eval batches save.
        fwd = b.forward if b.device.type == "cuda" else b.model
        b.model.eval()
        total, count = torch.zeros((), device=b.device), 0
        for x, y in b.eval_batches:
            x, y = x.to(b.device), y.to(b.device)
            with b.autocast():
                logits = fwd(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum",
                                     ignore_index=IGNORE_INDEX)
            count += int((y != IGNORE_INDEX).sum())
        b.model.train()
        return total.item() / count

    # -- the loop ---------------------------------------------------------------------

    def save(self) -> None:
        state = {
            "format": 1, "step": self.step, "recipe": self.cfg.precision.recipe,
            "tokens": self.step * self.tokens_per_step, "data": self.b.loader.state_dict(),
            "rng": capture_rng(), "model_args": dataclasses.asdict(self.b.model_args),
            "skipped_steps": self.skipped_steps,
        }
        save_checkpoint(self.run_dir, step=self.step, model=self.b.model, optimizer=self.b.optimizer,
                        state=state, keep=self.cfg.checkpoint.keep)

    def _header(self) -> None:
        b, cfg = self.b, self.cfg
        n_params = sum(p.numel() for p in b.model.parameters())
        console.print(
            f"[bold]fp8lab train[/] {self.run_dir}: {cfg.model.preset} ({n_params / 1e6:.1f}M params) "
            f"on {device_name(b.device)}, recipe {cfg.precision.recipe}, compute {str(b.compute_dtype)[6:]}, "
            f"compile {'on' if b.compiled else 'off'}, {self.tokens_per_step:,} tokens/step"
        )
        console.print(f"  {b.report.summary()}")
        for note in b.notes:
            if note != EMULATION_NOTE:  # convert() already said it, loudly
                console.print(f"  [yellow]note:[/] {note}")

    def run(self) -> dict:
        cfg, b = self.cfg, self.b
        self._header()
        interval, eval_every = cfg.checkpoint.interval, cfg.train.eval_interval
        progress = TrainProgress(total=cfg.train.steps, start=self.step, mode=cfg.logging.progress,
                                 log_interval=cfg.logging.log_interval)
        t_start = last = time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                step = self.step + 1
                batches = [b.loader.next_batch() for _ in range(cfg.train.grad_accum_steps)]
                loss, norm, stepped = self.train_step(step, batches)
                now = time.perf_counter()
                dt, last = now - last, now
                self.step = step
                tps = self.tokens_per_step / dt
                tflops = b.flops_per_token * tps / 1e12
                rec = {
                    "step": step, "loss": _finite_or_none(loss), "lr": b.optimizer.param_groups[0]["lr"],
                    "grad_norm": _finite_or_none(norm), "tokens": step * self.tokens_per_step,
                    "step_time_s": dt, "tokens_per_s": tps, "tflops": tflops,
                    "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                    "mem_peak_gb": _mem_peak_gb(b.device), "recipe": cfg.precision.recipe,
                }
                if not stepped:
                    self.skipped_steps += 1
                    rec["skipped"] = "nonfinite"
                    self.event("skip", f"step {step}: non-finite loss {loss} or grad norm {norm}; "
                                       "optimizer step skipped", loss=rec["loss"], grad_norm=rec["grad_norm"])
                if eval_every and step % eval_every == 0 and step < cfg.train.steps:
                    rec["eval_loss"] = self.evaluate()
                self.metrics.write(rec)
                if self.tensorboard is not None:
                    self.tensorboard.write(rec)
                progress.update(rec)
                if interval and step % interval == 0 and step < cfg.train.steps:
                    self.save()
                last = time.perf_counter()  # eval and checkpoint time is not step time
                if step == cfg.debug.stop_at_step:
                    self.event("stop", f"debug.stop_at_step={step}: stopping as if interrupted")
                    self._close_logs()
                    return {"stopped_at": step}
        finally:
            progress.close()
        final_eval = self.evaluate()
        self.save()
        return self._finish(final_eval, time.perf_counter() - t_start)

    def _finish(self, final_eval: float, wall_s: float) -> dict:
        cfg, b = self.cfg, self.b
        recs = read_jsonl(self.run_dir / "metrics.jsonl")
        timed = [r["tokens_per_s"] for r in recs[1:]] or [r["tokens_per_s"] for r in recs]
        losses = [r["loss"] for r in recs if r["loss"] is not None]
        summary = {
            "run_dir": str(self.run_dir), "recipe": cfg.precision.recipe, "emulated": b.report.emulated,
            "compute_dtype": str(b.compute_dtype).removeprefix("torch."), "compiled": b.compiled,
            "device": device_name(b.device), "conversion": b.report.to_dict(), "steps": self.step,
            "skipped_steps": self.skipped_steps, "final_train_loss": losses[-1] if losses else None,
            "final_eval_loss": final_eval, "tokens_per_s_median": statistics.median(timed) if timed else None,
            "mem_peak_gb": max((r["mem_peak_gb"] for r in recs), default=None),
            "params": sum(p.numel() for p in b.model.parameters()), "flops_per_token": b.flops_per_token,
            "peak_bf16_tflops": self.peak_tflops, "wall_s_this_process": wall_s, "notes": b.notes,
            "versions": {"torch": torch.__version__, "torchao": importlib.metadata.version("torchao"),
                         "python": platform.python_version(), "cuda": torch.version.cuda},
        }
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self._close_logs()
        console.print(f"[bold green]done[/] step {self.step}: train loss {summary['final_train_loss']}, "
                      f"eval loss {final_eval:.4f}, median {summary['tokens_per_s_median']:,.0f} tok/s "
                      f"-> {self.run_dir / 'summary.json'}")
        return summary


def train(cfg: JobConfig, run_dir: Path) -> dict:
    """Train (or resume) the run in `run_dir`; returns the summary."""
    return Trainer(cfg, run_dir).run()
