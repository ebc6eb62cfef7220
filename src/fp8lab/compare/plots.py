"""The PNG plots of fp8lab compare's report. Figures are built with matplotlib's object API
(Figure + Agg canvas): nothing needs a display and no pyplot state is created or changed.

Losses arrive as lists with None where a step's loss was not finite; they become NaN here,
which matplotlib draws as a gap."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

BASELINE = "bf16"
DPI = 110
SIZE = (7.0, 4.0)
# One colour per recipe in every plot and every report; recipes not listed take spares in order.
COLORS = {"bf16": "#1f77b4", "fp8-tensorwise": "#d62728", "fp8-rowwise": "#ff7f0e",
          "fp8-rowwise-gw-hp": "#2ca02c", "mxfp8": "#9467bd"}
SPARE_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#000000"]

# name -> (title, caption), in the report's order.
PLOTS = {
    "loss_vs_step": ("Train loss vs step", "Thin lines: each seed; thick: mean over seeds, smoothed; dots: eval loss."),
    "loss_vs_time": ("Train loss vs training time", "As above, against each run's cumulative step time (the first "
                     "step includes compile; eval and checkpoint time are left out)."),
    "tokens_per_s": ("Tokens/s per recipe",
                     "Median tokens/s over seeds (dots: each seed), labelled with the ratio to bf16."),
    "loss_gap": ("Loss gap vs bf16 per step", "Train loss of each FP8 recipe minus bf16's at the same step and seed "
                 "(thin: each seed; thick: mean, smoothed); shaded: ± the noise band of the verdict metric."),
}
CLIPPED = " (y clipped: diverged values off-scale)"


@dataclass
class Plot:
    name: str   # file stem in plots/
    title: str
    png: bytes


@dataclass
class Curve:
    step: np.ndarray
    loss: np.ndarray              # NaN where not finite
    wall: np.ndarray | None       # cumulative seconds, or None when not recorded
    eval_step: np.ndarray
    eval_loss: np.ndarray


def short_label(results: dict, recipe: str) -> str:
    """What ran under `recipe`, short enough for a legend: "fp32" for a bf16 recipe that
    computed in fp32 (the tables give the whole label)."""
    label = results.get(recipe, {}).get("label") or recipe
    return str(label).split(" (")[0]


def colors(recipes: list[str]) -> dict[str, str]:
    spare = iter([c for c in SPARE_COLORS if c not in COLORS.values()])
    return {r: COLORS.get(r) or next(spare, "#7f7f7f") for r in recipes}


def _floats(values) -> np.ndarray:
    out = []
    for v in values or []:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        out.append(float(v) if ok else math.nan)
    return np.asarray(out, dtype=float)


def _curve(c: dict) -> Curve | None:
    step, loss = _floats(c.get("step")), _floats(c.get("loss"))
    n = min(len(step), len(loss))
    wall = _floats(c.get("wall_s"))
    keep = np.isfinite(step[:n])
    order = np.argsort(step[:n][keep], kind="stable")
    if not order.size:
        return None
    wall = wall[:n][keep][order] if len(wall) >= n and np.isfinite(wall).any() else None
    es, el = _floats(c.get("eval_step")), _floats(c.get("eval_loss"))
    m = min(len(es), len(el))
    return Curve(step[:n][keep][order], loss[:n][keep][order], wall, es[:m], el[:m])


def _seed_order(key) -> tuple:
    try:
        return (0, int(key), "")
    except (TypeError, ValueError):
        return (1, 0, str(key))


def load_curves(curves: dict) -> dict[str, dict[str, Curve]]:
    """{recipe: {seed as str: Curve}}, seeds in numeric order; unusable entries dropped."""
    out: dict[str, dict[str, Curve]] = {}
    for recipe, seeds in (curves or {}).items():
        if not isinstance(seeds, dict):
            continue
        got = {str(k): c for k in sorted(seeds, key=_seed_order)
               if isinstance(seeds[k], dict) and (c := _curve(seeds[k])) is not None}
        if got:
            out[str(recipe)] = got
    return out


def _mean(steps: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean over seeds at each of `steps` (each pair: a seed's steps and values); NaN where no
    seed has the step or where any seed that has it is not finite (a gap stays a gap)."""
    total, count = np.zeros(len(steps)), np.zeros(len(steps))
    bad = np.zeros(len(steps), dtype=bool)
    for s, v in pairs:
        idx = np.searchsorted(steps, s)
        fin = np.isfinite(v)
        np.add.at(total, idx[fin], v[fin])
        np.add.at(count, idx[fin], 1)
        bad[idx[~fin]] = True
    out = np.where(count > 0, total / np.maximum(count, 1), math.nan)
    out[bad] = math.nan
    return out


def smooth(y: np.ndarray) -> np.ndarray:
    """Centred moving average over ~2% of the points (at least 1), ignoring NaN neighbours;
    a NaN point stays NaN."""
    w = max(1, round(0.02 * len(y)))
    if w <= 1:
        return y.copy()
    fin = np.isfinite(y)
    kernel = np.ones(w)
    total = np.convolve(np.where(fin, y, 0.0), kernel, "same")
    count = np.convolve(fin.astype(float), kernel, "same")
    out = np.where(count > 0, total / np.maximum(count, 1), math.nan)
    out[~fin] = math.nan
    return out


def _cutoff(result: dict) -> float:
    """Steps before this one show the recipe's normal range (inf unless it diverged)."""
    events = [e.get("step") for e in result.get("divergence_events") or [] if isinstance(e, dict)]
    steps = [s for s in events if isinstance(s, (int, float)) and not isinstance(s, bool)]
    if steps:
        return float(min(steps))
    diverged = result.get("status") == "diverged" or result.get("verdict") == "diverged"
    return -math.inf if diverged else math.inf


def _limits(ref: list[np.ndarray], shown: list[np.ndarray], clip_low: bool) -> tuple[tuple[float, float] | None, bool]:
    """y-limits from the reference values (the non-diverged range, with headroom) when some
    shown value lies outside them, else None (autoscale). Returns (limits, clipped)."""
    every = np.concatenate([a[np.isfinite(a)] for a in shown] or [np.zeros(0)])
    ref_v = np.concatenate([a[np.isfinite(a)] for a in ref] or [np.zeros(0)])
    if not every.size:
        return None, False
    if not ref_v.size:
        ref_v = every
    lo, hi = float(ref_v.min()), float(ref_v.max())
    span = hi - lo or max(abs(hi) * 0.1, 1e-3)
    top = hi + 0.1 * span
    bottom = lo - 0.1 * span if clip_low else min(lo, float(every.min())) - 0.05 * span
    if every.max() <= top and every.min() >= bottom:
        return None, False
    return (bottom, top), True


def _figure():
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _loss_plot(data, results, col, against_time: bool) -> bytes | None:
    fig, ax = _figure()
    ref, shown, marks = [], [], []
    for recipe, seeds in data.items():
        seeds = {k: c for k, c in seeds.items() if c.wall is not None} if against_time else seeds
        if not seeds:
            continue
        c0 = col[recipe]
        cutoff = math.inf if recipe == BASELINE else _cutoff(results.get(recipe, {}))
        for c in seeds.values():
            x = c.wall if against_time else c.step
            ax.plot(x, c.loss, color=c0, lw=0.7, alpha=0.3, zorder=1.5)
            ref.append(c.loss[c.step < cutoff])
            shown.append(c.loss)
            fin = np.flatnonzero(np.isfinite(c.loss))
            bad = np.flatnonzero(~np.isfinite(c.loss))
            bad = bad[bad > fin[0]] if fin.size else bad[:0]
            if bad.size:  # where the curve stops being finite: an x at its last finite value
                marks.append((x[bad[0]], c.loss[fin[fin < bad[0]][-1]], c0))
            ex = c.eval_step
            if against_time:
                fin = np.isfinite(c.wall)
                ex = np.interp(c.eval_step, c.step[fin], c.wall[fin]) if fin.any() else np.full(len(ex), math.nan)
            ax.plot(ex, c.eval_loss, "o", color=c0, ms=5, mec="white", mew=0.7, zorder=3)
        steps = np.unique(np.concatenate([c.step for c in seeds.values()]))
        mean = smooth(_mean(steps, [(c.step, c.loss) for c in seeds.values()]))
        x = _mean(steps, [(c.step, c.wall) for c in seeds.values()]) if against_time else steps
        ax.plot(x, mean, color=c0, lw=2.0, label=short_label(results, recipe), zorder=2.5)
    if not shown or not any(np.isfinite(a).any() for a in shown):
        return None
    lim, clipped = _limits(ref, shown, clip_low=False)
    if lim:
        ax.set_ylim(*lim)
    for x, y, c0 in marks:
        ax.plot([x], [min(y, lim[1]) if lim else y], "x", color=c0, ms=8, mew=2, zorder=4, clip_on=False)
    title = PLOTS["loss_vs_time" if against_time else "loss_vs_step"][0] + (CLIPPED if clipped else "")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training seconds (cumulative step time)" if against_time else "step")
    ax.set_ylabel("train loss")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ls="none", color="0.4", label="eval loss"))
    if marks:
        handles.append(Line2D([], [], marker="x", ls="none", color="0.4", mew=2, label="loss no longer finite"))
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    return _png(fig)


def _tokens_plot(recipes, results, col, emulated: bool) -> bytes | None:
    values = {r: results.get(r, {}).get("tokens_per_s") for r in recipes}
    values = {r: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
              for r, v in values.items()}
    if not any(v is not None for v in values.values()):
        return None
    fig, ax = _figure()
    top = max(v for v in values.values() if v is not None) or 1.0
    for i, r in enumerate(recipes):
        res, v = results.get(r, {}), values[r]
        if v is None:
            ax.bar(i, top * 0.12, width=0.6, fill=False, edgecolor="0.6", ls="--")
            ax.text(i, top * 0.14, res.get("status") or "no result", ha="center", va="bottom", fontsize=8, color="0.35")
            continue
        ax.bar(i, v, width=0.6, color=col[r], alpha=0.85)
        seeds = _floats([run.get("tokens_per_s") for run in res.get("runs") or [] if isinstance(run, dict)])
        ax.plot(np.full(len(seeds), i), seeds, "o", color="black", ms=3, alpha=0.6, zorder=3)
        ratio = res.get("speedup_vs_bf16")
        ratio = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) and math.isfinite(ratio) else "–"
        ax.text(i, v + top * 0.02, f"{v:,.0f}\n{ratio}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(recipes)), [short_label(results, r) for r in recipes],
                  rotation=15 if len(recipes) > 4 else 0, fontsize=8)
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("tokens/s (median over seeds)")
    title = PLOTS["tokens_per_s"][0] + (" (ratio vs bf16)" if BASELINE in recipes else "")
    if emulated:
        title += "\nemulated FP8 — speed not representative"
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _gap_plot(data, results, col, band) -> tuple[bytes | None, str]:
    base = data.get(BASELINE)
    if not base:
        status = results.get(BASELINE, {}).get("status")
        return None, f"bf16 has no loss curve{f' (status: {status})' if status else ''}, so there is nothing to subtract"
    fp8 = [r for r in data if r != BASELINE]
    if not fp8:
        return None, "no FP8 recipe has a loss curve"
    fig, ax = _figure()
    ref, shown = [], []
    for recipe in fp8:
        pairs = []
        cutoff = _cutoff(results.get(recipe, {}))
        for seed, c in data[recipe].items():
            if seed not in base:
                continue
            steps, i, j = np.intersect1d(c.step, base[seed].step, return_indices=True)
            gap = c.loss[i] - base[seed].loss[j]
            pairs.append((steps, gap))
            gap = smooth(gap)  # raw per-step gaps are mostly batch noise
            ax.plot(steps, gap, color=col[recipe], lw=0.8, alpha=0.35, zorder=1.5)
            ref.append(gap[steps < cutoff])
            shown.append(gap)
        if pairs:
            steps = np.unique(np.concatenate([s for s, _ in pairs]))
            ax.plot(steps, smooth(_mean(steps, pairs)), color=col[recipe], lw=2.0, zorder=2.5,
                    label=f"{recipe} − {short_label(results, BASELINE)}")
    if not shown or not any(np.isfinite(a).any() for a in shown):
        return None, "no seed has finite losses under both bf16 and an FP8 recipe at the same steps"
    ax.axhline(0.0, color="black", lw=0.8)
    have_band = isinstance(band, (int, float)) and not isinstance(band, bool) and math.isfinite(band) and band > 0
    if have_band:
        ax.axhspan(-band, band, color="0.5", alpha=0.18, label=f"noise band ±{band:.4f}")
        ref.append(np.array([-band, band]))
    lim, clipped = _limits(ref, shown + ([np.array([-band, band])] if have_band else []), clip_low=True)
    if lim:
        ax.set_ylim(*lim)
    title = PLOTS["loss_gap"][0] + ("" if have_band else " (no noise band)") + (CLIPPED if clipped else "")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss − bf16 train loss")
    ax.legend(loc="best", fontsize=8)
    return _png(fig), ""


def make_plots(summary: dict, curves: dict) -> tuple[list[Plot], dict[str, str]]:
    """The plots that can be drawn, in PLOTS order, and {name: why not} for the others."""
    results = {r["recipe"]: r for r in summary.get("results") or [] if isinstance(r, dict) and "recipe" in r}
    data = load_curves(curves)
    recipes = [str(r) for r in summary.get("recipes") or results]
    recipes += [r for r in list(results) + list(data) if r not in recipes]
    data = {r: data[r] for r in recipes if r in data}
    col = colors(recipes)
    env = summary.get("environment") or {}
    emulated = env.get("emulated") is True or any(r.get("emulated") is True for r in results.values())
    noise = summary.get("noise") or {}

    made: dict[str, bytes | None] = {}
    why: dict[str, str] = {}
    made["loss_vs_step"] = _loss_plot(data, results, col, against_time=False) if data else None
    if made["loss_vs_step"] is None:
        why["loss_vs_step"] = "no recipe has a finite train loss curve"
    has_wall = any(c.wall is not None for seeds in data.values() for c in seeds.values())
    made["loss_vs_time"] = _loss_plot(data, results, col, against_time=True) if has_wall else None
    if made["loss_vs_time"] is None:
        why["loss_vs_time"] = ("no run recorded wall-clock times" if data and not has_wall
                               else "no recipe has a finite train loss curve with wall-clock times")
    made["tokens_per_s"] = _tokens_plot(recipes, results, col, emulated)
    if made["tokens_per_s"] is None:
        why["tokens_per_s"] = "no recipe reported a tokens/s figure"
    made["loss_gap"], reason = _gap_plot(data, results, col, noise.get("band"))
    if made["loss_gap"] is None:
        why["loss_gap"] = reason
    plots = [Plot(name, PLOTS[name][0], png) for name, png in made.items() if png is not None]
    return plots, why
