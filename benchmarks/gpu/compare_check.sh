#!/usr/bin/env bash
# A short real-hardware fp8lab compare, for a GPU lease with time left after check.sh
# (about 3-4 minutes on an H200): the 125m preset on the embedded corpus (byte-level, learnable,
# shipped with Python), seq 512, 32 x 512 = 16K tokens per step, 300 steps, one seed,
# bf16 vs fp8-tensorwise vs fp8-rowwise with the real kernels and torch.compile.
# What it answers that CPU runs cannot: the speedup with real FP8 kernels and the loss gap
# with real FP8 numerics (scaled_mm accumulation) on the same batches and initial weights.
# Everything goes to $OUT/compare (summary.json, report.md, report.html, plots, logs).
# Copy report.md and the plots into benchmarks/results/<date>-<gpu>-compare/ afterwards.
# On the lent H200: here, run
#   ../shared/gpu/fetch-wheels.sh torchao==0.18.0 tomli-w==1.2.0
# carry .whl, and start the command with the line it prints, then: bash benchmarks/gpu/compare_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-compare-check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
export FP8LAB_CACHE=${FP8LAB_CACHE:-/tmp/fp8lab-cache}
PY=${PY:-python3}
$PY -c "import torchao, tomli_w" || { echo "missing torchao or tomli-w: see the header of $0"; exit 3; }
STEPS=${STEPS:-300}

timeout ${BUDGET:-300} $PY -m fp8lab compare -c configs/demo.toml --recipes bf16,fp8-tensorwise,fp8-rowwise \
  --model.preset=125m --data.seq_len=512 --data.micro_batch_size=32 --train.steps="$STEPS" \
  --train.eval_interval=100 --optim.warmup_steps=30 --optim.lr=1e-3 --checkpoint.interval=0 \
  --out "$OUT/compare" > "$OUT/compare.txt" 2>&1
echo "compare exit: $? after ${SECONDS}s" >> "$OUT/compare.txt"
grep -vE "^(bf16|fp8-[a-z-]+) seed 0 step " "$OUT/compare.txt" | tail -25
