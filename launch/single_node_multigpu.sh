#!/usr/bin/env bash
# One machine, several GPUs: MirroredStrategy in one process (default) or one Horovod process per GPU.
#
#   bash launch/single_node_multigpu.sh                    # MirroredStrategy over all local GPUs
#   BACKEND=horovod bash launch/single_node_multigpu.sh    # horovodrun -np <GPUs> on localhost
#   CPU_REPLICAS=2 bash launch/single_node_multigpu.sh     # no GPU: 2 logical CPU replicas (testing only)
#
# MirroredStrategy needs no launcher (NCCL all-reduce between the GPUs).
# Horovod starts one process per GPU; each pins GPU hvd.local_rank().
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

BACKEND="${BACKEND:-mirrored}"
NUM_GPUS="${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
CPU_REPLICAS="${CPU_REPLICAS:-}"
GLOBAL_BATCH="${GLOBAL_BATCH:-1024}"
EPOCHS="${EPOCHS:-30}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/${BACKEND}-bs${GLOBAL_BATCH}}"

train=("$DISTBATCH" train --backend "$BACKEND" --dataset "$DATASET" --model "$MODEL"
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT")

case "$BACKEND" in
  mirrored)
    [ -n "$CPU_REPLICAS" ] && train+=(--cpu-replicas "$CPU_REPLICAS")
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${train[@]}"; echo; else "${train[@]}"; fi
    ;;
  horovod)
    NP="${NP:-$NUM_GPUS}"
    [ "$NP" -ge 1 ] || { echo "no GPUs found; set NP=2 (CPU processes)" >&2; exit 2; }
    extra=()
    [ "$NUM_GPUS" = 0 ] && extra+=(--gloo)       # CPU-only: Gloo controller, no MPI needed
    [ "${DRY_RUN:-0}" = 1 ] && extra+=(--dry-run)
    "$DISTBATCH" launch horovod -np "$NP" -H "localhost:$NP" "${extra[@]}" -- "${train[@]}"
    ;;
  *) echo "BACKEND must be mirrored or horovod, got '$BACKEND'" >&2; exit 2 ;;
esac
