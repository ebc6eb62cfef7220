"""Learning-rate schedule as a pure function of the step, so resuming needs no state."""

from __future__ import annotations

import math

from fp8lab.config import OptimConfig


def lr_at(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up from lr/warmup to
    lr, then cosine (or constant) decay to lr * min_lr_ratio at `total_steps`."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
