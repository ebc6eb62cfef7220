#!/usr/bin/env bash
# The one prepared GPU check (H200 or any CUDA GPU), under 8 minutes:
#   1. tests/gpu: FP8 SQNR with the real kernels, the capability gate, short compiled runs;
#   2. training throughput of bf16 vs fp8-tensorwise vs fp8-rowwise, 1b preset, seq 512,
#      16K tokens per micro-batch, side by side (ratios from this one run).
# Full results go to $OUT (the device tool brings them back); the short table prints last.
# On the lent H200 (no torchao, no network), start the command with the line that
# ../shared/gpu/fetch-wheels.sh prints, then: bash benchmarks/gpu/check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
PY=${PY:-python3}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchao', m.version('torchao'), 'cc', torch.cuda.get_device_capability())"
} | tee "$OUT/env.txt"

timeout 200 $PY -m pytest tests/gpu -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" | tail -15
timeout 300 $PY benchmarks/train_throughput.py --preset 1b --recipes bf16,fp8-tensorwise,fp8-rowwise \
  --seq-len 512 --micro-batch 32 --steps 20 --out "$OUT/throughput" > "$OUT/throughput.txt" 2>&1
echo "== pytest =="; tail -1 "$OUT/pytest.txt"
echo "== throughput: 1b, seq 512, 16K tokens/micro-batch =="; cat "$OUT/throughput.txt" | tail -6
