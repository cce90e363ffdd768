#!/usr/bin/env bash
# Horovod on a cluster of GPU machines reachable by passwordless ssh, started with horovodrun.
#
#   HOSTS=node1:4,node2:4 bash launch/horovod_cluster.sh
#   DRY_RUN=1 HOSTS=node1:4,node2:4 bash launch/horovod_cluster.sh    # print the command only
#
# One process per GPU (-np = total GPUs, host:slots = GPUs per host); each
# process pins GPU hvd.local_rank(). Every host needs the same venv path and
# code checkout (or a shared filesystem), and ssh from this host to all hosts.
# On CPU-only or mixed clusters add --gloo; with a system MPI, --mpi.
set -euo pipefail

# The venv need not be on PATH: $DISTBATCH, else `distbatch` on PATH, else this checkout's .venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTBATCH="${DISTBATCH:-$(command -v distbatch || echo "$ROOT/.venv/bin/distbatch")}"

HOSTS="${HOSTS:-node1:4,node2:4}"           # host:gpus,host:gpus,...
NP="${NP:-$(echo "$HOSTS" | tr ',' '\n' | awk -F: '{s += $NF} END {print s}')}"
NIC="${NIC:-}"                              # e.g. eth0 or ib0; empty = let Horovod find common NICs
GLOBAL_BATCH="${GLOBAL_BATCH:-4096}"
EPOCHS="${EPOCHS:-30}"
DATASET="${DATASET:-mnist1d}"
MODEL="${MODEL:-mlp}"
SEED="${SEED:-0}"
OUT="${OUT:-runs/horovod-np${NP}-bs${GLOBAL_BATCH}}"

extra=()
[ -n "$NIC" ] && extra+=(--network-interface "$NIC")
[ "${DRY_RUN:-0}" = 1 ] && extra+=(--dry-run)

"$DISTBATCH" launch horovod -np "$NP" -H "$HOSTS" "${extra[@]}" \
    --fusion-threshold-mb 64 --cycle-time-ms 5 --start-timeout 120 --output-filename "$OUT/logs" \
    -- "$DISTBATCH" train --backend horovod --dataset "$DATASET" --model "$MODEL" \
       --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT"
