"""Training memory per preset, recipe, optimizer and activation-checkpointing mode: predicted by
fp8lab's memory model, part by part, with whether it fits each named GPU; with --measure, real
training steps of a small model on this device beside the prediction.

    python benchmarks/memory.py [--presets 1b,3b,8b] [--recipes bf16,fp8-tensorwise]
        [--optimizers adamw,adamw-8bit] [--ac none,full] [--gpus rtx5090,h100-sxm,h200]
        [--seq-len 512] [--micro-batch 32] [--num-gpus 1]
    python benchmarks/memory.py --measure [--preset debug] [--seq-len 256] [--micro-batch 8] [--vocab 320]

The prediction assumes a GPU run: bf16 autocast, blocks compiled; --measure uses what this device
runs (fp32 on a CPU without native bf16, FP8 emulated on CPU) and predicts for exactly that. Measured = the live
tensor bytes at the step's peak from torch's memory profiler (perf.memory.measure_peak); on CUDA
also torch.cuda.max_memory_allocated, which adds the allocator's rounding and workspaces.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def predict_table(args) -> int:
    from fp8lab.gpus import get_gpu
    from fp8lab.models.presets import preset_args
    from fp8lab.perf.memory import PARTS, predict_memory
    from fp8lab.perf.roofline import model_linears
    from fp8lab.precision.convert import eligible
    from fp8lab.precision.recipes import get_recipe

    gpus = {g: get_gpu(g) for g in _csv(args.gpus)}
    tokens = args.seq_len * args.micro_batch
    short = {"parameters": "params", "gradients": "grads", "optimizer state": "optim",
             "low-precision weight copies": "lp copies", "activations": "acts", "logits": "logits"}
    head = ["preset", "recipe", "optimizer", "AC", *(short[p] for p in PARTS), "total GB", *gpus]
    print(f"predicted peak per GPU (GB), {args.micro_batch} x {args.seq_len} tokens per micro-batch, bf16 autocast, compiled, "
          f"{args.loss_head} loss head"
          + (f", FSDP2 over {args.num_gpus} GPUs" if args.num_gpus > 1 else ""))
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for preset in _csv(args.presets):
        margs = preset_args(preset, max_seq_len=max(args.seq_len, 2048))
        for recipe in _csv(args.recipes):
            r = get_recipe(recipe)
            conv = {g.name for g in model_linears(margs) if eligible(g.name, g.k, g.n, r, ["output"]) is None} \
                if r.is_low_precision else set()
            for opt in _csv(args.optimizers):
                for ac in _csv(args.ac):
                    plan = predict_memory(margs, tokens=tokens, recipe=recipe, converted=conv, optimizer=opt,
                                          activation_checkpoint=ac, compute_bytes=2, num_gpus=args.num_gpus,
                                          compiled=True, loss_head=args.loss_head)
                    gb = plan.gb()
                    fits = ["yes" if plan.total <= spec.mem_gb * 1e9 else "no" for spec in gpus.values()]
                    print("| " + " | ".join([preset, recipe, opt, ac, *(f"{gb[p]:.1f}" for p in PARTS),
                                             f"{plan.total / 1e9:.1f}", *fits]) + " |")
    print("\nfits: the predicted peak is at most the card's memory; the CUDA context (~0.5-1 GB), the allocator's "
          "fragmentation and compile's workspaces come on top.")
    return 0


def measure_table(args) -> int:
    import numpy as np
    import torch

    from fp8lab.bench.memory import measure_for, predict_for
    from fp8lab.config import load_config
    from fp8lab.data import write_dataset
    from fp8lab.train.build import build

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "d", train=[rng.integers(0, args.vocab, (4 * args.micro_batch, args.seq_len + 1))],
                             val=[rng.integers(0, args.vocab, (args.micro_batch, args.seq_len + 1))],
                             seq_len=args.seq_len, vocab_size=args.vocab, eos_id=None, tokenizer={"type": "random"},
                             sources=[])
        print("| recipe | optimizer | AC | predicted MB | measured MB | predicted / measured |"
              + (" max_memory_allocated MB |" if torch.cuda.is_available() else "")
              + "\n|---|---|---|---|---|---|" + ("---|" if torch.cuda.is_available() else ""))
        for recipe in _csv(args.recipes):
            for opt in _csv(args.optimizers):
                for ac in _csv(args.ac):
                    cfg = load_config(None, {
                        "data.path": str(data), "data.seq_len": str(args.seq_len),
                        "data.micro_batch_size": str(args.micro_batch), "model.preset": args.preset,
                        "model.vocab_size": str(args.vocab), "precision.recipe": recipe, "optim.name": opt,
                        "train.activation_checkpoint": ac, "train.eval_batches": "1", "logging.progress": "off"})
                    parts = build(cfg)
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    measured = measure_for(parts, cfg)
                    predicted = predict_for(parts, cfg)
                    extra = f" {torch.cuda.max_memory_allocated() / 1e6:,.1f} |" if torch.cuda.is_available() else ""
                    print(f"| {parts.label} | {opt} | {ac} | {predicted.total / 1e6:,.1f} | {measured['total'] / 1e6:,.1f} "
                          f"| {predicted.total / measured['total']:.3f} |{extra}")
                    del parts
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="125m,350m,1b,3b,8b")
    p.add_argument("--recipes", default="bf16,fp8-tensorwise")
    p.add_argument("--optimizers", default="adamw,adamw-8bit")
    p.add_argument("--ac", default="none,full")
    p.add_argument("--gpus", default="rtx5090,h100-sxm,h200")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--loss-head", default="fused", choices=("fused", "plain", "checkpointed"), help="train.loss_head")
    p.add_argument("--measure", action="store_true", help="measure real steps of --preset on this device instead")
    p.add_argument("--preset", default="debug", help="with --measure: the model measured")
    p.add_argument("--vocab", type=int, default=320, help="with --measure: its vocabulary")
    args = p.parse_args(argv)
    if args.measure:
        if "--seq-len" not in (argv or sys.argv):
            args.seq_len = 256
        if "--micro-batch" not in (argv or sys.argv):
            args.micro_batch = 8
        return measure_table(args)
    return predict_table(args)


if __name__ == "__main__":
    sys.exit(main())
