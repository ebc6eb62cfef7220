"""Peak memory and time of one training forward + backward under each loss head
(train.loss_head: plain, checkpointed, fused) and chunk size (train.loss_chunk_tokens).

Each setting runs in its own process (peak resident set is per process and only grows), on
the debug model widened to a large vocabulary, where the fp32 logits dominate: 4096 tokens x
32768 vocabulary = 0.54 GB per copy of the logits. Prints peak RSS per setting, the time of
the step, and the saving against the first setting.

    python benchmarks/loss_memory.py [--vocab 32768] [--tokens 4096] [--heads plain:0,checkpointed:1024,fused:1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(vocab: int, tokens: int, head: str, chunk: int) -> dict:
    import torch

    from fp8lab.models import Transformer, preset_args
    from fp8lab.train.step import model_loss

    torch.manual_seed(0)
    model = Transformer(preset_args("debug", vocab_size=vocab))
    seq = 512
    x = torch.randint(0, vocab, (tokens // seq, seq))
    y = torch.randint(0, vocab, (tokens // seq, seq))
    model_loss(model, x[:1, :16], y[:1, :16], head=head, chunk_tokens=chunk).backward()  # allocator and kernels warm
    model.zero_grad(set_to_none=False)  # gradients exist before the measured step, as in training
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = model_loss(model, x, y, head=head, chunk_tokens=chunk)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"head": head, "chunk": chunk, "loss": loss.item() / tokens, "step_s": dt, "peak_gb": peak * 1024 / 1e9,
            "step_growth_gb": (peak - base) * 1024 / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", default="plain:0,checkpointed:1024,fused:1024", help="head:chunk_tokens, ...")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a worker: one head:chunk setting, JSON out
    args = p.parse_args()
    if args.one is not None:
        head, chunk = args.one.split(":")
        print(json.dumps(one(args.vocab, args.tokens, head, int(chunk))))
        return 0
    rows = []
    for setting in args.heads.split(","):
        out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
                              "--one", setting], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout))
    base = rows[0]
    print(f"debug model, vocab {args.vocab:,}, {args.tokens:,} tokens, fp32 on CPU; one forward + backward")
    print("| loss_head | loss_chunk_tokens | loss/token | step s | peak RSS GB | step's RSS growth GB | vs first |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['chunk']} | {r['loss']:.5f} | {r['step_s']:.2f} | {r['peak_gb']:.2f} | {r['step_growth_gb']:.2f} | "
              f"{r['step_growth_gb'] - base['step_growth_gb']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
