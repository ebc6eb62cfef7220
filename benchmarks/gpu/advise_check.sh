#!/usr/bin/env bash
# The prepared doctor + advise check for a GPU session (an H200 for a few minutes), < 8 minutes:
#   1. fp8lab doctor: versions, probes per recipe, torch.compile, and this card's measured
#      BF16 / FP8 matmul rates (cached in $FP8LAB_CACHE, which advise then reads);
#   2. fp8lab advise for the 1b and 8b presets on this GPU, with the measured and the datasheet rates;
#   3. predicted vs measured per-layer speedups for the 1b preset's linear shapes
#      (benchmarks/advise_vs_measured.py, M = 16384 tokens, fp8-tensorwise and fp8-rowwise).
# Everything goes to $OUT (the device tool brings it back); the short tables print last.
# Copy $OUT/advise_vs_measured.md into benchmarks/results/<date>-<gpu>-advise.md afterwards.
# On the lent H200 (no torchao, no tomli-w, no network): here, run
#   ../shared/gpu/fetch-wheels.sh torchao==0.18.0 tomli-w==1.2.0
# (fp8lab's config writer needs tomli-w), carry .whl, and start the command with the line it prints, then: bash benchmarks/gpu/advise_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-advise-check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
export FP8LAB_CACHE=${FP8LAB_CACHE:-$OUT/cache}
PY=${PY:-python3}
$PY -c "import torchao, tomli_w" || { echo "missing torchao or tomli-w: see the header of $0"; exit 3; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
} | tee "$OUT/env.txt"

timeout 150 $PY -m fp8lab doctor > "$OUT/doctor.txt" 2>&1; echo "doctor exit: $?" >> "$OUT/doctor.txt"
timeout 60 $PY -m fp8lab doctor --json --no-measure > "$OUT/doctor.json" 2> "$OUT/doctor-json.err"
for preset in 1b 8b; do
  timeout 60 $PY -m fp8lab advise --model $preset --gpu auto --batch-tokens 16384 --seq-len 2048 \
    > "$OUT/advise-$preset.txt" 2>&1
  timeout 60 $PY -m fp8lab advise --model $preset --gpu auto --batch-tokens 16384 --seq-len 2048 --json \
    > "$OUT/advise-$preset.json" 2>> "$OUT/advise-$preset.txt"
  timeout 60 $PY -m fp8lab advise --model $preset --gpu auto --batch-tokens 16384 --seq-len 2048 --rates vendor \
    --json > "$OUT/advise-$preset-vendor.json" 2>> "$OUT/advise-$preset.txt"
done
timeout 300 $PY benchmarks/advise_vs_measured.py --preset 1b --tokens 16384 \
  --recipes fp8-tensorwise,fp8-rowwise --out "$OUT" > "$OUT/advise_vs_measured.log" 2>&1
cp -r "$FP8LAB_CACHE"/*.json "$OUT"/ 2>/dev/null || true

echo "== doctor =="; tail -25 "$OUT/doctor.txt"
echo "== advise 1b (measured rates) =="; grep -E "^│ (bf16|fp8|mxfp8)|recommended" "$OUT/advise-1b.txt" || tail -5 "$OUT/advise-1b.txt"
echo "== predicted vs measured, 1b linears, M=16384 =="; cat "$OUT/advise_vs_measured.md" 2>/dev/null || tail -5 "$OUT/advise_vs_measured.log"
