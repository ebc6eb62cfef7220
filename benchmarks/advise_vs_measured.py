"""Predicted vs measured per-layer FP8 speedups: does `fp8lab advise`'s roofline hold here?

For every distinct linear shape of a preset (the output head excluded, as fp8lab skips it), at
--tokens tokens per micro-batch, it prints the roofline's predicted speedup of each recipe over
bf16 (forward + backward of the layer) for this GPU, with the rates advise would use (this
card's `fp8lab doctor` measurement when cached) and with the datasheet's, and on a CUDA GPU
the measured speedup (perf.measure.time_linear: fp32 master weight, bf16 autocast,
torch.compile, CUDA events, warm-up, median). Without CUDA it prints the predictions only.
Beside the ratios it prints the predicted and measured milliseconds of each side, and the JSON
holds the predicted kernels of each row (perf.roofline_linear.linear_cost), so a layer whose
prediction misses shows which side, and which kernels, to look at.

    python benchmarks/advise_vs_measured.py --preset 1b --tokens 16384 \\
        --recipes fp8-tensorwise,fp8-rowwise --out benchmarks/results/advise-1b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (M of every GEMM)")
    p.add_argument("--recipes", default="fp8-tensorwise,fp8-rowwise")
    p.add_argument("--gpu", default="auto", help="GPU id for the prediction; auto: this GPU (h200 without CUDA)")
    p.add_argument("--no-compile", action="store_true", help="time eagerly (FP8 casts unfused: pessimistic)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch

    from fp8lab.gpus import GPUS, get_gpu, lookup_gpu
    from fp8lab.models.presets import preset_args
    from fp8lab.perf.measure import load_measured_rates, time_linear
    from fp8lab.perf.roofline import layer_speedup, linear_cost, model_linears, rates_for, supports
    from fp8lab.precision.recipes import get_recipe

    cuda = torch.cuda.is_available()
    if args.gpu != "auto":
        spec = get_gpu(args.gpu)
    elif cuda:
        spec = lookup_gpu(torch.cuda.get_device_name()) or GPUS["h200"]
    else:
        spec = GPUS["h200"]
    gpu_id = next(k for k, v in GPUS.items() if v is spec)
    measured = load_measured_rates(gpu_id)
    rates = rates_for(gpu_id, measured=measured)
    vendor = rates_for(gpu_id, source="vendor")
    recipes = [get_recipe(r) for r in args.recipes.split(",")]
    margs = preset_args(args.preset)
    shapes: dict[tuple[int, int], list[str]] = {}
    for g in model_linears(margs):
        if g.name != "output":
            shapes.setdefault((g.k, g.n), []).append(g.name)

    device = torch.device("cuda") if cuda else None
    rows = []
    for (k, n), names in shapes.items():
        m = args.tokens
        bf16_s = time_linear(m, k, n, "bf16", device, compiled=not args.no_compile) if cuda else None
        for r in recipes:
            if supports(r, rates):
                rows.append({"layers": names, "m": m, "k": k, "n": n, "recipe": r.name,
                             "unsupported": supports(r, rates)})
                continue
            cost = linear_cost(m, k, n, r, rates)
            row = {"layers": names, "m": m, "k": k, "n": n, "recipe": r.name,
                   "predicted": round(layer_speedup(m, k, n, r, rates), 3),
                   "predicted_vendor": round(layer_speedup(m, k, n, r, vendor), 3),
                   "predicted_bf16_ms": round(linear_cost(m, k, n, "bf16", rates).total_s * 1e3, 4),
                   "predicted_recipe_ms": round(cost.total_s * 1e3, 4),
                   "predicted_kernels_us": {name: round(t * 1e6, 1) for name, t in cost.kernels},
                   "bf16_ms": None, "recipe_ms": None, "measured": None}
            if cuda:
                t0 = time.perf_counter()
                try:
                    fp8_s = time_linear(m, k, n, r.name, device, compiled=not args.no_compile)
                    row.update(bf16_ms=round(bf16_s * 1e3, 4), recipe_ms=round(fp8_s * 1e3, 4),
                               measured=round(bf16_s / fp8_s, 3))
                except Exception as e:  # noqa: BLE001 - a recipe that fails here is a finding
                    row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    title = (f"{args.preset} linears, M={args.tokens}, {spec.name}; predicted with {rates.source} rates"
             + ("" if cuda else " (no CUDA here: predictions only)"))
    lines = [f"# {title}", "", f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if cuda else ""), "",
             "| layers | M x K x N | recipe | predicted | predicted (vendor) | measured | bf16 ms (pred.) "
             "| fp8 ms (pred.) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f = lambda v: "-" if v is None else f"{v}"  # noqa: E731
        lines.append(f"| {', '.join(row['layers'])} | {row['m']}x{row['k']}x{row['n']} | {row['recipe']} | "
                     f"{f(row.get('predicted'))} | {f(row.get('predicted_vendor'))} | "
                     f"{f(row.get('measured')) if 'error' not in row else 'failed: ' + row['error']} | "
                     f"{f(row.get('bf16_ms'))} ({f(row.get('predicted_bf16_ms'))}) | "
                     f"{f(row.get('recipe_ms'))} ({f(row.get('predicted_recipe_ms'))}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "advise_vs_measured.json").write_text(json.dumps(
        {"title": title, "gpu": gpu_id, "rates": rates.to_dict(), "measured_rates": measured, "cuda": cuda,
         "rows": rows}, indent=1))
    (args.out / "advise_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
