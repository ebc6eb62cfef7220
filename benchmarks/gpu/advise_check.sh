#!/usr/bin/env bash
# The prepared doctor + advise check for a GPU session (an H200 for a few minutes), < 8 minutes:
#   1. fp8lab doctor: versions, probes per recipe, torch.compile, and this card's measured
#      BF16 / FP8 matmul rates (cached in $FP8LAB_CACHE, which advise then reads);
#   2. fp8lab advise for the 1b and 3b presets on this GPU at the shapes of issue 13's table (16,384
#      tokens, seq 512), with the measured and the datasheet rates, for the plain loss head (the step
#      that table measured) and the config's default (fused); advise anchors to a bf16 step that
#      `fp8lab bench` cached in $FP8LAB_CACHE, if one ran before with the same settings;
#   3. predicted vs measured per-layer speedups and milliseconds for the 1b preset's linear shapes
#      (benchmarks/advise_vs_measured.py, M = 16384 tokens, fp8-tensorwise and fp8-rowwise): where
#      the roofline's kernel model of rowwise misses, layer by layer (EXTRA=1: the 3b shapes too).
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
ADV=(--gpu auto --batch-tokens 16384 --seq-len 512)
for preset in 1b 3b; do
  timeout 60 $PY -m fp8lab advise --model $preset "${ADV[@]}" --loss-head plain > "$OUT/advise-$preset.txt" 2>&1
  timeout 60 $PY -m fp8lab advise --model $preset "${ADV[@]}" --loss-head plain --json \
    > "$OUT/advise-$preset.json" 2>> "$OUT/advise-$preset.txt"
  timeout 60 $PY -m fp8lab advise --model $preset "${ADV[@]}" --json > "$OUT/advise-$preset-fused.json" \
    2>> "$OUT/advise-$preset.txt"
  timeout 60 $PY -m fp8lab advise --model $preset "${ADV[@]}" --loss-head plain --rates vendor \
    --json > "$OUT/advise-$preset-vendor.json" 2>> "$OUT/advise-$preset.txt"
done
timeout 300 $PY benchmarks/advise_vs_measured.py --preset 1b --tokens 16384 \
  --recipes fp8-tensorwise,fp8-rowwise --out "$OUT" > "$OUT/advise_vs_measured.log" 2>&1
if [ "${EXTRA:-0}" = 1 ]; then
  timeout 300 $PY benchmarks/advise_vs_measured.py --preset 3b --tokens 16384 \
    --recipes fp8-tensorwise,fp8-rowwise --out "$OUT/3b" > "$OUT/advise_vs_measured-3b.log" 2>&1
fi
cp -r "$FP8LAB_CACHE"/*.json "$OUT"/ 2>/dev/null || true

echo "== doctor =="; tail -25 "$OUT/doctor.txt"
for preset in 1b 3b; do
  echo "== advise $preset (measured rates, plain head) =="
  grep -E "^(rates|anchor)|^│ (bf16|fp8|mxfp8)|recommended" "$OUT/advise-$preset.txt" || tail -5 "$OUT/advise-$preset.txt"
done
echo "== predicted vs measured, 1b linears, M=16384 =="; cat "$OUT/advise_vs_measured.md" 2>/dev/null || tail -5 "$OUT/advise_vs_measured.log"
