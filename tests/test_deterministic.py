"""deterministic=True / --deterministic (issue 26, item 5): op determinism on top of the seeds;
two runs of the same configuration on the same backend end bit-identical, Dropout and
BatchNorm included."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import cli_env, load_weights, run_cli

SCRIPT = textwrap.dedent('''
    import sys, distbatch
    backend = distbatch.create_backend("mirrored", cpu_replicas=2)[0]
    import numpy as np, keras
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int64")
    L = keras.layers
    mk = lambda: keras.Sequential([keras.Input((8,)), L.Dense(32), L.BatchNormalization(), L.ReLU(),
                                   L.Dropout(0.3), L.Dense(2)])
    for run in range(2):
        res = distbatch.fit(model_fn=mk, optimizer_fn=lambda: keras.optimizers.Adam(1e-2), data=(x, y),
                            global_batch_size=64, epochs=3, seed=5, backend=backend, deterministic=True)
        np.savez(f"{sys.argv[1]}/run{run}.npz", *res.model.get_weights())
''')


def test_deterministic_must_be_a_bool():
    import keras

    import distbatch
    with pytest.raises(TypeError, match="deterministic must be True or False, got 'yes'"):
        distbatch.fit(model_fn=lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                      optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                      data=(np.zeros((8, 2), "float32"), np.zeros(8, "int64")), global_batch_size=4,
                      epochs=1, backend="single", deterministic="yes")


@pytest.mark.slow
def test_two_deterministic_runs_on_mirrored_are_bit_identical(tmp_path):
    (tmp_path / "det.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "det.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = np.load(tmp_path / "run0.npz"), np.load(tmp_path / "run1.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_cli_deterministic_runs_are_bit_identical(tmp_path, dataset_cache):
    args = ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "256",
            "--val-size", "64", "--global-batch-size", "32", "--steps", "16", "--deterministic"]
    for name in ("a", "b"):
        run_cli([*args, "--out", str(tmp_path / name)])
    for x, y in zip(load_weights(tmp_path / "a"), load_weights(tmp_path / "b")):
        np.testing.assert_array_equal(x, y)
