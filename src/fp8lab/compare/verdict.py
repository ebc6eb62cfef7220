"""The verdict of a comparison: is each FP8 recipe's loss at parity with BF16, worse, or
did it diverge? Pure functions over the runs' outcomes, so the rule is tested on synthetic
loss curves and stated, word for word, in the report.

The loss compared is the final held-out eval loss when every run has one (the same eval
batches for every recipe), else the mean train loss over the last tenth of the steps.
Runs are paired by seed: seed i of every recipe starts from the same weights and sees the
same batches, so the gap recipe - bf16 is taken per seed and averaged.

The noise band a gap is judged against: with two or more seeds, NOISE_SDS standard
deviations of BF16's seed-to-seed spread (at least FLOOR_FRACTION of BF16's loss, so two
seeds that land on the same loss do not make a band of zero); with one seed, the stated
default DEFAULT_BAND_FRACTION of BF16's loss.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

NOISE_SDS = 2.0
FLOOR_FRACTION = 0.002
DEFAULT_BAND_FRACTION = 0.01
DEFAULT_MIN_STEPS = 100  # below this the loss is still falling fast and mostly warm-up
TAIL_FRACTION = 0.1


@dataclass
class Outcome:
    """One run (a recipe at a seed), as the verdict needs it."""
    seed: int
    status: str  # completed | stopped-by-guard | failed | unsupported
    losses: list[float | None] = field(default_factory=list)  # train loss per step; None = non-finite
    eval_loss: float | None = None
    steps: int = 0
    rollbacks: int = 0
    alarms: list[dict] = field(default_factory=list)  # {"step", "kind", "message"}


@dataclass
class Verdict:
    verdict: str  # baseline | parity | worse | diverged | inconclusive | unsupported | failed
    detail: str
    gap: float | None = None  # mean over paired seeds of (recipe - bf16) loss
    ci95: tuple[float, float] | None = None  # Student-t interval of that mean, two or more pairs


# Two-sided 95% Student-t quantiles by degrees of freedom (beyond 30 the normal's 1.96 is close).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci95(xs: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean of `xs` (paired differences), or None below 2.
    Reported beside the verdict: a gap inside the band but with an interval clear of zero is
    small and consistent, which is worth knowing even when it is not 'worse'."""
    if len(xs) < 2:
        return None
    df = len(xs) - 1
    t = _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96
    m, half = sum(xs) / len(xs), t * statistics.stdev(xs) / math.sqrt(len(xs))
    return (m - half, m + half)


@dataclass
class Band:
    band: float | None
    how: str
    bf16_losses: list[float]


def _tail_mean(losses: list[float | None]) -> float | None:
    n = max(1, math.ceil(len(losses) * TAIL_FRACTION))
    tail = losses[-n:]
    if not tail or any(v is None or not math.isfinite(v) for v in tail):
        return None
    return sum(tail) / len(tail)


def metric_name(outcomes: list[Outcome]) -> str:
    ran = [o for o in outcomes if o.status == "completed"]
    if ran and all(o.eval_loss is not None for o in ran):
        return "final eval loss"
    return f"mean train loss over the last {TAIL_FRACTION:.0%} of steps"


def metric(o: Outcome, name: str) -> float | None:
    return o.eval_loss if name == "final eval loss" else _tail_mean(o.losses)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def divergence(o: Outcome) -> str | None:
    """Why `o` counts as diverged, or None. Only runs that finished (or that the guard
    stopped) are judged: a crash is a failure, not a divergence."""
    if o.status not in ("completed", "stopped-by-guard"):
        return None
    if o.status == "stopped-by-guard":
        where = f" at step {o.alarms[-1]['step']}" if o.alarms else ""
        return f"seed {o.seed}: the guard stopped the run{where}" + (f" ({o.alarms[-1]['message']})" if o.alarms else "")
    if o.rollbacks:
        return f"seed {o.seed}: {o.rollbacks} rollback(s) by the guard (first at step {o.alarms[0]['step']})" \
            if o.alarms else f"seed {o.seed}: {o.rollbacks} rollback(s) by the guard"
    if o.alarms:  # guard.rollback=false: the run went on, but the guard saw it go wrong
        a = o.alarms[0]
        return f"seed {o.seed}: the guard raised {len(o.alarms)} alarm(s), the first at step {a['step']} ({a['message']})"
    if o.losses and not _finite(o.losses[-1]):
        return f"seed {o.seed}: the final train loss is not finite"
    if o.eval_loss is not None and not math.isfinite(o.eval_loss):
        return f"seed {o.seed}: the final eval loss is {o.eval_loss}"
    finite = [v for v in o.losses if _finite(v)]
    end = _tail_mean(o.losses)
    if finite and end is not None and len(o.losses) >= 10 and end > finite[0]:
        return f"seed {o.seed}: the loss ended above where it started ({end:.4f} > {finite[0]:.4f})"
    return None


def noise_band(bf16: list[Outcome], name: str, *, override: float | None = None) -> Band:
    healthy = [o for o in bf16 if o.status == "completed" and not divergence(o)]
    values = [v for v in (metric(o, name) for o in healthy) if _finite(v)]
    if override is not None:
        return Band(override, f"set on the command line: {override:g}", values)
    if not values:
        return Band(None, "no BF16 run finished healthy, so there is no band", values)
    mean = sum(values) / len(values)
    if len(values) >= 2:
        sd = statistics.stdev(values)
        band = max(NOISE_SDS * sd, FLOOR_FRACTION * mean)
        return Band(band, f"{NOISE_SDS:g} x the standard deviation of BF16's {name} over {len(values)} seeds "
                          f"({sd:.4g}), at least {FLOOR_FRACTION:.1%} of BF16's loss: {band:.4g}", values)
    band = DEFAULT_BAND_FRACTION * mean
    why = ("one seed" if len(bf16) == 1 else
           f"only one of {len(bf16)} BF16 seeds finished healthy")
    return Band(band, f"{why}, so the stated default: {DEFAULT_BAND_FRACTION:.0%} of BF16's {name} "
                      f"({band:.4g})" + ("; run --seeds 2 or more to measure the noise instead" if len(bf16) == 1
                                         else ""), values)


def rule_text(name: str, min_steps: int) -> str:
    return (f"The gap is FP8's {name} minus BF16's, per seed (same initial weights, same batches), averaged over "
            f"seeds. diverged: the guard raised an alarm (a stop, a rollback, or an alarm it was told only to log), "
            f"a non-finite final loss, or a loss that ended above where it started. worse: the gap exceeds the "
            f"noise band. parity: the gap is within the band (or below it). inconclusive: no healthy BF16 baseline, "
            f"fewer than {min_steps} steps, or runs of a seed that did not start from the same weights and batches.")


def judge(recipe: str, outcomes: list[Outcome], bf16: list[Outcome], *, name: str, band: Band,
          min_steps: int = DEFAULT_MIN_STEPS) -> Verdict:
    """The verdict for `recipe` given its runs and BF16's (both lists indexed by seed order)."""
    if any(o.status == "unsupported" for o in outcomes):
        return Verdict("unsupported", "this hardware cannot run the recipe")
    if outcomes and all(o.status == "failed" for o in outcomes):
        return Verdict("failed", "every run failed; see its log")
    diverged = [d for d in map(divergence, outcomes) if d]
    if diverged:
        return Verdict("diverged", "; ".join(diverged))
    if recipe == "bf16":
        return Verdict("baseline", "the reference the FP8 recipes are judged against")
    failed = [o.seed for o in outcomes if o.status == "failed"]
    pairs = [(metric(o, name), metric(b, name)) for o, b in zip(outcomes, bf16)
             if o.status == "completed" and b.status == "completed" and not divergence(b)]
    pairs = [(a, b) for a, b in pairs if _finite(a) and _finite(b)]
    if not pairs or band.band is None:
        return Verdict("inconclusive", "no finished BF16 run to compare with" + (
            f" (runs failed at seeds {failed})" if failed else ""))
    diffs = [a - b for a, b in pairs]
    gap, ci = sum(diffs) / len(diffs), mean_ci95(diffs)
    steps = min(o.steps for o in outcomes if o.status == "completed")
    said = f"gap {gap:+.4f} vs band {band.band:.4f} over {len(pairs)} seed(s)"
    if ci is not None:
        said += f" (95% CI of the gap {ci[0]:+.4f} .. {ci[1]:+.4f})"
    if failed:
        said += f"; runs at seeds {failed} failed and are left out"
    if steps < min_steps:
        return Verdict("inconclusive", f"{steps} steps is too few for a verdict (at least {min_steps}: run again "
                                       f"with --train.steps={min_steps} or more, or a larger --tokens, and a new "
                                       f"--out); {said}", gap, ci)
    if gap > band.band:
        return Verdict("worse", f"{said}: the FP8 loss is higher than BF16's by more than the noise", gap, ci)
    if gap < -band.band:
        return Verdict("parity", f"{said}: lower than BF16 by more than the band (FP8 is not expected to "
                                 "improve the loss; look at the curves)", gap, ci)
    return Verdict("parity", f"{said}: within the noise", gap, ci)
