"""fp8lab compare: train BF16 and FP8 recipes from the same weights on the same batches,
then judge and report.

OUT/config.toml       the resolved config every run starts from (a rerun must match it)
OUT/compare.json      recipes, seeds and guard mode of the last invocation
OUT/runs/R-seedI/     one fp8lab run directory per recipe R and seed I
OUT/logs/R-seedI.log  that run's console output
OUT/summary.json      the table, checks, noise band, rule and verdicts
OUT/report.md, OUT/report.html, OUT/plots/*.png

Seed I trains with train.seed + I and data.seed + I: within a seed every recipe shares the
initial weights and the batch order (checked from fingerprints the runs record), across
seeds both change, which is the noise a verdict is judged against.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fp8lab.compare import verdict as V
from fp8lab.compare.runs import RunSpec, environment, finished_status, launch, read_run
from fp8lab.config import JobConfig, config_from_dict
from fp8lab.errors import FP8LabError
from fp8lab.fsutil import atomic_write
from fp8lab.precision.recipes import RECIPES

# A rerun may differ from the saved config only here: these change how a run is watched, not what it trains.
RERUN_MAY_CHANGE = ("logging.", "train.threads", "data.verify")


@dataclass
class Plan:
    cfg: JobConfig
    recipes: list[str]
    seeds: int
    out: Path
    allow_fallback: bool = False
    band: float | None = None
    min_steps: int = V.DEFAULT_MIN_STEPS
    command: str = ""
    config: str | None = None  # the -c file, as given

    def specs(self) -> list[RunSpec]:
        """Seed-major: a comparison stopped halfway has whole seeds, every recipe in each."""
        t, d = self.cfg.train.seed, self.cfg.data.seed
        return [RunSpec(r, i, t + i, d + i, self.out / "runs" / f"{r}-seed{i}")
                for i in range(self.seeds) for r in self.recipes]


def check_recipes(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise FP8LabError(f"--recipes: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if len(set(names)) != len(names):
        raise FP8LabError(f"--recipes {','.join(names)} names a recipe twice")
    if "bf16" not in names:
        raise FP8LabError("--recipes must include bf16: it is the baseline every FP8 recipe is judged against")
    return ["bf16", *[n for n in names if n != "bf16"]]


def with_token_budget(cfg: JobConfig, tokens: int) -> JobConfig:
    """cfg with train.steps set so each run trains on at least `tokens` tokens."""
    per_step = cfg.tokens_per_step
    if tokens < per_step:
        raise FP8LabError(f"--tokens {tokens:,} is less than one step ({per_step:,} tokens)")
    train = dataclasses.replace(cfg.train, steps=math.ceil(tokens / per_step))
    return dataclasses.replace(cfg, train=train)


def prepare_out(plan: Plan) -> Path:
    """Create OUT, or check that OUT holds this same comparison; returns the config the runs use."""
    out, config = plan.out, plan.out / "config.toml"
    if out.exists() and not out.is_dir():
        raise FP8LabError(f"--out {out} is a file; give a directory")
    if config.exists():
        try:
            saved = config_from_dict(tomllib.loads(config.read_text()), origin=str(config))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FP8LabError(f"{config} is damaged ({e}); choose a new --out") from None
        now, before = plan.cfg.flat(), saved.flat()
        diff = [k for k in now if now[k] != before[k] and not k.startswith(RERUN_MAY_CHANGE)]
        if diff:
            raise FP8LabError(f"{out} holds a comparison with other settings ("
                              + "; ".join(f"{k}: {before[k]!r} there, {now[k]!r} now" for k in diff)
                              + "); rerun with the same config and overrides, or choose a new --out")
        try:
            saved_plan = json.loads((out / "compare.json").read_text()) if (out / "compare.json").exists() else {}
        except ValueError as e:
            raise FP8LabError(f"{out / 'compare.json'} is damaged ({e}); choose a new --out") from None
        if saved_plan.get("allow_fallback", plan.allow_fallback) != plan.allow_fallback:
            raise FP8LabError(f"{out} was run with --allow-fallback={saved_plan['allow_fallback']}; "
                              "rerun the same way or choose a new --out")
    elif out.exists() and any(out.iterdir()):
        raise FP8LabError(f"--out {out} is not empty and holds no fp8lab comparison; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(config, plan.cfg.to_toml())
    atomic_write(out / "compare.json", json.dumps({"format": 1, "recipes": plan.recipes, "seeds": plan.seeds,
                                                   "allow_fallback": plan.allow_fallback}, indent=1))
    return config


def _unsupported(recipes: list[str], cfg: JobConfig) -> dict[str, str]:
    """{recipe: why this machine cannot run it}, decided the way training decides (in a child
    process where there is CUDA, so this one holds no GPU memory while the runs train)."""
    from fp8lab.precision.support import check_recipes_here

    return check_recipes_here(recipes, device=cfg.train.device, emulate=cfg.precision.emulate,
                              compute_dtype=cfg.precision.compute_dtype)["unsupported"]


FINISHED = ("completed", "stopped-by-guard")  # runs that wrote a summary, with their fingerprints


def _checks(rows: dict[str, list[dict]]) -> dict:
    """Did each run start from the same weights as the BF16 run of its seed, and see the same
    batches? Runs that did not finish (no summary, so no fingerprint) are not checked."""
    same_init, same_data, mismatched, lines = [], [], [], []
    bf16 = {r["seed"]: r for r in rows.get("bf16", []) if r["status"] in FINISHED}
    for recipe, runs in rows.items():
        for r in runs:
            base = bf16.get(r["seed"])
            if recipe == "bf16" or base is None or r["status"] not in FINISHED:
                continue
            said = []
            if r["init_digest"] and base["init_digest"]:
                ok = r["init_digest"] == base["init_digest"]
                same_init.append(ok)
                said.append(f"weights {'identical (sha256 ' + r['init_digest'][:12] + ')' if ok else 'DIFFER'}")
                mismatched += [] if ok else [[recipe, r["seed"]]]
            # A rollback changes the batches by design (it skips the data that led to it).
            n = min(len(r["data_crc"]), len(base["data_crc"]))
            if n and not r["rollbacks"] and not base["rollbacks"]:
                ok = r["data_crc"][:n] == base["data_crc"][:n]
                same_data.append(ok)
                said.append(f"batches {'identical' if ok else 'DIFFER'} over the first {n} steps")
                mismatched += [] if ok or [recipe, r["seed"]] in mismatched else [[recipe, r["seed"]]]
            lines.append(f"seed {r['seed']} {recipe} vs bf16: " + (", ".join(said) or "not checked (rolled back)"))
    return {"same_init": all(same_init) if same_init else None, "same_data": all(same_data) if same_data else None,
            "mismatched": mismatched,
            "detail": "; ".join(lines) or "no FP8 run finished beside a BF16 run of its seed: nothing to compare"}


def _finite_json(x):
    """x with every non-finite float as None: JSON has no NaN, and a NaN loss is 'none'."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_json(v) for v in x]
    return x


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_compare(plan: Plan, *, echo=print) -> dict:
    """Run what is missing, then judge, write OUT/summary.json and the report; returns the summary."""
    from fp8lab.compare.report import write_report

    config = prepare_out(plan)
    unsupported = _unsupported(plan.recipes, plan.cfg)
    extra = [] if plan.allow_fallback else ["--guard.max_rollbacks=0"]  # an alarm ends the run: diverged
    results: dict[str, list] = {r: [] for r in plan.recipes}
    for spec in plan.specs():
        if spec.recipe in unsupported:
            status, reason = "unsupported", unsupported[spec.recipe]
        elif (status := finished_status(spec.run_dir)) is not None:
            reason = None
            echo(f"{spec.label}: {status} earlier, kept ({spec.run_dir})")
        else:
            echo(f"[bold]{spec.label}[/]: training -> {spec.run_dir}")
            status, reason = launch(spec, config=config, extra=extra,
                                    log=plan.out / "logs" / f"{spec.run_dir.name}.log", echo=echo)
        results[spec.recipe].append(read_run(spec, status, reason) + (spec,))
    summary, curves = assemble(plan, results, unsupported)
    summary = _finite_json(summary)
    atomic_write(plan.out / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    write_report(plan.out, summary, curves)
    return summary


def assemble(plan: Plan, results: dict[str, list], unsupported: dict[str, str]) -> tuple[dict, dict]:
    outcomes = {r: [o for o, _, _, _ in runs] for r, runs in results.items()}
    rows = {r: [row for _, row, _, _ in runs] for r, runs in results.items()}
    curves = {r: {o.seed: c for o, _, c, _ in runs if c["step"]} for r, runs in results.items()}
    everything = [o for os_ in outcomes.values() for o in os_]
    name = V.metric_name(everything)
    band = V.noise_band(outcomes["bf16"], name, override=plan.band)
    summaries = [json.loads((s.run_dir / "summary.json").read_text()) for runs in results.values()
                 for _, _, _, s in runs if (s.run_dir / "summary.json").is_file()]
    bf16_tps = _median(row["tokens_per_s"] for row in rows["bf16"] if row["status"] == "completed")
    checks = _checks(rows)
    table = []
    for recipe in plan.recipes:
        v = V.judge(recipe, outcomes[recipe], outcomes["bf16"], name=name, band=band, min_steps=plan.min_steps)
        bad = [seed for r, seed in checks["mismatched"] if r == recipe]
        if v.verdict in ("parity", "worse") and bad:
            # Not a verdict on FP8: the runs were not comparable (a bug to report, not a result).
            v = V.Verdict("inconclusive", f"the runs of seed(s) {bad} did not start from the same weights and "
                                          f"batches as BF16's (see checks); {v.detail}", v.gap, v.ci95)
        ok = [row for row in rows[recipe] if row["status"] == "completed"]
        tps = _median(row["tokens_per_s"] for row in ok)
        statuses = {row["status"] for row in rows[recipe]}
        status = ("unsupported" if "unsupported" in statuses else "diverged" if v.verdict == "diverged"
                  else "failed" if statuses == {"failed"} else "ok")
        reasons = [f"seed {row['seed']}: {row['reason']}" for row in rows[recipe] if row["reason"]]
        reasons += [f"seed {row['seed']} fell back to {row['final_recipe']} (its speed and loss are that "
                    f"recipe's from step {row['recipe_history'][0]['rolled_back_to']})"
                    for row in rows[recipe] if row["final_recipe"] not in (None, recipe) and row["recipe_history"]]
        table.append({
            "recipe": recipe, "label": next((row["label"] for row in rows[recipe] if row["label"]), recipe),
            "compute_dtype": next((row["compute_dtype"] for row in rows[recipe] if row["compute_dtype"]), None),
            "converted_layers": next((row["converted_layers"] for row in rows[recipe] if row.get("converted_layers")),
                                     None),
            "status": status,
            "reason": unsupported.get(recipe) or ("; ".join(reasons) if reasons else None),
            "verdict": v.verdict, "verdict_detail": v.detail,
            "tokens_per_s": tps, "speedup_vs_bf16": tps / bf16_tps if tps and bf16_tps else None,
            "mem_peak_gb": max((row["mem_peak_gb"] for row in ok if row["mem_peak_gb"] is not None), default=None),
            "final_train_loss": _mean(row["final_train_loss"] for row in ok),
            "final_eval_loss": _mean(row["final_eval_loss"] for row in ok),
            "loss_gap": v.gap, "loss_gap_ci95": list(v.ci95) if v.ci95 else None, "emulated": next((row["emulated"] for row in rows[recipe]
                                                 if row["emulated"] is not None), None),
            "divergence_events": [{"seed": row["seed"], **a} for row in rows[recipe] for a in row["alarms"]],
            "runs": [{k: val for k, val in row.items() if k != "data_crc"} for row in rows[recipe]],
        })
    summary = {
        "format": 1, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": plan.command,
        "out": str(plan.out), "recipes": plan.recipes, "seeds": list(range(plan.seeds)),
        "steps": plan.cfg.train.steps,
        "tokens_per_step": plan.cfg.tokens_per_step, "config": plan.config,
        "guard": "fallback allowed (rollbacks count as divergence)" if plan.allow_fallback
                 else "an alarm stops the run (guard.max_rollbacks=0)",
        "environment": environment(summaries), "checks": checks,
        "noise": {"band": band.band, "how": band.how, "bf16_losses": band.bf16_losses}, "metric": name,
        "rule": V.rule_text(name, plan.min_steps), "results": table,
    }
    return summary, curves


def command_line(argv: list[str]) -> str:
    return "fp8lab compare " + " ".join(shlex.quote(a) for a in argv)
