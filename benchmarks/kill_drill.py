"""Kill a run at random wall-clock moments and check that the identical command ends it exactly
where the uninterrupted run ends (issue 12's property test, at random times rather than at the
named kill points the test suite uses).

The run: a small model (dim 128, 4 layers; big enough that training, not start-up, fills most of
the run), emulated fp8-tensorwise, 20 steps, a non-finite step at 6 (rolled back
to step 0: no checkpoint is good yet) and a loss spike later (rolled back to step 4), so kills
land before, during and after both rollbacks and inside checkpoint writes. Each trial starts the
run, sends SIGKILL after a uniform random delay within the uninterrupted run's wall time, then
runs the same command to the end, and compares every logged (step, recipe, loss) and every final
parameter, bit for bit, with the uninterrupted run.

    python benchmarks/kill_drill.py --kills 20 [--seed 0] [--out benchmarks/results/...md]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fp8lab.config import load_config  # noqa: E402
from fp8lab.data import write_dataset  # noqa: E402
from fp8lab.models import Transformer  # noqa: E402
from fp8lab.train.build import model_args_for, open_data  # noqa: E402
from fp8lab.train.checkpoint import list_complete, load_model_weights  # noqa: E402
from fp8lab.train.logs import read_jsonl  # noqa: E402

RUN = {"model.dim": 128, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn_dim": 512,
       "data.seq_len": 32, "data.micro_batch_size": 32, "train.steps": 20, "train.eval_interval": 0,
       "train.eval_batches": 2, "train.threads": 2, "optim.warmup_steps": 2, "optim.lr": 3e-3,
       "checkpoint.interval": 4, "guard.warmup_steps": 5, "guard.skip_steps": 3, "guard.good_after_steps": 4,
       "guard.max_nonfinite_streak": 1, "debug.inject_nan_at_step": 6, "debug.inject_spike_at_step": 14,
       "debug.inject_spike_factor": 8, "precision.recipe": "fp8-tensorwise", "logging.progress": "off"}


def make_data(root: Path) -> Path:
    """Learnable tokens (a sparse random Markov chain), so losses fall and a spike stands out."""
    rng = np.random.default_rng(1234)
    nxt = rng.integers(0, 64, size=(64, 3))

    def rows(n):
        out = np.empty((n, 33), dtype=np.int64)
        out[:, 0] = rng.integers(0, 64, size=n)
        for t in range(1, 33):
            out[:, t] = nxt[out[:, t - 1], rng.integers(0, 3, size=n)]
        return out

    return write_dataset(root / "data", train=[rows(512)], val=[rows(32)], seq_len=32, vocab_size=64, eos_id=None,
                         tokenizer={"type": "synthetic-markov"}, sources=[{"kind": "generated", "seed": 1234}])


def command(run: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run), f"--data.path={data}",
            *(f"--{k}={v}" for k, v in RUN.items())]


ENV = {k: v for k, v in os.environ.items() if not k.startswith("FP8LAB_KILL")} | {"PYTHONPATH": str(REPO / "src")}


def run_to_end(run: Path, data: Path) -> tuple[float, float]:
    """Run to the end; (seconds until its first step was logged, seconds in all)."""
    t0, first = time.perf_counter(), None
    proc = subprocess.Popen(command(run, data), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if first is None and (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"run {run} failed: {proc.stderr.read()[-2000:]}")
    return first or 0.0, time.perf_counter() - t0


def fingerprint(run: Path, data: Path) -> tuple[list, dict]:
    cfg = load_config(None, {**{k: str(v) for k, v in RUN.items()}, "data.path": str(data)})
    model = Transformer(model_args_for(cfg, open_data(cfg).vocab_size))
    load_model_weights(list_complete(run)[-1][1], model)
    losses = [(r["step"], r["recipe"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]
    return losses, {n: p.detach().numpy().tobytes() for n, p in model.named_parameters()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the result table as markdown here")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fp8lab-kill-drill-") as tmp:
        root = Path(tmp)
        data = make_data(root)
        first, wall = run_to_end(root / "full", data)
        want = fingerprint(root / "full", data)
        events = [e["rolled_back_to"] for e in read_jsonl(root / "full" / "events.jsonl") if e["kind"] == "rollback"]
        print(f"uninterrupted: first step logged after {first:.1f} s, {wall:.1f} s in all, rollbacks to steps {events}")
        rows, ok = [], 0
        for i in range(args.kills):
            run = root / f"trial-{i}"
            delay = rng.uniform(max(first - 0.3, 0.1), wall)  # while it trains (imports take ~3 s)
            proc = subprocess.Popen(command(run, data), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
                killed_at = "finished before the kill"
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                logged = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
                done = [s for s, _ in list_complete(run)]
                killed_at = (f"{'step ' + str(logged[-1]['step']) if logged else 'no step'} in metrics.jsonl, "
                             f"checkpoints {done or 'none'}")
            run_to_end(run, data)
            same = fingerprint(run, data) == want
            ok += same
            rows.append((i, f"{delay:.2f}", killed_at, "identical" if same else "DIFFERENT"))
            print(f"trial {i:2d}: kill after {delay:5.2f} s ({killed_at}): {rows[-1][-1]}")
    summary = f"{ok} of {args.kills} trials ended bit for bit where the uninterrupted run ends"
    print(summary)
    if args.out:
        setup = (f"uninterrupted run: first step logged after {first:.1f} s, {wall:.1f} s in all, rollbacks to steps "
                 f"{events}; kills uniform in [{max(first - 0.3, 0.1):.1f}, {wall:.1f}] s; seed {args.seed}")
        head = "| trial | kill after s | state when killed | final losses and parameters |\n|---|---|---|---|"
        lines = [f"# kill drill: {summary}", "", setup, "", head, *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if ok == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
