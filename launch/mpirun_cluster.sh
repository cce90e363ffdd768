#!/usr/bin/env bash
# Horovod (or any MPI program) on a cluster with a system Open MPI, started with plain mpirun.
#
#   HOSTFILE=hosts.txt NP=8 bash launch/mpirun_cluster.sh
#   DRY_RUN=1 HOSTFILE=hosts.txt NP=8 bash launch/mpirun_cluster.sh
#
# hosts.txt has one line per machine: "node1 slots=4". mpirun forwards PATH,
# LD_LIBRARY_PATH, PYTHONPATH, TF_CPP_MIN_LOG_LEVEL and HOROVOD_*/NCCL_*
# variables with -x; add more with -x NAME. Horovod must be built with MPI.
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

HOSTFILE="${HOSTFILE:-hosts.txt}"
NP="${NP:-8}"
GLOBAL_BATCH="${GLOBAL_BATCH:-4096}"
EPOCHS="${EPOCHS:-30}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/mpirun-np${NP}-bs${GLOBAL_BATCH}}"

extra=()
[ "${DRY_RUN:-0}" = 1 ] && extra+=(--dry-run)

"$DISTBATCH" launch mpirun -np "$NP" --hostfile "$HOSTFILE" "${extra[@]}" \
    -- "$DISTBATCH" train --backend horovod --dataset "$DATASET" --model "$MODEL" \
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT"
