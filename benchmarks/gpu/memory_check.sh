#!/usr/bin/env bash
# The prepared GPU check of the "Memory and scale" issue (one H200 or any large CUDA GPU), under
# 8 minutes, each fp8lab bench in its own processes with the measured peak
# (torch.cuda.max_memory_allocated) beside the memory model's prediction ("predicted GB"):
#   1. the 8b preset, seq 512, fp8-tensorwise, full activation checkpointing, adamw-8bit
#      (and adamw-fp8): does Llama 3 8B train on ONE GPU, at what peak and tokens/s;
#   2. the 3b preset in bf16 and fp8-tensorwise with full checkpointing at 64 x 512 tokens per
#      micro-batch, twice the 32 x 512 that took 115 GB without it (2026-11-30);
#   3. benchmarks/memory.py --measure: the debug model's steps on the GPU, predicted vs the live
#      tensor bytes at the peak, per recipe, optimizer and checkpointing mode.
# Results go to $OUT: mem-8b.{json,md,txt}, mem-3b.{json,md,txt}, memory-measure.txt, env.txt;
# copy the tables to benchmarks/results/<date>-<gpu>-memory.md. Set-up on the lent H200: see
# benchmarks/gpu/check.sh (torchao and tomli-w wheels carried in .whl).
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-gpu-memory}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
export FP8LAB_CACHE=${FP8LAB_CACHE:-/tmp/fp8lab-cache}
PY=${PY:-python3}
$PY -c "import torchao, tomli_w" || { echo "missing torchao or tomli-w: see benchmarks/gpu/check.sh"; exit 3; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'torchao', m.version('torchao'))"
} | tee "$OUT/env.txt"

# mem NAME TIMEOUT BENCH-ARGS...: one fp8lab bench on random tokens, 2 warm-up + 10 timed steps.
mem() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY -m fp8lab bench --random-data --data.seq_len=512 --train.grad_accum_steps=1 --warmup 2 \
    --steps 10 --timeout $(( limit - 30 )) --out "$OUT/$name.json" --md "$OUT/$name.md" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name exit: $? after ${SECONDS}s" >> "$OUT/$name.txt"
}

mem mem-8b 200 -c configs/3b-h200.toml --model.preset=8b --recipes fp8-tensorwise --data.micro_batch_size=16 \
  --train.activation_checkpoint=full --optim.name=adamw-8bit
mem mem-3b 200 -c configs/3b-h200.toml --recipes bf16,fp8-tensorwise --data.micro_batch_size=64 \
  --train.activation_checkpoint=full
timeout 90 $PY benchmarks/memory.py --measure --recipes bf16,fp8-tensorwise --optimizers adamw,adamw-8bit \
  --ac none,full,selective > "$OUT/memory-measure.txt" 2>&1
echo "memory.py exit: $? after ${SECONDS}s" >> "$OUT/memory-measure.txt"

for name in mem-8b mem-3b; do
  echo "== $name (peak mem GB measured, predicted GB) =="
  if [ -f "$OUT/$name.md" ]; then grep -E '^\| (recipe|bf16|fp8)' "$OUT/$name.md"; else tail -5 "$OUT/$name.txt"; fi
  tail -1 "$OUT/$name.txt"
done
echo "== memory.py --measure =="; cat "$OUT/memory-measure.txt"
echo "total: ${SECONDS}s"
