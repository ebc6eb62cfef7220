"""The verdict rule of fp8lab compare on synthetic loss curves: parity, worse, diverged,
inconclusive, and the noise band from one seed or several."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fp8lab.compare import verdict as V
from fp8lab.compare.runner import _checks


def curve(steps: int = 200, *, offset: float = 0.0, seed: int = 0, noise: float = 0.02) -> list[float]:
    """A falling loss curve, 5 -> ~2 + offset, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)
    base = 2.0 + 3.0 * np.exp(-t / (steps / 8)) + offset
    return list(base * (1 + noise * rng.standard_normal(steps)))


def run(seed: int, losses: list[float | None], *, eval_loss: float | None = None, **kw) -> V.Outcome:
    tail = [v for v in losses[-20:] if v is not None]
    ev = eval_loss if eval_loss is not None else (sum(tail) / len(tail) if tail else None)
    return V.Outcome(seed=seed, status=kw.pop("status", "completed"), losses=losses, eval_loss=ev,
                     steps=len(losses), **kw)


def judge(fp8: list[V.Outcome], bf16: list[V.Outcome], **kw) -> V.Verdict:
    name = V.metric_name(fp8 + bf16)
    return V.judge("fp8-tensorwise", fp8, bf16, name=name, band=V.noise_band(bf16, name), **kw)


def test_parity_when_the_gap_is_inside_the_seed_noise():
    bf16 = [run(s, curve(seed=s), eval_loss=2.00 + 0.01 * s) for s in range(3)]  # sd 0.01 -> band 0.02
    fp8 = [run(s, curve(seed=10 + s), eval_loss=2.005 + 0.01 * s) for s in range(3)]
    v = judge(fp8, bf16)
    assert v.verdict == "parity" and v.gap == pytest.approx(0.005)
    assert "within the noise" in v.detail
    # Every paired difference is 0.005: a zero-width interval, stated beside the verdict.
    assert v.ci95 == pytest.approx((0.005, 0.005)) and "95% CI" in v.detail


def test_worse_when_the_gap_exceeds_the_band():
    bf16 = [run(s, curve(seed=s), eval_loss=2.00 + 0.01 * s) for s in range(3)]
    fp8 = [run(s, curve(seed=10 + s, offset=0.05), eval_loss=2.05 + 0.01 * s) for s in range(3)]
    v = judge(fp8, bf16)
    assert v.verdict == "worse" and v.gap == pytest.approx(0.05)
    assert "0.0200" in v.detail  # the band it was judged against is stated


def test_the_band_comes_from_bf16s_seed_spread_or_a_stated_default():
    name = "final eval loss"
    two = V.noise_band([run(0, [3.0], eval_loss=2.0), run(1, [3.0], eval_loss=2.1)], name)
    assert two.band == pytest.approx(V.NOISE_SDS * np.std([2.0, 2.1], ddof=1))
    assert "2 seeds" in two.how
    same = V.noise_band([run(0, [3.0], eval_loss=2.0), run(1, [3.0], eval_loss=2.0)], name)
    assert same.band == pytest.approx(V.FLOOR_FRACTION * 2.0)  # never a band of zero
    one = V.noise_band([run(0, [3.0], eval_loss=2.0)], name)
    assert one.band == pytest.approx(V.DEFAULT_BAND_FRACTION * 2.0) and "default" in one.how
    assert V.noise_band([run(0, [3.0], eval_loss=2.0)], name, override=0.3).band == 0.3


def test_a_worse_gap_with_one_seed_is_judged_against_the_default_band():
    bf16 = [run(0, curve(), eval_loss=2.0)]
    assert judge([run(0, curve(seed=1), eval_loss=2.015)], bf16).verdict == "parity"  # 0.015 < 1% of 2.0 = 0.02
    assert judge([run(0, curve(seed=1), eval_loss=2.03)], bf16).verdict == "worse"


@pytest.mark.parametrize("how", ["nan-tail", "rising", "guard-stop", "rollback"])
def test_diverged(how):
    bf16 = [run(0, curve(), eval_loss=2.0)]
    losses = curve(seed=1)
    kw = {}
    if how == "nan-tail":
        losses[150:] = [None] * 50
    elif how == "rising":
        losses = losses[:100] + [losses[99] * 1.04 ** i for i in range(100)]  # ends far above the start
    elif how == "guard-stop":
        losses = losses[:120]
        kw = {"status": "stopped-by-guard", "alarms": [{"step": 120, "kind": "spike", "message": "loss 9 is 4x"}]}
    else:
        kw = {"rollbacks": 1, "alarms": [{"step": 80, "kind": "nonfinite", "message": "3 non-finite"}]}
    v = judge([run(0, losses, eval_loss=2.0, **kw)], bf16)
    assert v.verdict == "diverged", v
    expect = {"nan-tail": "not finite", "rising": "ended above", "guard-stop": "step 120", "rollback": "step 80"}
    assert expect[how] in v.detail


def test_a_noisy_but_healthy_curve_is_not_diverged():
    assert V.divergence(run(0, curve(noise=0.1))) is None


def test_too_few_steps_or_no_baseline_is_inconclusive():
    short_bf16 = [run(0, curve(steps=30), eval_loss=2.0)]
    v = judge([run(0, curve(steps=30, seed=1), eval_loss=2.5)], short_bf16)
    assert v.verdict == "inconclusive" and "30 steps is too few" in v.detail and v.gap == pytest.approx(0.5)
    failed_bf16 = [V.Outcome(seed=0, status="failed")]
    v = judge([run(0, curve(), eval_loss=2.0)], failed_bf16)
    assert v.verdict == "inconclusive" and "no finished BF16" in v.detail


def test_unsupported_and_failed_recipes_say_so():
    bf16 = [run(0, curve(), eval_loss=2.0)]
    assert judge([V.Outcome(seed=0, status="unsupported")], bf16).verdict == "unsupported"
    assert judge([V.Outcome(seed=0, status="failed")], bf16).verdict == "failed"
    assert V.judge("bf16", bf16, bf16, name="final eval loss", band=V.noise_band(bf16, "final eval loss")).verdict \
        == "baseline"


def test_without_eval_the_metric_is_the_train_loss_tail():
    a, b = run(0, curve()), run(0, curve(seed=2))
    a.eval_loss = None
    name = V.metric_name([a, b])
    assert name.startswith("mean train loss")
    tail = a.losses[-math.ceil(len(a.losses) * V.TAIL_FRACTION):]
    assert V.metric(a, name) == pytest.approx(sum(tail) / len(tail))


def test_the_start_alike_check_can_fail_and_blames_only_that_run():
    row = {"seed": 0, "status": "completed", "rollbacks": 0, "init_digest": "aa", "data_crc": [1, 2, 3]}
    ok = _checks({"bf16": [row], "fp8-tensorwise": [row], "fp8-rowwise": [row]})
    assert ok["same_init"] is True and ok["same_data"] is True and ok["mismatched"] == []
    bad = _checks({"bf16": [row], "fp8-tensorwise": [row | {"init_digest": "bb", "data_crc": [1, 2, 4]}],
                   "fp8-rowwise": [row]})
    assert bad["same_init"] is False and bad["same_data"] is False and "DIFFER" in bad["detail"]
    assert bad["mismatched"] == [["fp8-tensorwise", 0]]


def test_a_failed_run_is_not_a_mismatch():
    """A crashed run wrote no summary, so it has no fingerprint: not checked, not 'different'."""
    row = {"seed": 0, "status": "completed", "rollbacks": 0, "init_digest": "aa", "data_crc": [1, 2, 3]}
    crashed = {"seed": 0, "status": "failed", "rollbacks": 0, "init_digest": None, "data_crc": [1]}
    got = _checks({"bf16": [row], "fp8-tensorwise": [row], "fp8-rowwise": [crashed]})
    assert got["same_init"] is True and got["same_data"] is True and got["mismatched"] == []


def test_non_finite_losses_are_diverged_and_never_parity():
    bf16 = [run(0, curve(), eval_loss=2.0)]
    for bad in (math.nan, math.inf):
        v = judge([run(0, curve(seed=1), eval_loss=bad)], bf16)
        assert v.verdict == "diverged" and "eval loss" in v.detail, v
    assert V.noise_band([run(0, curve(), eval_loss=math.nan), run(1, curve(), eval_loss=2.0)],
                        "final eval loss").band == pytest.approx(0.02)  # the NaN seed is left out


def test_an_alarm_the_guard_only_logged_is_divergence():
    bf16 = [run(0, curve(), eval_loss=2.0)]
    v = judge([run(0, curve(seed=1), eval_loss=2.0, alarms=[{"step": 14, "kind": "spike", "message": "x"}])], bf16)
    assert v.verdict == "diverged" and "step 14" in v.detail


def test_a_crash_is_failed_not_diverged():
    bf16 = [run(0, curve(), eval_loss=2.0)]
    rising = [2.0 + 0.1 * i for i in range(12)]
    v = judge([V.Outcome(seed=0, status="failed", losses=rising, steps=12)], bf16)
    assert v.verdict == "failed"


def test_the_gap_interval_is_a_student_t_interval():
    diffs = [0.01, 0.03, 0.02]
    lo, hi = V.mean_ci95(diffs)
    half = 4.303 * np.std(diffs, ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert V.mean_ci95([0.01]) is None
