#!/usr/bin/env bash
# fp8lab on N nodes under SLURM: one torchrun per node, joined by a c10d rendezvous on the first
# node, HSDP with one replica per node (the weight all-gathers stay inside a node; only the
# gradient all-reduce crosses nodes). Two minutes before the time limit every trainer gets
# SIGUSR1, finishes its step, saves a checkpoint and stops; the job then requeues itself and
# the same command resumes from that checkpoint.
#
#   RUN_DIR=/shared/runs/3b CONFIG=configs/3b-h200.toml sbatch --nodes=4 scripts/slurm-fsdp.sh [--key=value ...]
#
# RUN_DIR must be on a file system every node shares: each rank writes its checkpoint shards
# there and rank 0 the run's files. A step plus a checkpoint must fit in the 120 s of warning
# (raise USR1@120 and --shutdown-timeout below together for big models).
#SBATCH --job-name=fp8lab
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
: "${RUN_DIR:?set RUN_DIR to a run directory on a file system every node shares}"
export RUN_DIR
export CONFIG=${CONFIG:-configs/3b-h200.toml}
export PYTHON=${PYTHON:-python}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export RDZV_PORT=${RDZV_PORT:-29500}

# One task per node. SLURM signals every process of the step (the trainers, torchrun, this
# wrapper); torchrun must survive USR1 (its default action kills it) and pass it on where the
# trainers were not reached (its workers run in their own sessions), then give them time to
# finish the step and the checkpoint before it kills them. A trainer takes the same signal
# twice within a second as one request. The wrapper only waits (`trap :`: its children keep
# the default actions). torchrun exits 1 whatever its workers' code, so a run that stopped on
# the signal (its last event in events.jsonl is "preempted") is reported as fp8lab's 75. No
# --kill-on-bad-exit: a node that finishes first must not kill the others while they complete
# the same checkpoint.
set +e
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c '
  trap : USR1 TERM
  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=100 \
      -m fp8lab train -c "$CONFIG" --run-dir "$RUN_DIR" --parallel.data_parallel=fsdp \
      --parallel.replicate="$SLURM_NNODES" --train.stop_signals=SIGTERM,SIGHUP,SIGUSR1 "$@"
  rc=$?
  if [ "$rc" -ne 0 ] && "$PYTHON" -c "import json, sys
lines = open(sys.argv[1]).read().splitlines()
sys.exit(0 if lines and json.loads(lines[-1]).get(\"kind\") == \"preempted\" else 1)" "$RUN_DIR/events.jsonl" 2>/dev/null
  then
    rc=75
  fi
  exit "$rc"
' fp8lab-node "$@"
rc=$?
set -e

if [ "$rc" -eq 75 ]; then  # stopped with a checkpoint: run again, resuming (same job id, same command)
  echo "fp8lab stopped on the time-limit signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
