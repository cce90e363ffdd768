#!/usr/bin/env bash
# A peer virtualenv for Horovod's own Keras workflow (benchmarks/loop_overhead.py, candidate c).
#
#   bash scripts/peer_venv.sh [PEER_DIR]      # default ~/.cache/distbatch/peer-venv
#
# horovod.tensorflow.keras needs tf.keras 2 (Keras 3 breaks its optimizer and
# callbacks, see docs/backends.md), so this venv holds what a Horovod user on
# TF 2.21 would install: tensorflow-cpu 2.21.0, tf-keras 2.21.0 (used with
# TF_USE_LEGACY_KERAS=1) and Horovod 0.28.1. Horovod comes from the wheel that
# scripts/build_horovod.sh builds once and caches under
# ~/.cache/distbatch/wheels/horovod-0.28.1-tf2.21.0/ (built there if missing),
# installed with --no-deps plus Horovod's own dependencies. Running it again
# takes seconds: a venv that already imports everything is left as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER="${1:-$HOME/.cache/distbatch/peer-venv}"
# Same interpreter as the project's venv: the cached Horovod wheel is cp311.
BASE_PY="${DISTBATCH_PYTHON:-$(sed -n 's/^executable = //p' "$ROOT/.venv/pyvenv.cfg" 2>/dev/null || true)}"
BASE_PY="${BASE_PY:-python3}"
TF_VERSION=2.21.0
say() { printf '[peer venv] %s\n' "$*" >&2; }
check() {
  TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 "$PEER/bin/python" -c "
import importlib.metadata as md
import tensorflow as tf, tf_keras, horovod.tensorflow.keras as hvd
assert md.version('tensorflow-cpu') == tf.__version__ == '$TF_VERSION', tf.__version__
names = {d.metadata['Name'].lower() for d in md.distributions()}
assert 'tensorflow' not in names, 'the full tensorflow wheel is installed beside tensorflow-cpu'
assert tf_keras.__version__.startswith('2.'), tf_keras.__version__
assert hvd.gloo_built(), 'horovod without gloo'
" 2>"$PEER/.check.log"
}

if [ -x "$PEER/bin/python" ] && check; then
  say "ready: $PEER"
  exit 0
fi
if [ -e "$PEER" ] && [ -n "$(ls -A "$PEER")" ] && [ ! -f "$PEER/pyvenv.cfg" ]; then
  say "$PEER exists and is not a virtualenv; give another path"; exit 1
fi
# Start clean: a half-made venv (or one with the full tensorflow wheel) is rebuilt, not patched.
say "creating $PEER with $BASE_PY"
"$BASE_PY" -m venv --clear "$PEER"
say "installing tensorflow-cpu==$TF_VERSION, tf-keras==$TF_VERSION"
pipq() { "$PEER/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq install "tensorflow-cpu==$TF_VERSION"
# --no-deps: tf-keras requires "tensorflow", whose wheel would overwrite tensorflow-cpu's files.
pipq install --no-deps "tf-keras==$TF_VERSION"
# Builds the wheel only when the cache lacks it; installs it --no-deps + cloudpickle psutil pyyaml packaging.
bash "$ROOT/scripts/build_horovod.sh" "$PEER/bin/python"
check || { tail -n 5 "$PEER/.check.log" >&2; say "FAILED: $PEER does not import tensorflow-cpu $TF_VERSION, tf_keras and horovod.tensorflow.keras"; exit 1; }
say "ready: $PEER"
