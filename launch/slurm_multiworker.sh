#!/usr/bin/env bash
# Slurm + MultiWorkerMirroredStrategy: writes an sbatch script (one task per node) and prints how to submit it.
#
#   NODES=2 GPUS_PER_NODE=4 PARTITION=gpu bash launch/slurm_multiworker.sh
#   sbatch distbatch-multiworker.sbatch
#
# No TF_CONFIG: the training process builds the cluster from Slurm's
# environment with tf.distribute.cluster_resolver.SlurmClusterResolver and
# mirrors over all GPUs of its node (NCCL).
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-4}"
PARTITION="${PARTITION:-}"
TIME="${TIME:-04:00:00}"
GLOBAL_BATCH="${GLOBAL_BATCH:-4096}"
EPOCHS="${EPOCHS:-30}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/slurm-multiworker-bs${GLOBAL_BATCH}}"

args=(--nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --backend multiworker --time "$TIME"
      --job-name distbatch-multiworker --output distbatch-multiworker.sbatch)
[ -n "$PARTITION" ] && args+=(--partition "$PARTITION")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)

"$DISTBATCH" launch slurm "${args[@]}" \
    -- "$DISTBATCH" train --backend multiworker --dataset "$DATASET" --model "$MODEL" \
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT"
