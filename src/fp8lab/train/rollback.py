"""Rollback: what the guard's alarm turns into. A planner decides, the trainer applies.

`plan_rollback` is pure: from the alarm, the guard's state and where the data stands, it
decides

1. the target: the last good checkpoint (followed by `guard.good_after_steps` alarm-free
   steps), or step 0 when none is good yet;
2. the change: one rung down `guard.ladder` (or, with `guard.per_layer`, the layers with the
   worst FP8 telemetry go to bf16 first); on the last rung, the data skip alone;
3. the data to skip: the micro-batches of the `guard.skip_steps` steps up to the alarm are
   never trained on again;
4. or, after `guard.max_rollbacks` rollbacks, that the run stops (GuardStopped, whose
   message says what happened: exit code 2 from the CLI, summary.json status
   "stopped-by-guard").

The trainer applies a plan (Trainer.apply_rollback): it deletes the checkpoints of the
abandoned timeline, rebuilds under the new recipe, loads the target, rewinds the logs, and
saves the target again as a new revision (step-N-rK) holding the new recipe and guard state,
so a crash from there on resumes the new timeline. Everything is said on the console and in
events.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from fp8lab.config import GuardConfig
from fp8lab.errors import FP8LabError
from fp8lab.train.guard import Alarm, Guard, next_rung


class GuardStopped(FP8LabError):
    """The guard ran out of rollbacks; the message says what happened."""


@dataclass(frozen=True)
class RollbackPlan:
    alarm: Alarm
    target: int  # the step training continues from (0: the start)
    recipe: str  # the recipe trained from there
    bf16_layers: list[str]  # converted layers kept in bf16 from there
    skip: tuple[int, int] | None  # loader positions [start, end) never trained on again
    change: str  # what changed, in words
    rollbacks: int  # rollbacks in this run, this one included


def plan_rollback(alarm: Alarm, *, gcfg: GuardConfig, guard: Guard, recipe: str, bf16_layers: list[str],
                  converted: list[str], batch_index: int, grad_accum: int, index_at: Callable[[int], int],
                  worst_layers: Callable[[], list[str]]) -> RollbackPlan:
    """What to do about `alarm`; GuardStopped when the run must stop instead.

    batch_index: the loader position after the alarm step; index_at(step): the loader position
    of the checkpoint at `step`; worst_layers(): converted layer names, riskiest first (asked
    only with guard.per_layer)."""
    if guard.rollbacks >= gcfg.max_rollbacks:
        raise GuardStopped(f"the guard stopped the run at step {alarm.step} after {guard.rollbacks} rollbacks "
                           f"(guard.max_rollbacks={gcfg.max_rollbacks}): {alarm.detail}; recipe {recipe}. Inspect "
                           "RUN/events.jsonl and `fp8lab inspect`; to go on, resume with a larger "
                           "guard.max_rollbacks or a safer --guard.ladder")
    if gcfg.per_layer and converted:
        n = max(1, math.ceil(gcfg.layers_per_rollback * len(converted)))
        worst = [name for name in worst_layers() if name in converted][:n]
        new_recipe, layers = recipe, [*bf16_layers, *worst]
        change = f"layers with the worst FP8 telemetry moved to bf16: {', '.join(worst)}"
    else:
        below = next_rung(gcfg.ladder, recipe)
        new_recipe, layers = below or recipe, [] if below else list(bf16_layers)
        change = (f"recipe {recipe} -> {below}" if below
                  else f"{recipe} is the last rung of guard.ladder: data skip only")
    target = guard.last_good_step or 0
    # The data of the steps up to the alarm, in loader positions (not before the target).
    start = max(batch_index - gcfg.skip_steps * grad_accum, index_at(target))
    skip = (start, batch_index) if gcfg.skip_steps and batch_index > start else None
    return RollbackPlan(alarm=alarm, target=target, recipe=new_recipe, bf16_layers=layers, skip=skip, change=change,
                        rollbacks=guard.rollbacks + 1)
