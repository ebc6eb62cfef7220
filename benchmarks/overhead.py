"""Per-step overhead of fp8lab's trainer against a bare PyTorch loop (issue 5's budget:
trainer/bare <= 1.05x on CPU).

Both train the same model (fp8lab's build, same seed), at the same precision, on batches of
the same shape, in this one process. The trainer's side is a whole loop iteration
(`Trainer.advance`: loader, step, guard, metrics line flushed to disk, progress); the bare
side is forward, cross-entropy, backward, clip, AdamW step, `.item()`. The two are
interleaved A B B A so drift (thermals, other load) falls on both; medians of the timed
steps. The model is sized so the bare step takes <= 20 ms, where overhead shows most.

    python benchmarks/overhead.py [--steps 100] [--recipe bf16] [--seq-len 64] [--micro-batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fp8lab.bench.step_bench import random_dataset
from fp8lab.config import load_config
from fp8lab.train.build import build
from fp8lab.train.trainer import Trainer

VOCAB = 320


def bare_step_fn(parts, batch, grad_clip: float):
    """A plain training step on the built model and optimizer, nothing of fp8lab's loop around it."""
    params = list(parts.model.parameters())
    x, y = batch

    def step() -> float:
        with parts.autocast():
            logits = parts.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed steps per side (default 100)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recipe", default="bf16")
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=["model.n_layers=2"], metavar="SECTION.KEY=VALUE",
                   help="more config overrides (default: model.n_layers=2, which keeps the bare step <= 20 ms here)")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="precision.compute_dtype (auto: bf16 autocast for bf16, as training does)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = random_dataset(vocab=VOCAB, seq_len=args.seq_len, count=512)  # cached, reused
        total = args.warmup + 2 * args.steps
        cfg = load_config(None, {
            "model.preset": args.preset, "data.path": str(data), "data.seq_len": str(args.seq_len),
            "data.micro_batch_size": str(args.micro_batch), "train.steps": str(total + 1),
            "train.eval_interval": "0", "train.eval_batches": "1", "train.threads": str(args.threads),
            "precision.recipe": args.recipe, "precision.compute_dtype": args.compute_dtype, "optim.warmup_steps": "1", "checkpoint.interval": "0",
            "checkpoint.at_end": "false", "logging.progress": "off", "logging.log_interval": str(10 * total),
            **dict(kv.split("=", 1) for kv in args.set),
        })
        trainer = Trainer(cfg, Path(tmp) / "run")
        progress = trainer.start_loop()
        bare_parts = build(cfg)
        bare = bare_step_fn(bare_parts, bare_parts.loader.next_batch(), cfg.optim.grad_clip or float("inf"))
        for _ in range(args.warmup):
            trainer.advance(progress)
            bare()
        t_trainer, t_bare = [], []
        for i in range(args.steps):  # A B B A ...
            if i % 2 == 0:
                t_trainer.append(timed(lambda: trainer.advance(progress)))
                t_bare.append(timed(bare))
            else:
                t_bare.append(timed(bare))
                t_trainer.append(timed(lambda: trainer.advance(progress)))
        progress.close()
        trainer.logs.close()
        trainer.parts.loader.close()

    mt, mb = statistics.median(t_trainer), statistics.median(t_bare)
    tokens = args.micro_batch * args.seq_len
    print(f"{args.preset} {' '.join(args.set)}, {args.recipe} (compute {args.compute_dtype}), {args.micro_batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.steps} interleaved steps each")
    print(f"bare step    median {mb * 1e3:7.2f} ms  (p10 {np.percentile(t_bare, 10) * 1e3:.2f}, "
          f"p90 {np.percentile(t_bare, 90) * 1e3:.2f})  {tokens / mb:,.0f} tok/s")
    print(f"trainer step median {mt * 1e3:7.2f} ms  (p10 {np.percentile(t_trainer, 10) * 1e3:.2f}, "
          f"p90 {np.percentile(t_trainer, 90) * 1e3:.2f})  {tokens / mt:,.0f} tok/s")
    print(f"trainer/bare = {mt / mb:.2f}x")
    # Each trainer step against the bare step beside it: drift cancels within a pair.
    pairs = statistics.median(t / b for t, b in zip(t_trainer, t_bare))
    print(f"median of the {args.steps} side-by-side pairs' ratios: {pairs:.2f}x")
    if mb > 0.020:
        print(f"note: the bare step takes {mb * 1e3:.1f} ms (> 20 ms); use a smaller --micro-batch or --seq-len "
              "to see the overhead more sharply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
