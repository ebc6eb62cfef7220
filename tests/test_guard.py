"""The guard's bookkeeping: spike detection, non-finite streaks, good checkpoints, the ladder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fp8lab.config import DEFAULT_LADDER, GuardConfig
from fp8lab.train.guard import Guard, SpikeDetector, next_rung


def falling_noisy_curve(n: int, seed: int) -> np.ndarray:
    """A training-like loss: fast early drop, slow tail, multiplicative noise with heavy-ish
    tails (Student t, 5 dof), i.e. what batch-to-batch variation looks like."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    clean = 2.2 + 3.5 * np.exp(-t / 300) + 0.8 * np.exp(-t / 3000)
    return clean * (1 + 0.03 * rng.standard_t(5, size=n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_false_alarm_over_10000_steps_and_a_3x_spike_is_flagged_within_3_steps(seed):
    curve = falling_noisy_curve(10_000, seed)
    guard = Guard(GuardConfig())
    alarms = [s for s, loss in enumerate(curve, 1) if guard.observe(s, float(loss), 1.0)]
    assert alarms == []
    # The same curve with a 3x spike at a random point, ramping over 3 steps (1.5x, 2x, 3x).
    rng = np.random.default_rng(seed + 100)
    for at in rng.integers(100, 10_000, size=5):
        guard = Guard(GuardConfig())
        spiked = curve.copy()
        spiked[at:at + 3] *= [1.5, 2.0, 3.0]
        first = next((s for s, loss in enumerate(spiked, 1) if guard.observe(s, float(loss), 1.0)), None)
        assert first is not None and at + 1 <= first <= at + 3, (at, first)


def test_warmup_the_std_floor_and_the_ratio():
    det = SpikeDetector(window=50, zscore=6.0, ratio=1.0, warmup=10, min_rel_std=0.01)
    assert all(det.check(5.0) is None for _ in range(9))  # warm-up: no alarms yet
    assert det.check(500.0) is None  # still warming up: 9 < 10 losses in the window
    det = SpikeDetector(window=50, zscore=6.0, ratio=1.0, warmup=10, min_rel_std=0.01)
    for _ in range(20):
        det.check(4.0)  # perfectly flat: std 0, the floor (0.04) applies
    assert det.check(4.2) is None  # z = 5
    assert det.check(4.3) is not None  # z = 7.5
    assert 4.3 not in det.window  # a spike does not pollute the window
    det = SpikeDetector(window=50, zscore=6.0, ratio=1.5, warmup=10, min_rel_std=0.01)
    for _ in range(20):
        det.check(4.0)
    assert det.check(5.9) is None  # z = 47, but only 1.48x the mean
    assert det.check(7.0) is not None  # (5.9 joined the window: mean 4.09, std 0.41)


def test_z_alone_raises_false_alarms_on_heavy_tailed_noise():
    """Why spike_ratio exists: the same curve, the z rule alone."""
    curve = falling_noisy_curve(10_000, 0)
    guard = Guard(GuardConfig(spike_ratio=1.0))
    assert sum(guard.observe(s, float(x), 1.0) is not None for s, x in enumerate(curve, 1)) > 0


def test_nonfinite_streak_alarm_and_reset():
    guard = Guard(GuardConfig(max_nonfinite_streak=3))
    assert guard.observe(1, math.nan, 1.0) is None
    assert guard.observe(2, 3.0, math.inf) is None
    assert guard.observe(3, 3.0, 1.0) is None  # a finite step resets the streak
    assert guard.observe(4, math.nan, 1.0) is None
    assert guard.observe(5, math.nan, 1.0) is None
    alarm = guard.observe(6, math.inf, 1.0)
    assert alarm.kind == "nonfinite" and "3 non-finite steps in a row" in alarm.detail
    assert guard.nonfinite_total == 5


def test_good_checkpoints_need_alarm_free_steps_after_them():
    guard = Guard(GuardConfig(good_after_steps=10, warmup_steps=5))
    for s in range(1, 31):
        guard.observe(s, 3.0 + 0.01 * (s % 3), 1.0)
        guard.update_good([10, 20, 30], s)
    assert guard.last_good_step == 20  # 30 has not had 10 steps after it yet
    assert guard.observe(31, 300.0, 1.0) is not None  # an alarm
    for s in range(32, 45):
        guard.update_good([10, 20, 30], s)
    assert guard.last_good_step == 20  # 30 was followed by an alarm within 10 steps: never good
    guard.rolled_back_to(20)
    assert guard.last_good_step == 20 and guard.alarm_free_since == 20
    state = guard.state_dict()
    clone = Guard(GuardConfig())
    clone.load_state_dict(state)
    assert clone.state_dict() == state


def test_ladder():
    assert next_rung(DEFAULT_LADDER, "fp8-tensorwise") == "fp8-rowwise"
    assert next_rung(DEFAULT_LADDER, "fp8-rowwise-gw-hp") == "bf16"
    assert next_rung(DEFAULT_LADDER, "bf16") is None
    assert next_rung(DEFAULT_LADDER, "mxfp8") == "bf16"  # not on the ladder: to its safest rung
    assert next_rung(["mxfp8", "fp8-rowwise-gw-hp"], "mxfp8") == "fp8-rowwise-gw-hp"
