#!/usr/bin/env bash
# Slurm + Horovod: writes an sbatch script (one task per GPU) and prints how to submit it.
#
#   NODES=2 GPUS_PER_NODE=4 PARTITION=gpu bash launch/slurm_horovod.sh
#   sbatch distbatch-horovod.sbatch
#
# Each srun task pins GPU hvd.local_rank(); Horovod's MPI controller starts
# from Slurm's PMI. If your site's srun needs it, set SRUN_MPI=pmix (or pmi2).
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-4}"
PARTITION="${PARTITION:-}"
TIME="${TIME:-04:00:00}"
SRUN_MPI="${SRUN_MPI:-}"
GLOBAL_BATCH="${GLOBAL_BATCH:-4096}"
EPOCHS="${EPOCHS:-30}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/slurm-horovod-bs${GLOBAL_BATCH}}"

args=(--nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --backend horovod --time "$TIME"
      --job-name distbatch-horovod --output distbatch-horovod.sbatch)
[ -n "$PARTITION" ] && args+=(--partition "$PARTITION")
[ -n "$SRUN_MPI" ] && args+=(--srun-mpi "$SRUN_MPI")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)

"$DISTBATCH" launch slurm "${args[@]}" \
    -- "$DISTBATCH" train --backend horovod --dataset "$DATASET" --model "$MODEL" \
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT"
