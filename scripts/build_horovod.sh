#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 with TensorFlow, Gloo and MPI into
# the given Python environment.
#
# Why a script: horovod 0.28.1 (the newest release) is a source distribution
# that does not compile against TensorFlow 2.21 with a plain pip install:
#   - xla_mpi_ops.cc includes highwayhash/farmhash headers that the TF wheel
#     ships under <tf include>/external/... but tf.sysconfig does not report;
#   - it includes tensorflow/compiler/xla/client/xla_builder.h, which moved to
#     xla/hlo/builder/xla_builder.h in TF >= 2.19.
# The recipe (no edits to Horovod's sources): a one-line shim header at the
# old path that includes the new one, plus -I flags for the two header dirs.
# The wheel is cached under ~/.cache/distbatch/wheels keyed by the TF version,
# so a second setup installs it in seconds.
set -euo pipefail
PYBIN="${1:?usage: build_horovod.sh PYTHON}"
HVD_VERSION=0.28.1
say() { printf '[distbatch horovod] %s\n' "$*" >&2; }

if "$PYBIN" -c "import horovod.tensorflow as h; assert h.gloo_built() and h.mpi_built()" 2>/dev/null; then
  exit 0
fi
TFVER="$("$PYBIN" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
CACHE="${DISTBATCH_CACHE:-$HOME/.cache/distbatch}/wheels/horovod-$HVD_VERSION-tf$TFVER"
mkdir -p "$CACHE"
WHEEL="$(ls "$CACHE"/horovod-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$WHEEL" ]; then
  say "building horovod $HVD_VERSION against tensorflow $TFVER (about 2-4 minutes on 2 cores)"
  TFINC="$("$PYBIN" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>/dev/null)"
  SHIM="$(mktemp -d)"
  trap 'rm -rf "$SHIM"' EXIT
  mkdir -p "$SHIM/tensorflow/compiler/xla/client"
  echo '#include "xla/hlo/builder/xla_builder.h"' > "$SHIM/tensorflow/compiler/xla/client/xla_builder.h"
  LOG="$CACHE/build.log"
  if ! CXXFLAGS="-I$SHIM -I$TFINC/external/highwayhash -I$TFINC/external/farmhash_archive/src" \
      HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)" \
      "$PYBIN" -m pip wheel --no-cache-dir --no-build-isolation --no-deps \
        -w "$CACHE" "horovod==$HVD_VERSION" >"$LOG" 2>&1; then
    say "horovod build FAILED; the last lines of $LOG:"
    tail -n 30 "$LOG" >&2
    say "see docs/index.md, 'Troubleshooting the Horovod build'"
    exit 1
  fi
  WHEEL="$(ls "$CACHE"/horovod-*.whl | head -n1)"
fi
say "installing $(basename "$WHEEL")"
"$PYBIN" -m pip install -q --no-deps "$WHEEL"
"$PYBIN" -m pip install -q cloudpickle psutil pyyaml packaging
