"""The divergence guard: what counts as an alarm, and what the fallback ladder says next.

Pure bookkeeping, no tensors: the trainer feeds it each step's loss and asks what to do.
Its state is JSON and travels in every checkpoint, so a resumed run does not start cold.

Spike rule: a finite loss is a spike when it lies more than `spike_zscore` standard
deviations above the mean of the last `spike_window` finite losses *and* is at least
`spike_ratio` times that mean (spikes themselves are kept out of the window). A falling
curve only ever sits *below* its lagging mean, so the trend cannot raise alarms; the
standard deviation is floored at `min_rel_std * mean` so a very smooth curve does not make
every wiggle a spike; and the ratio keeps the heavy tails of batch-to-batch noise (a rare
6-sigma batch is not a divergence) from rolling a run back. Measured on a synthetic
falling curve with 3% Student-t noise: z alone raised 2-6 false alarms per 10,000 steps,
z with the ratio none (tests/test_guard.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from fp8lab.config import GuardConfig


@dataclass
class Alarm:
    step: int
    kind: str  # "spike" or "nonfinite"
    detail: str


class SpikeDetector:
    def __init__(self, *, window: int, zscore: float, ratio: float, warmup: int, min_rel_std: float):
        self.window: deque[float] = deque(maxlen=window)
        self.zscore, self.ratio, self.warmup, self.min_rel_std = zscore, ratio, warmup, min_rel_std

    def check(self, loss: float) -> float | None:
        """The z-score of `loss` if it is a spike, else None (and `loss` joins the window)."""
        n = len(self.window)
        if n >= max(self.warmup, 2):
            mean = sum(self.window) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))
            z = (loss - mean) / max(std, self.min_rel_std * abs(mean), 1e-12)
            if z > self.zscore and loss >= self.ratio * mean:
                return z
        self.window.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"window": list(self.window)}

    def load_state_dict(self, d: dict) -> None:
        self.window.clear()
        self.window.extend(d["window"])


class Guard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.detector = SpikeDetector(window=cfg.spike_window, zscore=cfg.spike_zscore, ratio=cfg.spike_ratio,
                                      warmup=cfg.warmup_steps, min_rel_std=cfg.min_rel_std)
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.alarm_free_since = 0  # no alarm in this timeline after this step
        self.last_good_step: int | None = None  # newest checkpoint known to be good
        self.rollbacks = 0

    def observe(self, step: int, loss: float, grad_norm: float) -> Alarm | None:
        """Feed one step's figures; an Alarm means roll back (when rollback is on)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            if self.nonfinite_streak >= self.cfg.max_nonfinite_streak:
                self.alarm_free_since = step
                return Alarm(step, "nonfinite", f"{self.nonfinite_streak} non-finite steps in a row")
            return None
        self.nonfinite_streak = 0
        z = self.detector.check(loss)
        if z is None:
            return None
        self.alarm_free_since = step
        mean = sum(self.detector.window) / len(self.detector.window)
        return Alarm(step, "spike", f"loss {loss:.4g} is {loss / mean:.1f}x the mean and {z:.1f} standard "
                                    f"deviations above it (last {len(self.detector.window)} steps)")

    def update_good(self, ckpt_steps: list[int], now: int) -> None:
        """Mark as good the checkpoints followed by `good_after_steps` alarm-free steps."""
        for c in ckpt_steps:
            if c >= self.alarm_free_since and now - c >= self.cfg.good_after_steps:
                self.last_good_step = max(c, self.last_good_step or 0)

    def rolled_back_to(self, step: int) -> None:
        """A new timeline starts at `step` (a good checkpoint, or 0): nothing after it is known."""
        self.alarm_free_since = step
        self.last_good_step = step if step > 0 else None
        self.nonfinite_streak = 0

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "nonfinite_streak": self.nonfinite_streak,
                "nonfinite_total": self.nonfinite_total, "alarm_free_since": self.alarm_free_since,
                "last_good_step": self.last_good_step, "rollbacks": self.rollbacks}

    def load_state_dict(self, d: dict) -> None:
        self.detector.load_state_dict(d["detector"])
        self.nonfinite_streak = d["nonfinite_streak"]
        self.nonfinite_total = d["nonfinite_total"]
        self.alarm_free_since = d["alarm_free_since"]
        self.last_good_step = d["last_good_step"]
        self.rollbacks = d["rollbacks"]


def next_rung(ladder: list[str], current: str) -> str | None:
    """The recipe below `current` on the ladder; None when there is nothing safer.
    A recipe that is not on the ladder falls to the ladder's last (safest) rung."""
    if current not in ladder:
        return ladder[-1] if ladder[-1] != current else None
    i = ladder.index(current)
    return ladder[i + 1] if i + 1 < len(ladder) else None
