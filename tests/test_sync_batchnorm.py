"""sync_batchnorm=True (issue 26, item 2): BatchNormalization with the moments of the GLOBAL
batch on every backend, so 2 replicas (mirrored, Horovod) train the model one device trains
at the same global batch: weights and moving statistics. Without it they differ (each
replica normalises its own half), which this test also shows, so it can fail."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env

SCRIPT = textwrap.dedent('''
    import sys, distbatch
    b, sync, out = sys.argv[1], sys.argv[2] == "sync", sys.argv[3]
    backend = "horovod" if b == "horovod" else distbatch.create_backend(
        b, cpu_replicas=2 if b == "mirrored" else None)[0]
    import numpy as np, keras
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32") * 3 + 1; y = (x[:, 0] > 1).astype("int64")
    mk = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                                   keras.layers.ReLU(), keras.layers.Dense(2)])
    res = distbatch.fit(model_fn=mk, optimizer_fn=lambda: keras.optimizers.SGD(0.1), data=(x, y),
                        global_batch_size=64, steps=12, seed=1, backend=backend, sync_batchnorm=sync,
                        shuffle_buffer=512)
    rank = 0
    if b == "horovod":
        import horovod.tensorflow as hvd
        rank = hvd.rank()
    np.savez(f"{out}/{b}-{sys.argv[2]}-{rank}.npz", *res.model.get_weights())
''')


def _run(tmp_path, backend, sync):
    (tmp_path / "bn.py").write_text(SCRIPT)
    cmd = ([str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
           if backend == "horovod" else [])
    proc = subprocess.run([*cmd, sys.executable, str(tmp_path / "bn.py"), backend,
                           "sync" if sync else "local", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    z = np.load(tmp_path / f"{backend}-{'sync' if sync else 'local'}-0.npz")
    return [z[k] for k in z.files]


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "mirrored",
    pytest.param("horovod", marks=pytest.mark.skipif(
        shutil.which("horovodrun", path=str(VENV_BIN)) is None, reason="no horovodrun")),
])
def test_sync_batchnorm_equals_one_device(tmp_path, backend):
    one = _run(tmp_path, "single", True)
    synced = _run(tmp_path, backend, True)
    local = _run(tmp_path, backend, False)
    # weights, gamma/beta and the moving mean and variance (the BatchNorm layer's 4 arrays)
    assert _max_diff(synced, one) < 1e-4
    assert _max_diff(local, one) > 1e-3  # per-replica moments: another model
    if backend == "horovod":
        other = np.load(tmp_path / "horovod-sync-1.npz")
        for a, k in zip(synced, other.files):
            np.testing.assert_array_equal(a, other[k])
