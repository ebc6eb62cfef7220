"""Rollback: what the trainer does when the guard raises an alarm.

1. Pick the target: the last good checkpoint (followed by `guard.good_after_steps`
   alarm-free steps), or step 0 when none is good yet.
2. Decide the change: one rung down `guard.ladder` (or, with `guard.per_layer`, the layers
   with the worst FP8 telemetry go to bf16 first). On the last rung, the data skip alone.
3. Skip the data that led to the alarm: the micro-batches of the `guard.skip_steps` steps
   up to the alarm are never trained on again.
4. Delete the checkpoints of the abandoned timeline, rebuild under the new recipe, load the
   target, rewind the logs, and save the target again as a new revision (step-N-rK) holding
   the new recipe and guard state, so a crash from here on resumes the new timeline.
5. After `guard.max_rollbacks` rollbacks the run stops cleanly with a message saying what
   happened (exit code 2 from the CLI, summary.json status "stopped-by-guard").
Everything is said on the console and in events.jsonl.
"""

from __future__ import annotations

import math

from fp8lab.errors import FP8LabError
from fp8lab.precision import telemetry
from fp8lab.train import dist
from fp8lab.train.build import build
from fp8lab.train.checkpoint import delete_after, list_complete, read_state
from fp8lab.train.guard import Alarm, Guard, next_rung
from fp8lab.train.rundir import with_recipe, write_run_config
from fp8lab.train.step import refresh_fp8_gather_scales


class GuardStopped(FP8LabError):
    """The guard ran out of rollbacks; the message says what happened."""


class Recovery:
    """Mixed into Trainer; uses its cfg, b, guard, step, logs, save() and event()."""

    def on_alarm(self, alarm: Alarm) -> None:
        g, gcfg = self.guard, self.cfg.guard
        self.event("alarm", f"step {alarm.step}: {alarm.detail}", alarm=alarm.kind)
        if not gcfg.rollback:
            return
        if g.rollbacks >= gcfg.max_rollbacks:
            msg = (f"the guard stopped the run at step {alarm.step} after {g.rollbacks} rollbacks "
                   f"(guard.max_rollbacks={gcfg.max_rollbacks}): {alarm.detail}; recipe "
                   f"{self.cfg.precision.recipe}. Inspect RUN/events.jsonl and `fp8lab inspect`; to go on, "
                   f"resume with a larger guard.max_rollbacks or a safer --guard.ladder")
            self.event("stop", msg)
            raise GuardStopped(msg)
        rollbacks = g.rollbacks + 1
        change = self._choose_change()
        # The data of the steps up to the alarm, in loader positions (not before the target).
        target = g.last_good_step or 0
        end = self._batch_index()
        start = max(end - gcfg.skip_steps * self.cfg.train.grad_accum_steps, self._index_at(target))
        if gcfg.skip_steps and end > start:
            self.skip_windows.append([start, end])
        # Every rank decides alike (the guard sees the same averaged loss); rank 0 edits the files.
        gone = delete_after(self.run_dir, target) if self.env.main else []
        dist.barrier()
        self._rebuild_at(target)
        self.guard.rollbacks = rollbacks
        self.guard.rolled_back_to(target)
        self.recipe_history.append({"step": alarm.step, "rolled_back_to": target, "reason": alarm.detail,
                                    "recipe": self.cfg.precision.recipe, "bf16_layers": list(self.bf16_layers)})
        self.logs.rewind(target)
        if self.env.main:
            write_run_config(self.run_dir, self.cfg)  # config.toml names the recipe now trained
        self.save(new_revision=any(s == target for s, _ in list_complete(self.run_dir)))
        self.event("rollback", f"rolled back from step {alarm.step} to step {target}; {change}; skipped "
                               f"micro-batches {start}..{end - 1}; rollback {rollbacks} of {gcfg.max_rollbacks}"
                               + (f"; deleted abandoned checkpoints {', '.join(gone)}" if gone else ""),
                   step=alarm.step, recipe=self.cfg.precision.recipe, rolled_back_to=target, skipped=[start, end],
                   bf16_layers=self.bf16_layers)

    def _choose_change(self) -> str:
        """Apply the fallback to self.cfg / self.bf16_layers and say what it was."""
        current = self.cfg.precision.recipe
        converted = [c["name"] for c in self.b.report.converted]
        if self.cfg.guard.per_layer and converted:
            records = self.collect_telemetry(self.b.eval_batches[0])
            n = max(1, math.ceil(self.cfg.guard.layers_per_rollback * len(converted)))
            worst = [name for name in telemetry.worst_layers(records) if name in converted][:n]
            self.bf16_layers = [*self.bf16_layers, *worst]
            return f"layers with the worst FP8 telemetry moved to bf16: {', '.join(worst)}"
        new = next_rung(self.cfg.guard.ladder, current)
        if new is None:
            return f"{current} is the last rung of guard.ladder: data skip only"
        self.cfg = with_recipe(self.cfg, new)  # FP8 all-gather exists for tensorwise only
        self.bf16_layers = []
        return f"recipe {current} -> {new}"

    def _index_at(self, step: int) -> int:
        """The loader position (in micro-batches) of the checkpoint at `step` (0 at the start)."""
        if step == 0:
            return 0
        state = read_state(self._path_of(step))
        loader = self.b.loader
        return state["data"]["epoch"] * loader.batches_per_epoch + state["data"]["position"]

    def _path_of(self, step: int):
        paths = [p for s, p in list_complete(self.run_dir) if s == step]
        if not paths:
            raise FP8LabError(f"the last good checkpoint (step {step}) is missing from {self.run_dir}")
        return paths[-1]

    def _rebuild_at(self, step: int) -> None:
        """Rebuild model and optimizer under the (new) recipe and load the target into them;
        the guard keeps its rollback count, skip windows and history."""
        self.b.loader.close()
        self.b = None  # the old model and optimizer are freed before the new ones take memory
        self.b = build(self.cfg, extra_skip=self.bf16_layers)
        self.guard = Guard(self.cfg.guard)
        self.step, self.skipped_steps = 0, 0
        if step > 0:
            path = self._path_of(step)
            self._restore(path, read_state(path))
        refresh_fp8_gather_scales(self.b)
