"""Training throughput of several recipes on one model, measured side by side.

Each recipe trains the same preset on the same random tokens in its own process (so one
recipe's memory and compile caches do not touch the next), with checkpoints off; the
figure is fp8lab's own median tokens/s over the timed steps (the first step, which
compiles, is left out). Ratios are against the first recipe, measured in this run.

    python benchmarks/train_throughput.py --preset 1b --recipes bf16,fp8-tensorwise,fp8-rowwise \\
        --seq-len 512 --micro-batch 32 --steps 20 --out benchmarks/results/run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(path: Path, *, vocab: int, seq_len: int, sequences: int) -> Path:
    from fp8lab.data import write_dataset

    if (path / "manifest.json").exists():
        return path
    rng = np.random.default_rng(0)  # random ids: the speed does not depend on what they say
    tokens = rng.integers(0, vocab, size=(sequences, seq_len + 1))
    return write_dataset(path, train=[tokens], val=[tokens[:64]], seq_len=seq_len, vocab_size=vocab, eos_id=None,
                         tokenizer={"type": "random"}, sources=[{"kind": "random", "seed": 0}])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--recipes", default="bf16,fp8-tensorwise,fp8-rowwise")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", nargs="*", default=[], help="more --section.key=value overrides")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out / "data", vocab=args.vocab, seq_len=args.seq_len,
                     sequences=args.micro_batch * (args.steps + 2))
    rows = []
    for recipe in args.recipes.split(","):
        run = args.out / f"run-{recipe}"
        cmd = [sys.executable, "-m", "fp8lab", "train", "--run-dir", str(run),
               f"--model.preset={args.preset}", f"--data.path={data}", f"--data.seq_len={args.seq_len}",
               f"--data.micro_batch_size={args.micro_batch}", f"--train.steps={args.steps}",
               f"--precision.recipe={recipe}", "--optim.warmup_steps=2", "--train.eval_interval=0",
               "--train.eval_batches=1", "--checkpoint.interval=0", "--checkpoint.at_end=false",
               "--logging.progress=off", f"--logging.log_interval={args.steps}", *args.extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (args.out / f"{recipe}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"recipe": recipe, "status": "failed", "reason": reason[:300], "wall_s": wall})
            continue
        s = json.loads((run / "summary.json").read_text())
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"recipe": recipe, "status": "ok", "tokens_per_s": s["tokens_per_s_median"],
                     "mfu": next((r["mfu"] for r in reversed(recs)), None), "mem_peak_gb": s["mem_peak_gb"],
                     "converted": s["conversion"]["num_converted"], "emulated": s["emulated"],
                     "startup_and_compile_s": recs[0]["step_time_s"], "wall_s": wall,
                     "final_loss": s["final_train_loss"], "device": s["device"], "versions": s["versions"]})
    base = next((r["tokens_per_s"] for r in rows if r["status"] == "ok"), None)
    lines = ["| recipe | tokens/s | vs first | MFU | peak mem GB | FP8 linears | first step s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['recipe']} | failed: {r['reason']} | | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['recipe']}{' (emulated)' if r['emulated'] else ''} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {mfu} | {r['mem_peak_gb']:.1f} | {r['converted']} | "
                     f"{r['startup_and_compile_s']:.1f} |")
    table = "\n".join(lines)
    (args.out / "throughput.json").write_text(json.dumps(rows, indent=1))
    (args.out / "throughput.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
