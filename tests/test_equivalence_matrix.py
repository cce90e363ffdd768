"""Issue 26, item 1: the equivalence matrix. Every row of benchmarks/equivalence_matrix.py
trained 10 steps at global batch 32 on one device, mirrored (2 logical CPUs), multiworker
(2 processes) and Horovod (2 processes): rows with a tolerance end within it of one device
(weights and validation metrics) with ranks bit-identical; rows that cannot be equal
(per-replica BatchNorm, Dropout) are measurably different, as docs/correctness.md says. Also:
replicas draw independent Dropout masks (they drew identical ones before)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import VENV_BIN, cli_env, load_benchmark

NEEDS_HOROVODRUN = pytest.mark.skipif(shutil.which("horovodrun", path=str(VENV_BIN)) is None,
                                      reason="horovodrun is not installed in the venv")


def test_rows_are_named_once_and_state_a_tolerance_or_why_not():
    matrix = load_benchmark("equivalence_matrix")
    names = [r.name for r in matrix.ROWS]
    assert len(names) == len(set(names))
    for r in matrix.ROWS:
        assert r.why and (r.tolerance is None or 0 < r.tolerance <= 2e-3), r.name


@pytest.mark.slow
@NEEDS_HOROVODRUN
def test_every_row_on_every_backend(tmp_path):
    matrix = load_benchmark("equivalence_matrix")
    out = str(tmp_path / "matrix")
    matrix.run(out, steps=10, rows=[r.name for r in matrix.ROWS], backends=list(matrix.BACKENDS))
    found = matrix.compare(out)
    failures = []
    for row in matrix.ROWS:
        for backend in matrix.BACKENDS[1:]:
            cell = found[row.name][backend]
            if not cell["ranks_equal"]:
                failures.append(f"{row.name} {backend}: ranks differ")
            if row.tolerance is None:
                if cell["weights"] < 1e-3:
                    failures.append(f"{row.name} {backend}: equal ({cell['weights']:.1e}) though "
                                    f"documented as not equal")
            elif max(cell["weights"], cell["metrics"]) > row.tolerance:
                failures.append(f"{row.name} {backend}: {cell} above {row.tolerance}")
    assert not failures, "\n".join(failures)


MASKS = textwrap.dedent('''
    import sys, distbatch
    backend = distbatch.create_backend("mirrored", cpu_replicas=2)[0]
    import numpy as np, keras, tensorflow as tf
    from distbatch.training.replica_seeds import decorrelate_replicas
    with backend.scope():
        model = keras.Sequential([keras.Input((256,)), keras.layers.Dropout(0.5, seed=1)])
    if sys.argv[1] == "decorrelated":
        decorrelate_replicas(model, backend)
    f = tf.function(lambda: backend.run(lambda: model(tf.ones((64, 256)), training=True)))
    agree = []
    for _ in range(3):
        a, b = [o.numpy() != 0 for o in backend.strategy.experimental_local_results(f())]
        agree.append(float((a == b).mean()))
    print("AGREE", min(agree), max(agree))
''')


@pytest.mark.slow
def test_replicas_draw_independent_dropout_masks(tmp_path):
    (tmp_path / "masks.py").write_text(MASKS)
    seen = {}
    for mode in ("as_keras", "decorrelated"):
        proc = subprocess.run([sys.executable, str(tmp_path / "masks.py"), mode], capture_output=True,
                              text=True, timeout=120, env=cli_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("AGREE"))
        seen[mode] = [float(v) for v in line.split()[1:]]
    assert seen["as_keras"] == [1.0, 1.0]  # Keras alone: the same mask on both replicas
    lo, hi = seen["decorrelated"]
    assert 0.47 < lo <= hi < 0.53  # independent masks at rate 0.5 agree on half the entries
