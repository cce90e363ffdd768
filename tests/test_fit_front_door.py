"""distbatch.fit's front door (issue 25, item 4): every argument error a new user made
raises ValueError or TypeError naming the parameter, the value and what was expected, before
any step runs; never a TensorFlow "in user code" error from inside the compiled step, and
never a silent run on nonsense (regression targets cast to class 0, NaN ending "diverged").
Each case also runs in the fast tier: one device, in this process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import cli_env


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def _fit(arrays, **changes):
    import keras

    import distbatch
    x, y = arrays
    args = dict(model_fn=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]),
                optimizer_fn=lambda: keras.optimizers.SGD(0.1), data=(x, y), global_batch_size=32,
                epochs=1, backend="single", verbose=False)
    args.update(changes)
    return distbatch.fit(**args)


def _cases(arrays):
    import keras
    import tensorflow as tf
    x, y = arrays
    nan = x.copy()
    nan[5, 3] = np.nan
    dense = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])  # noqa: E731
    return [
        ("labels outside the classes", dict(data=(x, y * 7)), ValueError,
         "data: labels must be class indices in [0, 1] for a model with 2 outputs, got labels from 0 to 7"),
        ("regression targets, default loss", dict(data=(x, x[:, 0] * 0.37)), ValueError,
         "data: y holds non-integer values (e.g. "),
        ("dataset batched with drop_remainder",
         dict(data=tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)), ValueError,
         "data: the dataset is batched (.batch(32) in its chain); pass single examples"),
        ("generator of unknown shapes",
         dict(data=tf.data.Dataset.from_generator(lambda: iter([(x[0], y[0])]),
                                                  output_types=(tf.float32, tf.int64))), ValueError,
         "data: the dataset's x has unknown shape (<unknown>); give the shapes"),
        ("one-hot labels, default loss", dict(data=(x, np.eye(2, dtype="float32")[y])), ValueError,
         "data: y has shape (2,) per example, but the default loss takes one class index per "
         "example (one-hot labels: pass loss=keras.losses.CategoricalCrossentropy(from_logits=True)"),
        ("validation data of another width", dict(validation_data=(x[:, :4], y)), ValueError,
         "validation_data: x has shape (4,) per example, but data has (8,)"),
        ("validation labels outside the classes", dict(validation_data=(x, y + 1)), ValueError,
         "validation_data: labels must be class indices in [0, 1] for a model with 2 outputs, got "
         "labels from 1 to 2"),
        ("a 2-D output per example",
         dict(model_fn=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(6),
                                                 keras.layers.Reshape((3, 2))])), ValueError,
         "model_fn: the model's output has shape (3, 2) per example"),
        ("data=None", dict(data=None), TypeError, "data is required"),
        ("optimizer_fn returning a string", dict(optimizer_fn=lambda: "sgd"), TypeError,
         "optimizer_fn must return a keras optimizer (e.g. keras.optimizers.SGD(0.1)), got str 'sgd'"),
        ("recipe='sgd'", dict(optimizer_fn=None, recipe="sgd"), TypeError,
         "recipe must be a distbatch.Recipe"),
        ("a built model", dict(model_fn=dense()), TypeError,
         "model_fn must be a function returning a NEW keras.Model"),
        ("evals_per_epoch=0", dict(evals_per_epoch=0), ValueError,
         "evals_per_epoch must be a whole number >= 1, got 0"),
        ("log_every=0", dict(log_every=0), ValueError, "log_every must be a whole number >= 1, got 0"),
        ("checkpoint_every=-5", dict(checkpoint_every=-5), ValueError,
         "checkpoint_every must be a whole number >= 0, got -5"),
        ("target_accuracy=50", dict(target_accuracy=50), ValueError,
         "target_accuracy must be a finite number in [0, 1], got 50"),
        ("negative sample weights", dict(data=(x, y, -np.ones(256))), ValueError,
         "data: sample_weight must be finite and >= 0, got -1.0 for example 0"),
        ("NaN in x", dict(data=(nan, y)), ValueError,
         "data: x holds NaN or infinite values (the first in example 5)"),
        ("complex x", dict(data=(x + 1j, y)), TypeError, "data: x holds complex numbers"),
        ("stall_timeout=0", dict(stall_timeout=0), ValueError,
         "stall_timeout must be a finite number > 0 of seconds, got 0"),
    ]


def test_every_bad_argument_is_named_before_a_step(arrays, monkeypatch):
    """No case reaches the step: make_train_step would raise if one did."""
    from distbatch.training import trainer
    def no_step(*a, **k):
        raise AssertionError("a step was built")
    monkeypatch.setattr(trainer, "make_train_step", no_step)
    failures = []
    for label, changes, kind, text in _cases(arrays):
        try:
            _fit(arrays, **changes)
            failures.append(f"{label}: accepted")
        except AssertionError as e:
            failures.append(f"{label}: {e}")
        except Exception as e:  # noqa: BLE001 - the type is checked next
            if not isinstance(e, kind) or text not in str(e) or "\n" in str(e):
                failures.append(f"{label}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_good_arguments_still_train(arrays):
    import keras
    x, y = arrays
    result = _fit(arrays, validation_data=(x[:64], y[:64]))
    assert result.metrics["steps"] == 8
    reg = _fit(arrays, data=(x, x[:, :1] * 0.37), loss="mse", metrics=["mae"],
               model_fn=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]))
    assert np.isfinite(reg.history["loss"][-1])


BEFORE_BACKEND = textwrap.dedent('''
    import sys, numpy as np, tensorflow as tf, keras, distbatch
    tf.data.Dataset.range(4)  # the natural order: the input pipeline first
    try:
        distbatch.fit(model_fn=lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                      optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                      data=(np.zeros((8, 2), "float32"), np.zeros(8, "int64")), global_batch_size=4,
                      epochs=1, backend=sys.argv[1], cpu_replicas=2 if sys.argv[1] == "mirrored" else None)
    except ValueError as e:
        print("ValueError:", e)
''')


@pytest.mark.slow
@pytest.mark.parametrize("backend,expected", [
    ("mirrored", "ValueError: cpu_replicas 2 needs 2 logical CPU devices, but TensorFlow had already "
                 "started with 1 (any Keras, tf.data or TensorFlow call starts it); create the backend "
                 "first, at the top of the program: backend, _ = distbatch.create_backend(\"mirrored\", "
                 "cpu_replicas=2), then fit(..., backend=backend)"),
    ("multiworker", "ValueError: backend multiworker must be created before TensorFlow starts"),
])
def test_backend_after_tensorflow_started_says_how(tmp_path, backend, expected):
    script = tmp_path / "script.py"
    script.write_text(BEFORE_BACKEND)
    env = cli_env({"TF_CONFIG": '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
                                '"task": {"type": "worker", "index": 0}}'} if backend == "multiworker" else None)
    if backend != "multiworker":
        env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--cpu-replicas" not in proc.stdout


def test_evaluate_equals_keras_evaluate_on_every_example(arrays):
    """distbatch.evaluate (fit's validation code) over 203 examples at global batch 32 (the
    last batch short): the numbers Keras gives for the same model, with the compiled loss and
    metrics, an AUC included (a stateful metric, exact over all examples)."""
    import keras

    import distbatch
    x, y = arrays
    # a binary model: one logit, labels 0/1 (binary accuracy and AUC from the logit)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    model = _fit(arrays, data=(x, y.astype("float32")), loss=bce, metrics=["accuracy"],
                 model_fn=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])).model
    mine = distbatch.evaluate(model, (x[:203], y[:203].astype("float32")), global_batch_size=32,
                              backend="single", loss=bce,
                              metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="acc"),
                                       keras.metrics.AUC(from_logits=True, name="auc")])
    model.compile(loss=bce, metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="acc"),
                                     keras.metrics.AUC(from_logits=True, name="auc")])
    ref = model.evaluate(x[:203], y[:203].astype("float32"), batch_size=203, verbose=0, return_dict=True)
    for k in ("loss", "acc", "auc"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-5), k


def test_evaluate_uses_the_compiled_loss_and_refuses_bad_arguments(arrays):
    import keras

    import distbatch
    x, y = arrays
    model = _fit(arrays).model  # compiled by fit: sparse cross-entropy, accuracy
    mine = distbatch.evaluate(model, (x[:100], y[:100]), global_batch_size=16, backend="single")
    logits = model.predict(x[:100], verbose=0)
    loss = keras.losses.sparse_categorical_crossentropy(y[:100], logits, from_logits=True)
    assert mine["loss"] == pytest.approx(float(np.mean(loss)), abs=1e-5)
    assert mine["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y[:100])))
    with pytest.raises(TypeError, match="model must be a keras.Model, got function"):
        distbatch.evaluate(lambda: model, (x, y), global_batch_size=16, backend="single")
    with pytest.raises(ValueError, match="data: labels must be class indices in \\[0, 1\\]"):
        distbatch.evaluate(model, (x, y + 5), global_batch_size=16, backend="single")


def test_predict_equals_keras_predict_in_order(arrays):
    """distbatch.predict over 203 examples at global batch 32 (the last batch short): Keras's
    model.predict, row for row; two outputs come back as the model's structure."""
    import keras

    import distbatch
    x, _ = arrays
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    np.testing.assert_allclose(distbatch.predict(model, x[:203], global_batch_size=32, backend="single"),
                               model.predict(x[:203], verbose=0), atol=1e-6)
    inp = keras.Input((8,))
    two = keras.Model(inp, {"a": keras.layers.Dense(2)(inp), "b": keras.layers.Dense(1)(inp)})
    mine, ref = (distbatch.predict(two, x[:50], global_batch_size=16, backend="single"),
                 two.predict(x[:50], verbose=0))
    assert set(mine) == {"a", "b"}
    for k in mine:
        np.testing.assert_allclose(mine[k], ref[k], atol=1e-6)
    with pytest.raises(ValueError, match="x: x holds NaN"):
        distbatch.predict(model, np.full((4, 8), np.nan), global_batch_size=2, backend="single")
