#!/usr/bin/env bash
# distbatch bootstrap: make this checkout ready, then run one job.
#
#   bash scripts/bootstrap.sh sweep     # set up, then run the default batch-size sweep
#   bash scripts/bootstrap.sh test      # set up, then run the whole test suite
#   bash scripts/bootstrap.sh setup     # set up only
#
# What "set up" means (each step is skipped when already done, so a second
# run takes seconds):
#   1. Debian packages: openmpi-bin libopenmpi-dev cmake g++ iproute2 (installed
#      with apt-get when missing and running as root; otherwise the exact
#      apt-get line is printed and the script stops).
#   2. A virtualenv at .venv in the repo root.
#   3. tensorflow-cpu 2.21 (Keras 3), tensorboard, mpi4py, matplotlib, mnist1d,
#      scikit-learn, pytest, and distbatch itself (pip install -e .).
#   4. Horovod 0.28.1 with TensorFlow, Gloo and MPI. Horovod does not build
#      against TF 2.21 with a plain pip install; scripts/build_horovod.sh builds
#      a wheel with the verified shim-header recipe once and caches it under
#      ~/.cache/distbatch/wheels, keyed by the TensorFlow version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="${DISTBATCH_PYTHON:-python3}"
APT_PACKAGES="openmpi-bin libopenmpi-dev cmake g++ iproute2"
STAMP="$VENV/.distbatch-setup"

say() { printf '[distbatch setup] %s\n' "$*" >&2; }
# pip, minus the "Location ... is ignored" lines some machines' pip configs produce.
pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

setup_key() {
  # Anything that changes what setup installs changes this key.
  cat setup.py scripts/bootstrap.sh scripts/build_horovod.sh requirements*.txt 2>/dev/null | sha256sum | cut -d' ' -f1
}

apt_missing() {
  local missing=""
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  echo "$missing"
}

ensure_debian_packages() {
  local missing
  missing="$(apt_missing)"
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != "0" ]; then
    say "missing Debian packages:$missing"
    say "run as root:  apt-get update && apt-get install -y$missing   then run this command again"
    exit 1
  fi
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv at .venv"
    "$PY" -m venv "$VENV"
  fi
}

setup() {
  ensure_debian_packages
  ensure_venv
  local key
  key="$(setup_key)"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
     && "$VENV/bin/python" -c "import distbatch, horovod.tensorflow, mpi4py" 2>/dev/null; then
    return 0
  fi
  say "installing Python packages into .venv (first run: several minutes)"
  pipq install -q --upgrade pip setuptools wheel
  pipq install -q -r requirements.txt
  bash "$ROOT/scripts/build_horovod.sh" "$VENV/bin/python" 2> >(grep -v "is ignored: it is neither" >&2)
  pipq install -q --no-build-isolation --no-deps -e .
  # TF prints start-up notices on import; show the output only if the check fails.
  if ! out="$("$VENV/bin/python" -c "import distbatch, horovod.tensorflow, mpi4py, tensorboard" 2>&1)"; then
    printf '%s\n' "$out" >&2
    say "setup finished but the import check failed (see above)"
    exit 1
  fi
  echo "$key" > "$STAMP"
  say "setup done"
}

cmd="${1:-sweep}"
shift || true
case "$cmd" in
  setup) setup ;;
  sweep) setup
         # No arguments: the default sweep into runs/sweep, linear scaling + warmup and AdaScale
         # side by side (one report, one recommendation; ~2-3 min on 2 cores, docs/sweep.md).
         # --resume makes a second run idempotent: finished points are kept and only the
         # report is rebuilt.
         if [ "$#" -eq 0 ]; then set -- --scaling linear,adascale --out "$ROOT/runs/sweep" --resume; fi
         exec "$VENV/bin/distbatch" sweep "$@" ;;
  test)  setup; cd "$ROOT"; exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh {sweep|test|setup} [args...] (got '$cmd')" >&2; exit 2 ;;
esac
