"""fp8lab recipes: the precision recipes and the hardware each needs; --why: what each costs."""

from __future__ import annotations

ORDER = 30

# Where each recipe's time goes beside its GEMMs, in the roofline's terms (perf/roofline.py,
# perf/roofline_linear.py). The figures are predictions with `fp8lab doctor`'s rates of one H200
# (BF16 781, FP8 1423 / rowwise 1501 TFLOP/s, copy 4.18 TB/s) for the 1b model at 16,384 tokens,
# forward + backward of one linear, bf16 / tensorwise / rowwise ms.
WHY = {
    "bf16": "the baseline: three bf16 GEMMs per linear, plus the fp32 master weight's cast to bf16 and its "
            "gradient's back to fp32.",
    "fp8-tensorwise": "one scale per tensor: per operand an amax pass and one cast, the activations' cast also "
                      "writing the transposed copy their backward GEMM reads; all three GEMMs on cuBLAS FP8. "
                      "Narrow layers lose: wk, wv (2048 -> 512) 0.14 / 0.17 ms.",
    "fp8-rowwise": "one scale per row, so each operand is cast twice: along its rows for one GEMM, along its "
                   "columns for another (an amax pass down the columns, then a cast writing the transposed "
                   "layout, the slowest kind of cast kernel); the two backward GEMMs lack fast accumulation, so "
                   "TorchAO runs them on the tensorwise kernel and rescales each bf16 result in an extra kernel. "
                   "That traffic grows with tokens x width while the GEMM time it saves also grows with the "
                   "other dimension, so narrow layers (N <= 2048) gain little or lose: wq, wo (2048 -> 2048) "
                   "0.54 / 0.45 / 0.50 ms (casts and rescales 0.22 ms against 0.24 saved); wk, wv (2048 -> 512) "
                   "0.14 / 0.17 / 0.21; w1, w3 (2048 -> 8192) 2.16 / 1.59 / 1.67; w2 (8192 -> 2048) "
                   "2.16 / 1.59 / 1.77. Measured on that H200 the 1b step ran 0.97x of bf16 where this predicts "
                   "1.09x: the casts explain part of the loss, not all of it (see `fp8lab advise`). "
                   "precision.filter_mode=auto converts only the layers that win on the card.",
    "fp8-rowwise-gw-hp": "rowwise for the output and grad_input GEMMs (input and grad_output cast along rows only), "
                         "the weight also cast tensorwise, grad_weight in bf16: fewer casts than rowwise, one GEMM "
                         "without FP8's gain.",
    "mxfp8": "one power-of-two scale per 32 elements, from the cast kernel itself (no amax pass); each operand "
             "cast along both dimensions, the scales swizzled for the GEMM; Blackwell tensor cores.",
}


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the precision recipes and the hardware they need")
    p.add_argument("--why", action="store_true", help="also say where each recipe's time goes beside its GEMMs")
    p.set_defaults(fn=run)


def run(args, rest) -> int:
    from fp8lab.precision.recipes import RECIPES

    for r in RECIPES.values():
        tail = "; emulated on CPU, refused on other GPUs" if r.is_low_precision else ""
        print(f"{r.name:<18} {r.summary}\n{'':<18} runs on: {r.hardware}{tail}")
    if getattr(args, "why", False):
        print("\nwhere the time goes (predictions: `fp8lab advise`; H200, 1b model, 16,384 tokens):")
        for name in RECIPES:
            print(f"  {name}: {WHY[name]}")
    return 0
