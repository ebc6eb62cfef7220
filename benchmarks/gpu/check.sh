#!/usr/bin/env bash
# The one prepared GPU check (H200 or any CUDA GPU), aiming at under 8 minutes with the machine's
# ~30 s start (AIM=450 s for this script), never past HARD=570 s (the device tool stops a command
# at 600 s), in order of importance:
#   1. tests/gpu, all of them (no -x): FP8 SQNR with the real kernels, the capability gate,
#      short compiled runs, one host sync per step (~50 s);
#   2. fp8lab bench --vs-plain, preset 1b: bf16, fp8-tensorwise, fp8-rowwise, and fp8-rowwise with
#      precision.filter_mode=auto as its own row (`fp8-rowwise:filter_mode=auto`, so it is measured
#      against bf16 in the same invocation; its plain-loop twin is the plain fp8-rowwise run);
#   3. the same for preset 3b: bf16, fp8-tensorwise;
#   4. fp8lab doctor (the card's measured rates), then fp8lab advise --json for 1b and 3b at the same
#      shapes, after the benches (so advise anchors on bench's measured bf16 step, found in
#      $FP8LAB_CACHE, and uses doctor's rates).
# Bench shapes: seq 512, 32 x 512 = 16K tokens per step (grad_accum_steps=1, which --vs-plain needs),
# random tokens of Llama 3's vocabulary, tied embeddings, 3 warm-up + 15 timed steps, median.
# --vs-plain runs the plain PyTorch + TorchAO loop (src/fp8lab/bench/plain_loop.py) beside each
# recipe, each side in its own process, alternating which goes first: fp8lab/plain comes from one
# invocation. That makes 7 processes for 1b (the filter row has no plain twin of its own) and 4
# for 3b, at ~27-42 s each (import, build, per-block compile, 18 steps): ~245 s + ~135 s.
# Each worker process has a time limit (PER; generous, as the filter row also times its layer
# shapes at start-up): a slow or crashing one is a "failed" row and the JSON is still written.
# Each bench as a whole is cut off in time to leave RESERVE seconds before HARD for what follows
# (its finished rows' tokens/s are in log.txt's progress lines even then); a stage that no
# longer fits (less than NEED seconds left) is skipped and says so. On the measured costs
# (27-42 s per 1b process, 29-33 s per 3b; the filter row also times 4 shapes x 2, compiled,
# unmeasured) expect ~7.5 minutes with the start at the fast end; at the slow end the 1b bench
# alone takes ~6 minutes and 3b is skipped. Not yet run on a GPU.
# $OUT (the device tool brings back at most 8 files) gets exactly these: env.txt (versions),
# pytest.txt, bench-1b.json, bench-3b.json, bench.md (both tables: copy it to
# benchmarks/results/<date>-h200.md), advise-1b.json, advise-3b.json, log.txt (the benches'
# consoles, advise's stderr, stage timings). The short tables print last.
# LAYERS=1 also times the 1b model's linear shapes (bf16 vs each FP8 recipe, about a minute of
# compiles per FP8 recipe): it does not fit beside --vs-plain in 8 minutes, so it is off by default.
# On the lent H200 (no torchao, no tomli-w, no network): here, run
#   ../shared/gpu/fetch-wheels.sh torchao==0.18.0 tomli-w==1.2.0
# (fp8lab's config writer needs tomli-w), carry .whl, and start the command with the line it
# prints, then: bash benchmarks/gpu/check.sh
set -uo pipefail
OUT=${OUT:-/tmp/fp8lab-gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-stage files, gathered into $OUT's few at the end
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
export FP8LAB_CACHE=${FP8LAB_CACHE:-/tmp/fp8lab-cache}  # the random data set, timings; kept out of $OUT
PY=${PY:-python3}
$PY -c "import torchao, tomli_w" || { echo "missing torchao or tomli-w: see the header of $0"; exit 3; }
AIM=${AIM:-450}
HARD=${HARD:-570}
LAYERS=${LAYERS:-0}
SHAPE=(--random-data --data.seq_len=512 --data.micro_batch_size=32 --train.grad_accum_steps=1 --warmup 3 --steps 15)

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, importlib.metadata as m
def v(name):
    try: return m.version(name)
    except m.PackageNotFoundError: return None
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchao', v('torchao'), 'triton', v('triton'),
      'cc', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"
} | tee "$OUT/env.txt"

timeout 130 $PY -m pytest tests/gpu -q -m gpu -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
echo "pytest exit: $? after ${SECONDS}s" | tee -a "$OUT/pytest.txt" >> "$LOG"

# bench NAME CONFIG RECIPES PER NEED RESERVE [more args]: one fp8lab bench --vs-plain, each worker
# process limited to PER seconds, the whole cut off RESERVE seconds before HARD; skipped when
# fewer than NEED seconds are left for it.
bench() {
  local name=$1 config=$2 recipes=$3 per=$4 need=$5 reserve=$6; shift 6
  local left=$(( HARD - SECONDS - reserve ))
  if (( left < need )); then
    echo "== $name: skipped, ${left}s left of the ${need}s it needs (HARD=${HARD}s)" | tee "$WORK/$name.txt" >> "$LOG"
    return
  fi
  echo "== $name: $recipes, processes of at most ${per}s, the whole at most ${left}s, from ${SECONDS}s" >> "$LOG"
  timeout "$left" $PY -m fp8lab bench -c "$config" --recipes "$recipes" --vs-plain "${SHAPE[@]}" \
    --timeout "$per" --out "$OUT/$name.json" --md "$WORK/$name.md" "$@" > "$WORK/$name.txt" 2>&1
  echo "$name exit: $? after ${SECONDS}s" >> "$WORK/$name.txt"
  cat "$WORK/$name.txt" >> "$LOG"
}

extra=(); [ "$LAYERS" = 1 ] && extra=(--layers)
# 1b first (the issue's most targets), cut off 40 s before HARD (advise and the summary); 3b
# only if its 4 processes (~30 s each) plus the parent still fit.
bench bench-1b configs/1b-h100.toml bf16,fp8-tensorwise,fp8-rowwise,fp8-rowwise:filter_mode=auto 90 200 40 \
  ${extra[@]+"${extra[@]}"}
bench bench-3b configs/3b-h200.toml bf16,fp8-tensorwise 75 140 40
cat "$WORK"/bench-1b.md "$WORK"/bench-3b.md > "$OUT/bench.md" 2>/dev/null

# doctor measures this card's GEMM rates and bandwidth (~17 s) into $FP8LAB_CACHE, so advise uses
# them (the issue's table was predicted from doctor's rates), beside bench's measured bf16 step.
if (( HARD - SECONDS > 80 )); then
  echo "== doctor, from ${SECONDS}s" >> "$LOG"
  timeout 60 $PY -m fp8lab doctor >> "$LOG" 2>&1
  echo "doctor exit: $? after ${SECONDS}s" >> "$LOG"
else
  echo "== doctor: skipped, $(( HARD - SECONDS ))s left (advise uses the datasheet rates)" >> "$LOG"
fi
for preset in 1b 3b; do
  echo "== advise $preset (16,384 tokens per micro-batch, seq 512), from ${SECONDS}s" >> "$LOG"
  timeout 40 $PY -m fp8lab advise --model $preset --gpu auto --batch-tokens 16384 --seq-len 512 --json \
    > "$OUT/advise-$preset.json" 2>> "$LOG"
  echo "advise $preset exit: $? after ${SECONDS}s" >> "$LOG"
done

echo "== pytest tests/gpu =="; tail -3 "$OUT/pytest.txt"
for name in bench-1b bench-3b; do
  echo "== $name (median tokens/s; vs bf16 and fp8lab/plain from this run) =="
  if [ -f "$WORK/$name.md" ]; then grep -E '^\| ' "$WORK/$name.md"; else tail -5 "$WORK/$name.txt"; fi
  tail -1 "$WORK/$name.txt"
done
rm -rf "$WORK"
echo "== advise (predicted) vs bench (measured) speedups over bf16 =="
$PY - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for preset in ("1b", "3b"):
    try:
        adv = {r["recipe"]: r for r in json.loads((out / f"advise-{preset}.json").read_text())["recipes"]}
        rows = json.loads((out / f"bench-{preset}.json").read_text())["recipes"]
    except Exception as e:  # a stage skipped or failed: its log says why
        print(f"{preset}: no comparison ({type(e).__name__}: {e})")
        continue
    for r in rows:
        name, _, setting = r["recipe"].partition(":")
        a = adv.get(name, {})
        # filter rows: the advised subset; anchored to bench's measured bf16 step where advise found it
        kind = "speedup" if setting else "speedup_all"
        pred = a.get(kind + "_anchored") or a.get(kind)
        how = "anchored" if a.get(kind + "_anchored") else "un-anchored"
        meas = r.get("speedup_vs_bf16")
        err = f"{pred / meas - 1:+.1%}" if pred and meas else "-"
        print(f"{preset} {r['recipe']:<30} advise {pred or '-'} ({how})  measured {meas and round(meas, 3) or '-'}  "
              f"advise/measured {err}  fp8lab/plain {r.get('vs_plain') and round(r['vs_plain'], 3) or '-'}")
EOF
echo "total: ${SECONDS}s (aim ${AIM}s)"
