"""What distbatch.fit returns is a plain Keras model, whatever backend trained it: after a
mirrored run (2 logical CPUs) result.model recompiles with another optimizer and loss,
evaluates to the numbers distbatch.evaluate gives, trains on with Keras's own fit, and
saves and loads."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import cli_env

SCRIPT = textwrap.dedent('''
    import json, sys
    import distbatch
    backend, _ = distbatch.create_backend("mirrored", cpu_replicas=2)
    import numpy as np, keras
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    res = distbatch.fit(model_fn=lambda: keras.Sequential([keras.Input((12,)),
                                                          keras.layers.Dense(16, activation="tanh"),
                                                          keras.layers.Dense(2)]),
                        optimizer_fn=lambda: keras.optimizers.SGD(0.1), data=(x, y),
                        global_batch_size=32, epochs=1, backend=backend)
    ours = distbatch.evaluate(res.model, (x, y), global_batch_size=32, backend=backend)
    model = res.model
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    keras_eval = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(before, model.get_weights()))
    path = sys.argv[1]
    model.save(path)
    again = keras.models.load_model(path).evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    after = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    print("RESULT", json.dumps({"ours": ours, "keras": keras_eval, "moved": moved,
                                "loss": history["loss"][0], "after": after, "again": again}))
''')


@pytest.mark.slow
def test_result_model_after_mirrored_recompiles_trains_and_saves(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "m.keras")],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT "):])
    assert r["keras"]["loss"] == pytest.approx(r["ours"]["loss"], abs=1e-5)
    assert r["keras"]["accuracy"] == pytest.approx(r["ours"]["accuracy"], abs=1e-6)
    assert r["moved"] > 1e-4 and r["loss"] == r["loss"]  # Keras fit trained it on (finite loss)
    assert r["again"]["loss"] == pytest.approx(r["after"]["loss"], abs=1e-6)
