"""The training loop: batches, the step (step.py), guard, log, eval, checkpoint. The one
device-to-host transfer per step (in step.py) carries the loss and the gradient norm and
serves the guard and the log. On an alarm, rollback.py plans and the trainer applies."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import torch

from fp8lab.config import JobConfig
from fp8lab.data.loader import IGNORE_INDEX  # padding targets, made by the loader
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write, os_error
from fp8lab.precision import get_recipe, post_optimizer_hook, telemetry
from fp8lab.train import dist
from fp8lab.train.build import build
from fp8lab.train.checkpoint import (
    delete_after,
    list_complete,
    read_state,
    remove_stale,
    save_checkpoint,
)
from fp8lab.train.faults import kill_point
from fp8lab.train.fingerprint import weights_digest
from fp8lab.train.guard import Alarm, Guard
from fp8lab.train.logs import NullLogs, RunLogs, TensorBoardWriter, WandbWriter, read_jsonl
from fp8lab.train.preempt import Preempted, StopRequest
from fp8lab.train.report import print_header, run_summary, step_record
from fp8lab.train.resume import data_fingerprint, restore, resume, set_aside_unusable
from fp8lab.train.rng import capture_rng
from fp8lab.train.rollback import GuardStopped, RollbackPlan, plan_rollback
from fp8lab.train.rundir import RunDirLock, check_run_dir, save_run_tokenizer, with_recipe, write_run_config
from fp8lab.train.step import device_batch, finite_or_none, run_loss, to_device, token_loss, train_step
from fp8lab.ui import TrainProgress, console, setup_logging


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path, *, allow_recipe_change: bool = False):
        setup_logging()
        self.run_dir = Path(run_dir)
        # Under torchrun with FSDP2 every rank runs this; rank 0 alone writes files and prints.
        self.env = dist.init(cfg.parallel.data_parallel, cfg.train.device)
        # One trainer per run directory, decided before anything there is read.
        self.lock = RunDirLock(self.run_dir) if self.env.main else None
        try:
            self._open(cfg, allow_recipe_change=allow_recipe_change)
        except OSError as e:  # a full disk, a read-only file system
            self.close(failed=True)
            raise _io_error(e, self.run_dir) from None
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, *, failed: bool = False) -> None:
        """Let go of the run directory and what was opened in it (run() does this when it ends;
        closing twice is harmless)."""
        if getattr(self, "logs", None) is not None:
            self.logs.close()
        if getattr(self, "parts", None) is not None:
            self.parts.loader.close()
        if self.lock is not None:
            self.lock.release(failed=failed)

    def _open(self, cfg: JobConfig, *, allow_recipe_change: bool) -> None:
        self.cfg, newest, messages = check_run_dir(self.run_dir, cfg, allow_recipe_change=allow_recipe_change)
        dist.barrier()  # every rank has read the run directory before rank 0 writes to it
        # Bad data, device, recipe or a missing extra fail here, before the run dir is touched.
        if self.cfg.logging.tensorboard:
            TensorBoardWriter.check_available()
        if self.cfg.logging.wandb:
            WandbWriter.check_available()
        self.stop = StopRequest(self.cfg.train.stop_signals)
        r = resume(self.run_dir, self.cfg, newest, keep_recipe=allow_recipe_change,
                   world_size=self.env.world_size, distributed=self.env.active)
        self.cfg, self.parts, self.guard, state, self.resumed_from = r.cfg, r.parts, r.guard, r.state, r.path
        # Guard state that shapes the model and the data order (see rollback.py).
        self.bf16_layers: list[str] = state.get("bf16_layers", [])
        self.skip_windows: list[list[int]] = state.get("skip_windows", [])
        self.recipe_history: list[dict] = state.get("recipe_history", [])
        self.step, self.skipped_steps = state.get("step", 0), state.get("skipped_steps", 0)
        post_optimizer_hook(self.parts.model, self.parts.report)  # the first FP8 gathers use precomputed scales too
        # Taken before the first step: what every recipe of a comparison must share.
        self.init_digest: str | None = state.get("init_digest") if state else (
            weights_digest(self.parts.model) if self.cfg.logging.fingerprint else None)
        removed, unusable = [], []
        if self.env.main:
            removed = remove_stale(self.run_dir)  # first: it frees what a writer killed by a full disk left
            unusable = set_aside_unusable(self.run_dir, self.resumed_from, r.passed_over)
            if self.step < self.cfg.train.steps:  # training goes on: an earlier end's summary no longer holds
                (self.run_dir / "summary.json").unlink(missing_ok=True)
            write_run_config(self.run_dir, self.cfg)
            save_run_tokenizer(self.run_dir, self.cfg, self.parts)  # what fp8lab export writes next to the weights
        dist.barrier()
        self.tokens_per_step = self.cfg.tokens_per_step * self.env.world_size  # over all ranks
        wandb = {"project": self.cfg.logging.wandb_project, "config": self.cfg.to_dict()} \
            if self.cfg.logging.wandb else None
        self.logs = RunLogs(self.run_dir, resume_step=self.step if state else None,
                            tensorboard=self.cfg.logging.tensorboard, wandb=wandb) if self.env.main else NullLogs()
        self.ckpt_steps = [s for s, _ in list_complete(self.run_dir)]
        for m in messages:
            self.event("config", m)
        for name, why in self.logs.dropped_lines():
            self.event("damaged", f"{name}: {why}")
        for name, moved, why in unusable:
            self.event("damaged", f"checkpoint {name} {why}; moved to {moved} and not used")
        if removed:
            self.event("cleanup", f"removed unfinished checkpoint folders left by a killed run: {', '.join(removed)}")
        if state:
            self.event("resume", f"resumed from {self.resumed_from} at step {self.step}")
            if state.get("optim", "adamw") != self.cfg.optim.name:  # the state was converted (resume.py)
                old = state.get("optim", "adamw")
                self.event("optim-change", next((n for n in self.parts.notes if n.startswith("optim.name")),
                                                f"optim.name {old} -> {self.cfg.optim.name}: no state needed "
                                                "converting"), old=old, new=self.cfg.optim.name)
            before = state.get("recipe", self.cfg.precision.recipe)
            if before != self.cfg.precision.recipe:  # only with --allow-recipe-change
                self.event("recipe-change", f"precision.recipe {before} -> {self.cfg.precision.recipe} from step "
                                            f"{self.step} (--allow-recipe-change)", old=before,
                           new=self.cfg.precision.recipe)

    def save(self, *, new_revision: bool = False) -> None:
        state = {
            "format": 1, "step": self.step, "recipe": self.cfg.precision.recipe,
            "tokens": self.step * self.tokens_per_step, "data": self.parts.loader.state_dict(),
            "data_fingerprint": data_fingerprint(self.parts.dataset), "rng": capture_rng(),
            "model_args": dataclasses.asdict(self.parts.model_args), "skipped_steps": self.skipped_steps,
            "guard": self.guard.state_dict(), "bf16_layers": self.bf16_layers,
            "skip_windows": self.skip_windows, "recipe_history": self.recipe_history,
            "init_digest": self.init_digest, "world_size": self.env.world_size, "optim": self.cfg.optim.name,
        }
        good = self.guard.last_good_step
        save_checkpoint(self.run_dir, step=self.step, model=self.parts.model, optimizer=self.parts.optimizer,
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
        loader = self.parts.loader
        return loader.epoch * loader.batches_per_epoch + loader.position

    def next_batches(self) -> tuple[list[tuple[torch.Tensor, ...]], int]:
        """This step's micro-batches, passing over the data windows a rollback skipped, and
        the index of the first one."""
        out, first = [], None
        while len(out) < self.cfg.train.grad_accum_steps:
            index = self._batch_index()
            batch = self.parts.loader.next_batch()
            if any(start <= index < end for start, end in self.skip_windows):
                continue
            first = index if first is None else first
            out.append(batch)
        return out, first

    @torch.no_grad()
    def evaluate(self) -> float:
        parts = self.parts
        # On CPU, eval runs the compiled blocks eagerly: compiling the no-grad graph too
        # would cost more than the few eval batches save.
        stance = "force_eager" if parts.device.type == "cpu" else "default"
        parts.model.eval()
        total, count = torch.zeros((), device=parts.device), 0
        with torch.compiler.set_stance(stance):
            for batch in parts.eval_batches:
                count += int((batch[1] != IGNORE_INDEX).sum())  # on the host copy: no device sync
                x, y, docs = device_batch(batch, parts.device)
                with parts.autocast():
                    total += run_loss(parts, self.cfg, x, y, docs)
        parts.model.train()
        if self.env.active:
            # Each rank evaluated its rows of the held-out batches: add them up. FSDP2 leaves the
            # root's weights gathered after a forward with no backward; shard them again.
            from torch.distributed.fsdp import FSDPModule

            # float64: a token count above 2**24 is not exact in float32.
            both = torch.stack([total.double(), torch.tensor(float(count), device=parts.device, dtype=torch.float64)])
            torch.distributed.all_reduce(both)
            for m in parts.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            total_all, count_all = both.tolist()
            return total_all / count_all
        return total.item() / count

    def collect_telemetry(self, batch: tuple[torch.Tensor, ...]) -> list[dict]:
        """Per-layer FP8 cast statistics on `batch` (an extra pass; training is unaffected). The
        pass ignores a document mask: it measures the casts' ranges, not the loss."""
        recipe = self.parts.report.recipe
        if recipe == "bf16" or not self.parts.report.converted:
            return []
        x, y = to_device(batch[0], self.parts.device), to_device(batch[1], self.parts.device)
        return telemetry.collect(self.parts.model, get_recipe(recipe), inputs=x,
                                 loss_fn=lambda logits: token_loss(logits, y, reduction="mean"),
                                 autocast=self.parts.autocast)

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

    def run(self) -> dict:
        with self.stop:  # SIGTERM and friends: save at the next step boundary, then stop (preempt.py)
            try:
                return self._run()
            except GuardStopped as stop:
                self._finish(None, status="stopped-by-guard", reason=str(stop))
                raise
            except Preempted:
                self.logs.close()
                self.parts.loader.close()
                raise
            except OSError as e:  # writing a log on a full disk, say (checkpoints say it themselves)
                raise _io_error(e, self.run_dir) from None
            finally:
                self.close()

    def _run(self) -> dict:
        print_header(self.run_dir, self.cfg, self.parts, self.env, tokens_per_step=self.tokens_per_step)
        progress = self.start_loop()
        try:
            while self.step < self.cfg.train.steps:
                if self.advance(progress):
                    self.event("stop", f"debug.stop_at_step={self.step}: stopping as if interrupted")
                    self.logs.close()
                    self.parts.loader.close()
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
        result = train_step(self.parts, self.cfg, step, batches, drill=self._drill(first_index),
                            stop_requested=self.stop.requested)
        now = time.perf_counter()
        self.step = step
        rec = step_record(step, result, now - self._last, batches, cfg=self.cfg, parts=self.parts, env=self.env,
                          tokens_per_step=self.tokens_per_step, first_in_process=step == self._first_step)
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
        # Under torchrun only the step's verdict counts (every rank has the same); alone, a signal
        # that came after the step's start counts too.
        stop = result.stop or (not self.env.active and self.stop.requested)
        if alarm is not None:
            self.on_alarm(alarm)  # may roll back: self.step, self.parts and self.cfg change
            self.final_eval = None
            self._first_step = self.step + 1
            self._last = time.perf_counter()
            if stop:
                self._stop_here()
            return False
        self.guard.update_good(self.ckpt_steps, step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.train.steps:
            self.save()
        if stop and step < cfg.train.steps:  # the last step finishes the run instead
            self._stop_here()
        self._last = time.perf_counter()  # eval and checkpoint time is not step time
        return step == cfg.debug.stop_at_step

    def _stop_name(self) -> str:
        return signal.Signals(self.stop.signum).name if self.stop.signum else "a stop signal to another rank"

    def _stop_here(self) -> None:
        """A stop signal: save where the run is (unless saved already) and stop, resumably."""
        if self.env.main:
            console.print(f"[yellow]stop requested ({self._stop_name()}): saving a checkpoint at step {self.step}, "
                          "then stopping (send it again to stop at once)[/]")
        if self.step not in self.ckpt_steps:
            self.save()
        msg = (f"{self._stop_name()}: stopped after step {self.step}, checkpoint saved in "
               f"{self.run_dir / 'checkpoints'}; "
               "run the same command to resume")
        self.event("preempted", msg)
        raise Preempted(msg)

    # -- rollback (planned in rollback.py, applied here) --------------------------------

    def on_alarm(self, alarm: Alarm) -> None:
        self.event("alarm", f"step {alarm.step}: {alarm.detail}", alarm=alarm.kind)
        if not self.cfg.guard.rollback:
            return
        try:
            plan = plan_rollback(
                alarm, gcfg=self.cfg.guard, guard=self.guard, recipe=self.cfg.precision.recipe,
                bf16_layers=self.bf16_layers, converted=[c["name"] for c in self.parts.report.converted],
                batch_index=self._batch_index(), grad_accum=self.cfg.train.grad_accum_steps, index_at=self._index_at,
                worst_layers=lambda: telemetry.worst_layers(self.collect_telemetry(self.parts.eval_batches[0])))
        except GuardStopped as stop:
            self.event("stop", str(stop))
            raise
        self.apply_rollback(plan)

    def apply_rollback(self, plan: RollbackPlan) -> None:
        """Return to `plan.target` under the plan's recipe and layers, never to train on the
        skipped data again; the target is saved anew, so a crash resumes this timeline."""
        if plan.skip:
            self.skip_windows.append(list(plan.skip))
        # Every rank plans alike (the guard sees the same averaged loss); rank 0 edits the files.
        gone = delete_after(self.run_dir, plan.target) if self.env.main else []
        dist.barrier()
        self.cfg, self.bf16_layers = with_recipe(self.cfg, plan.recipe), plan.bf16_layers
        self._rebuild_at(plan.target)
        self.guard.rollbacks = plan.rollbacks
        self.guard.rolled_back_to(plan.target)
        self.recipe_history.append({"step": plan.alarm.step, "rolled_back_to": plan.target,
                                    "reason": plan.alarm.detail, "recipe": plan.recipe,
                                    "bf16_layers": list(plan.bf16_layers)})
        self.logs.rewind(plan.target)
        self.save(new_revision=any(s == plan.target for s, _ in list_complete(self.run_dir)))
        if self.env.main:
            # config.toml names the recipe now trained, once a checkpoint says so too: a kill
            # before this point resumes (or restarts) the old timeline with the old command.
            write_run_config(self.run_dir, self.cfg)
        skipped = f"; skipped micro-batches {plan.skip[0]}..{plan.skip[1] - 1}" if plan.skip else ""
        self.event("rollback", f"rolled back from step {plan.alarm.step} to step {plan.target}; {plan.change}"
                               f"{skipped}; rollback {plan.rollbacks} of {self.cfg.guard.max_rollbacks}"
                               + (f"; deleted abandoned checkpoints {', '.join(gone)}" if gone else ""),
                   step=plan.alarm.step, recipe=plan.recipe, rolled_back_to=plan.target,
                   skipped=list(plan.skip) if plan.skip else None, bf16_layers=plan.bf16_layers)

    def _index_at(self, step: int) -> int:
        """The loader position (in micro-batches) of the checkpoint at `step` (0 at the start)."""
        if step == 0:
            return 0
        data = read_state(self._path_of(step))["data"]
        return data["epoch"] * self.parts.loader.batches_per_epoch + data["position"]

    def _path_of(self, step: int) -> Path:
        paths = [p for s, p in list_complete(self.run_dir) if s == step]
        if not paths:
            raise FP8LabError(f"the last good checkpoint (step {step}) is missing from {self.run_dir}")
        return paths[-1]

    def _rebuild_at(self, step: int) -> None:
        """Rebuild model and optimizer under the (new) recipe and load the target into them;
        the rollback count, skip windows and history carry over."""
        self.parts.loader.close()
        self.parts = None  # the old model and optimizer are freed before the new ones take memory
        # Back to step 0: the initial weights again (init_from's folder); later: the checkpoint's.
        self.parts = build(self.cfg, extra_skip=self.bf16_layers, fresh=step == 0)
        self.guard = Guard(self.cfg.guard)
        self.step, self.skipped_steps = 0, 0
        if step > 0:
            path = self._path_of(step)
            state = read_state(path)
            restore(path, state, self.parts, self.guard, world_size=self.env.world_size)
            self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
        post_optimizer_hook(self.parts.model, self.parts.report)

    def _finish(self, final_eval: float | None, *, status: str, reason: str | None = None) -> dict:
        cfg, parts = self.cfg, self.parts
        if not self.env.main:  # rank 0 writes the summary
            self.parts.loader.close()
            return {"status": status, "steps": self.step, "final_eval_loss": final_eval}
        summary = run_summary(self.run_dir, cfg, parts, self.env, read_jsonl(self.run_dir / "metrics.jsonl"),
                              status=status, final_eval=final_eval,
                              facts={"steps": self.step, "skipped_steps": self.skipped_steps,
                                     "rollbacks": self.guard.rollbacks, "recipe_history": self.recipe_history,
                                     "bf16_layers": self.bf16_layers, "init_digest": self.init_digest})
        if reason:
            summary["reason"] = reason
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.logs.close()
        self.parts.loader.close()
        if status == "completed":
            tps = summary["tokens_per_s_median"]
            console.print(f"[bold green]done[/] step {self.step}: train loss {summary['final_train_loss']}, "
                          f"eval loss {final_eval:.4f}, median {'-' if tps is None else f'{tps:,.0f}'} tok/s, "
                          f"recipe {parts.label} -> {self.run_dir / 'summary.json'}")
        return summary


def _io_error(e: OSError, run_dir: Path) -> FP8LabError:
    return os_error(e, path=e.filename or run_dir, elsewhere="choose another --run-dir (the same command resumes "
                                                           "from the newest complete checkpoint once it can write)")


def train(cfg: JobConfig, run_dir: Path, *, allow_recipe_change: bool = False) -> dict:
    """Train (or resume) the run in `run_dir`; returns the summary. `allow_recipe_change`: on
    resume, train with cfg's recipe instead of the checkpoint's."""
    return Trainer(cfg, run_dir, allow_recipe_change=allow_recipe_change).run()
