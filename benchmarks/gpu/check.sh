#!/usr/bin/env bash
# The one prepared GPU check (H200 or any CUDA GPU), aiming at under 8 minutes in all:
#   1. tests/gpu: FP8 SQNR with the real kernels, the capability gate, short compiled runs;
#   2. fp8lab bench, the training step side by side, seq 512, 32 x 512 = 16K tokens per
#      micro-batch (one micro-batch per step), random tokens (--random-data, Llama 3's vocabulary):
#      preset 1b with bf16, fp8-tensorwise and fp8-rowwise; preset 3b with bf16 and fp8-tensorwise.
#      Each recipe runs in its own process, with a per-recipe time limit sized to what is left
#      of BUDGET, so a slow or crashing recipe is a "failed" row and the JSON is still written.
# Everything goes to $OUT (the device tool brings it back): bench-1b.{json,md,txt},
# bench-3b.{json,md,txt}, bench.md (both tables: copy it to benchmarks/results/<date>-h200.md),
# pytest.txt, env.txt. The short tables print last.
# LAYERS=1 also times the 1b model's linear shapes (bf16 vs each FP8 recipe); it adds about a
# minute of compiles per FP8 recipe, so it is off by default.
# On the lent H200 (no torchao, no tomli-w, no network): here, run
#   ../shared/gpu/fetch-wheels.sh torchao==0.18.0 tomli-w==1.2.0
# (fp8lab's config writer needs tomli-w), carry .whl, and start the command with the line it prints, then: bash benchmarks/gpu/check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
export FP8LAB_CACHE=${FP8LAB_CACHE:-/tmp/fp8lab-cache}  # the random data set; kept out of $OUT
PY=${PY:-python3}
$PY -c "import torchao, tomli_w" || { echo "missing torchao or tomli-w: see the header of $0"; exit 3; }
BUDGET=${BUDGET:-470}  # seconds for the whole script
LAYERS=${LAYERS:-0}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchao', m.version('torchao'), 'cc', torch.cuda.get_device_capability())"
} | tee "$OUT/env.txt"

timeout 130 $PY -m pytest tests/gpu -q -m gpu -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
echo "pytest exit: $? after ${SECONDS}s" >> "$OUT/pytest.txt"

# bench NAME CONFIG RECIPES PER_RECIPE_MAX [more args]: one fp8lab bench, each recipe limited to
# min(PER_RECIPE_MAX, an equal share of what is left of BUDGET).
bench() {
  local name=$1 config=$2 recipes=$3 max=$4; shift 4
  local n; n=$(echo "$recipes" | tr ',' '\n' | wc -l)
  local per=$(( (BUDGET - SECONDS - 20) / n ))  # 20 s: the parent's own imports and data check
  (( per > max )) && per=$max
  if (( per < 30 )); then
    echo "skipped: ${per}s per recipe left of BUDGET=${BUDGET}s" | tee "$OUT/$name.txt"
    return
  fi
  timeout $(( per * n + 60 )) $PY -m fp8lab bench -c "$config" --recipes "$recipes" --random-data \
    --data.seq_len=512 --data.micro_batch_size=32 --train.grad_accum_steps=1 --warmup 3 --steps 20 \
    --timeout "$per" --out "$OUT/$name.json" --md "$OUT/$name.md" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name exit: $? after ${SECONDS}s (per-recipe limit ${per}s)" >> "$OUT/$name.txt"
}

extra=(); [ "$LAYERS" = 1 ] && extra=(--layers)
bench bench-1b configs/1b-h100.toml bf16,fp8-tensorwise,fp8-rowwise 90 ${extra[@]+"${extra[@]}"}
bench bench-3b configs/3b-h200.toml bf16,fp8-tensorwise 110
cat "$OUT"/bench-1b.md "$OUT"/bench-3b.md > "$OUT/bench.md" 2>/dev/null

echo "== pytest tests/gpu =="; tail -2 "$OUT/pytest.txt"
for name in bench-1b bench-3b; do
  echo "== $name (tokens/s median; speedup vs bf16 from this run) =="
  if [ -f "$OUT/$name.md" ]; then grep -E '^\| (recipe|bf16|fp8|attention|feed_forward|output)' "$OUT/$name.md"
  else tail -5 "$OUT/$name.txt"; fi
  tail -1 "$OUT/$name.txt"
done
echo "total: ${SECONDS}s"
