#!/usr/bin/env bash
# MultiWorkerMirroredStrategy with N worker processes on this machine (each gets its own TF_CONFIG).
#
#   WORKERS=2 bash launch/local_multiworker.sh
#   DRY_RUN=1 WORKERS=2 bash launch/local_multiworker.sh       # print each worker's TF_CONFIG and command
#
# Multi-host: give the hosts; this prints (or writes) the command for each host:
#   HOSTS=10.0.0.1,10.0.0.2 bash launch/local_multiworker.sh
#   HOSTS=10.0.0.1,10.0.0.2 SCRIPTS=hostscripts bash launch/local_multiworker.sh   # worker<i>.sh per host
# then on host i:  bash hostscripts/worker<i>.sh
# (or: distbatch launch multiworker --hosts 10.0.0.1,10.0.0.2 --task-index i -- "$DISTBATCH" train ...)
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

WORKERS="${WORKERS:-2}"
HOSTS="${HOSTS:-}"
PORT="${PORT:-}"                      # empty: free local ports; multi-host default 12345
SCRIPTS="${SCRIPTS:-}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
EPOCHS="${EPOCHS:-5}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/multiworker-w${WORKERS}-bs${GLOBAL_BATCH}}"

args=()
if [ -n "$HOSTS" ]; then args+=(--hosts "$HOSTS"); else args+=(--workers "$WORKERS"); fi
[ -n "$PORT" ] && args+=(--port "$PORT")
[ -n "$SCRIPTS" ] && args+=(--write-scripts "$SCRIPTS")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)

"$DISTBATCH" launch multiworker "${args[@]}" \
    -- "$DISTBATCH" train --backend multiworker --dataset "$DATASET" --model "$MODEL" \
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT"
