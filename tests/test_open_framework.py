"""Issue 13: the user's own data pipeline, loss, metrics, sample weights, callbacks and a
compiled model.keras, through distbatch.fit (one process, single backend; the
multi-backend equivalence is in test_user_script.py)."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest


def _regression_data(n=300, seed=0, d=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)).astype(np.float32)
    y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
    return x, y


def _reg_model(d=6):
    import keras
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(1)])


def _fit(**kw):
    import keras

    import distbatch
    x, y = _regression_data()
    args = dict(model_fn=_reg_model, optimizer_fn=lambda: keras.optimizers.SGD(0.05),
                data=(x[:256], y[:256]), validation_data=(x[256:], y[256:]), loss="mse",
                metrics=["mae"], global_batch_size=32, epochs=3, backend="single", seed=3)
    args.update(kw)
    return distbatch.fit(**args)


def test_regression_history_is_a_dict_of_lists_and_val_metrics_are_exact():
    import keras
    x, y = _regression_data()
    r = _fit(metrics=["mae", keras.metrics.RootMeanSquaredError(name="rmse")])
    h = r.history
    for key in ("loss", "mae", "rmse", "val_loss", "val_mae", "val_rmse", "lr", "step", "epoch"):
        assert len(h[key]) == 3, key
    assert h["step"] == [8, 16, 24]
    # The reported validation metrics are those of the returned model on all 44 examples
    # (the last eval batch is padded and masked).
    pred = r.model.predict(x[256:], verbose=0)
    assert r.metrics["val_mae"] == pytest.approx(float(np.mean(np.abs(pred - y[256:]))), rel=1e-5)
    assert r.metrics["val_rmse"] == pytest.approx(float(np.sqrt(np.mean((pred - y[256:]) ** 2))), rel=1e-5)
    assert r.metrics["val_loss"] == pytest.approx(float(np.mean((pred - y[256:]) ** 2)), rel=1e-5)
    assert h["val_mae"][-1] == r.metrics["val_mae"]
    assert h["loss"][-1] < h["loss"][0]


def test_keras_loss_object_with_default_reduction_is_taken_per_example():
    import keras
    a = _fit(loss=keras.losses.MeanSquaredError())            # reduction sum_over_batch_size
    b = _fit(loss=keras.losses.MeanSquaredError(reduction="sum"))
    c = _fit(loss="mse")
    for r in (b, c):
        assert r.history["loss"] == pytest.approx(a.history["loss"], rel=1e-6)
        for u, v in zip(r.model.get_weights(), a.model.get_weights()):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_sample_weights_scale_the_loss():
    """Weights of 2 on every example equal doubling the SGD learning rate; weights of 0 on
    half of the examples make their labels irrelevant."""
    import keras
    x, y = _regression_data()
    xt, yt = x[:256], y[:256]
    twice = _fit(data=(xt, yt, np.full(256, 2.0, np.float32)))
    lr2 = _fit(optimizer_fn=lambda: keras.optimizers.SGD(0.1))
    for u, v in zip(twice.model.get_weights(), lr2.model.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    w = np.tile([1.0, 0.0], 128).astype(np.float32)
    y_noise = yt.copy()
    y_noise[1::2] += 100.0
    masked = _fit(data=(xt, y_noise, w))
    clean = _fit(data=(xt, yt, w))
    for u, v in zip(masked.model.get_weights(), clean.model.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    plain = _fit(data=(xt, y_noise))
    assert not np.allclose(plain.model.get_weights()[0], clean.model.get_weights()[0])


def test_single_example_tf_data_dataset_and_dataset_fn():
    import tensorflow as tf
    x, y = _regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x[:256], y[:256]))
    # seed 0: TensorFlow's own Dataset.shuffle fails with a tensor seed when the global seed is 0
    r = _fit(data=ds, validation_data=tf.data.Dataset.from_tensor_slices((x[256:], y[256:])),
             seed=0)
    assert r.history["step"] == [8, 16, 24]
    pred = r.model.predict(x[256:], verbose=0)
    assert r.metrics["val_mae"] == pytest.approx(float(np.mean(np.abs(pred - y[256:]))), rel=1e-5)
    seen = []

    def dataset_fn(ctx):
        seen.append(ctx.get_per_replica_batch_size(32))
        return tf.data.Dataset.from_tensor_slices((x[:256], y[:256])).batch(
            ctx.get_per_replica_batch_size(32), drop_remainder=True)
    r2 = _fit(data=dataset_fn)
    assert seen and seen[0] == 32 and r2.metrics["steps"] == 24
    # No shuffle in either: the dataset_fn run equals arrays in their own order.
    assert r2.history["loss"][-1] < r2.history["loss"][0]


def test_single_example_dataset_is_split_exactly_once_per_epoch_across_replicas():
    import tensorflow as tf

    from distbatch.data.inputs import DatasetSource
    from distbatch.training.plan import BatchPlan
    ids = np.arange(100, dtype=np.int64)
    src = DatasetSource(tf.data.Dataset.from_tensor_slices((ids.astype(np.float32), ids)),
                        shuffle_buffer=50)
    plan = BatchPlan.derive(global_batch_size=24, replicas=4, accumulation_steps=2,
                            num_train_examples=src.num_examples(2))
    S = plan.steps_per_epoch  # 4 steps, 96 of 100 examples per epoch
    per_epoch = [[], []]
    for w in range(2):
        ds = src.train_dataset(plan, seed=7, worker_index=w, num_workers=2, local_replicas=2,
                               total_steps=2 * S)
        batches = [b[1].numpy() for b in ds]
        assert len(batches) == 2 * S * 2 and all(len(b) == 6 for b in batches)
        for e in range(2):
            per_epoch[e] += [int(i) for b in batches[e * S * 2:(e + 1) * S * 2] for i in b]
    for e in range(2):
        assert len(per_epoch[e]) == 96 == len(set(per_epoch[e]))
    assert per_epoch[0] != per_epoch[1]  # a new shuffle each epoch
    ev, n = src.eval_dataset(plan, worker_index=1, num_workers=2, local_replicas=2)
    got = [(int(i), float(m)) for b in ev for i, m in zip(b[1].numpy(), b[3].numpy())]
    assert len(got) == 2 * n * (len(got) // (2 * n))


def test_multi_output_model_with_a_loss_and_metrics_per_output():
    import keras

    import distbatch
    x, y = _regression_data()
    labels = (y[:, 0] > 0).astype(np.int32)

    def model_fn():
        inp = keras.Input((6,), name="features")
        h = keras.layers.Dense(16, activation="relu")(inp)
        return keras.Model(inp, {"value": keras.layers.Dense(1, name="value")(h),
                                 "sign": keras.layers.Dense(2, name="sign")(h)})

    r = distbatch.fit(model_fn=model_fn, optimizer_fn=lambda: keras.optimizers.Adam(1e-2),
                      data=({"features": x[:256]}, {"value": y[:256], "sign": labels[:256]}),
                      validation_data=({"features": x[256:]}, {"value": y[256:], "sign": labels[256:]}),
                      loss={"value": "mse",
                            "sign": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                      metrics={"value": ["mae"], "sign": ["accuracy"]},
                      global_batch_size=32, epochs=4, backend="single")
    assert {"value_mae", "sign_accuracy", "val_value_mae", "val_sign_accuracy"} <= set(r.history)
    pred = r.model.predict({"features": x[256:]}, verbose=0)
    acc = float(np.mean(pred["sign"].argmax(-1) == labels[256:]))
    assert r.metrics["val_sign_accuracy"] == pytest.approx(acc)
    assert r.metrics["val_value_mae"] == pytest.approx(
        float(np.mean(np.abs(pred["value"] - y[256:]))), rel=1e-5)


class Recorder:
    def __new__(cls):
        import keras

        class _Recorder(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.calls = []

            def on_train_begin(self, logs=None):
                self.calls.append(("train_begin",))

            def on_epoch_begin(self, epoch, logs=None):
                self.calls.append(("epoch_begin", epoch))

            def on_epoch_end(self, epoch, logs=None):
                self.calls.append(("epoch_end", epoch, dict(logs)))

            def on_train_batch_end(self, batch, logs=None):
                self.calls.append(("batch_end", batch, dict(logs)))

            def on_train_end(self, logs=None):
                self.calls.append(("train_end",))
        return _Recorder()


def test_custom_callback_sees_the_keras_protocol_with_global_logs():
    rec = Recorder()
    r = _fit(callbacks=[rec], log_every=4)
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "train_begin" and kinds[-1] == "train_end"
    ends = [c for c in rec.calls if c[0] == "epoch_end"]
    assert [c[1] for c in ends] == [0, 1, 2]
    assert [c[1] for c in rec.calls if c[0] == "epoch_begin"] == [0, 1, 2]
    for c, i in zip(ends, range(3)):
        assert c[2]["val_mae"] == r.history["val_mae"][i] and c[2]["loss"] == r.history["loss"][i]
        assert c[2]["lr"] == pytest.approx(0.05)
    batches = [c[1] for c in rec.calls if c[0] == "batch_end"]
    assert batches == [3, 7, 11, 15, 19, 23]  # every log window (4 steps), 0-based step index


def test_stop_training_from_a_callback_ends_the_run():
    import keras

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True
    r = _fit(callbacks=[StopAfterTwo()], epochs=6)
    assert r.history["step"] == [8, 16] and r.metrics["steps"] == 16


def test_keras_early_stopping_model_checkpoint_csv_logger_tensorboard(tmp_path):
    import keras
    import tensorflow as tf
    es = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True,
                                       min_delta=10.0)   # nothing improves by 10: stops after 2
    mc = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch}.keras"))
    best = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_mae",
                                           save_best_only=True)  # mode from the metric: min
    log = str(tmp_path / "log.csv")
    tb_dir = str(tmp_path / "tb")
    r = _fit(callbacks=[es, mc, best, keras.callbacks.CSVLogger(log),
                        keras.callbacks.TensorBoard(tb_dir, write_graph=False)], epochs=6)
    assert r.history["step"] == [8, 16]
    assert es.stopped_epoch == 1
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert float(rows[1]["val_mae"]) == pytest.approx(r.history["val_mae"][1])
    assert sorted(os.listdir(tmp_path)) == ["best.keras", "ckpt-1.keras", "ckpt-2.keras",
                                            "log.csv", "tb"]
    assert best.best == pytest.approx(min(r.history["val_mae"]))
    first = keras.models.load_model(str(tmp_path / "ckpt-1.keras"))
    # restore_best_weights: the returned model has the first evaluation's weights
    for u, v in zip(first.get_weights(), r.model.get_weights()):
        np.testing.assert_allclose(u, v)
    tags = set()
    for root, _, files in os.walk(tb_dir):
        for name in files:
            for ev in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags |= {v.tag for v in ev.summary.value}
    assert {"epoch_loss", "epoch_mae"} <= tags


def test_terminate_on_nan_and_the_diverged_step():
    import keras
    term = keras.callbacks.TerminateOnNaN()
    rec = Recorder()
    x, y = _regression_data()
    r = _fit(optimizer_fn=lambda: keras.optimizers.SGD(50.0), data=(x[:256], y[:256] * 1e3),
             callbacks=[term, rec], epochs=6, steps_per_execution=5)
    step = r.metrics["diverged_step"]
    assert r.metrics["diverged"] and step is not None and step < 48
    nan_batches = [c for c in rec.calls if c[0] == "batch_end" and not np.isfinite(c[2]["loss"])]
    assert [c[1] for c in nan_batches] == [step - 1]
    assert r.model.stop_training


def test_saved_model_is_compiled_and_load_then_fit_continues(tmp_path):
    import keras

    import distbatch
    x, y = _regression_data()
    recipe = distbatch.Recipe(optimizer="momentum", base_lr=0.05, base_batch_size=32,
                              scaling="linear", warmup="gradual", warmup_epochs=1, decay="cosine")
    r = _fit(optimizer_fn=None, recipe=recipe, metrics=["mae"])
    path = str(tmp_path / "model.keras")
    r.model.save(path)
    loaded = distbatch.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 24
    assert isinstance(loaded.optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    assert loaded.loss is not None
    before = loaded.evaluate(x[256:], y[256:], verbose=0, return_dict=True)
    assert before["mae"] == pytest.approx(r.metrics["val_mae"], rel=1e-4)
    hist = loaded.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 32
    assert "mae" in hist.history


def test_bad_arguments_name_the_parameter():
    import keras
    with pytest.raises(ValueError, match="exactly one of optimizer_fn and recipe"):
        _fit(recipe=object())
    with pytest.raises(TypeError, match="global_batch_size must be an int"):
        _fit(global_batch_size=32.0)
    with pytest.raises(ValueError, match="loss: unknown Keras loss 'msee'"):
        _fit(loss="msee")
    with pytest.raises(ValueError, match="metrics: duplicate names"):
        _fit(metrics=["mae", keras.metrics.MeanAbsoluteError(name="mae")])
    with pytest.raises(ValueError, match="^data: dataset path not found: 'train.csv'"):
        _fit(data="train.csv")  # a string is a dataset spec, as `distbatch train --dataset` takes
    with pytest.raises(TypeError, match="^data is required"):
        _fit(data=None)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['evals_per_epok'\\]"):
        _fit(evals_per_epok=2)
    with pytest.raises(ValueError, match="epochs must be a finite number > 0"):
        _fit(epochs=0)
    import tensorflow as tf
    with pytest.raises(ValueError, match=r"data: the dataset is batched \(\.batch\(8\) in its chain\)"):
        _fit(data=tf.data.Dataset.from_tensor_slices(_regression_data()).batch(8))


def test_in_memory_arrays_too_large_for_a_graph_constant_point_to_streaming():
    from distbatch.data.inputs import ArraySource
    from distbatch.errors import UsageError
    x = np.zeros((1700, 1024, 1024), np.uint8)   # 1.7 GB of address space, never touched
    with pytest.raises(UsageError, match=r"data is 1\.7 GB.*distbatch\.data\.files"):
        ArraySource(x, np.zeros(1700, np.int32))


_MIRRORED_METRICS = r'''
import json, sys
import numpy as np
import keras
import distbatch
from distbatch.backends import create_backend
rng = np.random.default_rng(0)
x = rng.normal(size=(360, 5)).astype(np.float32)
y = (x[:, 0] + 0.5 * rng.normal(size=360) > 0).astype(np.float32)[:, None]
w = rng.uniform(0.5, 2.0, size=360).astype(np.float32)
mirrored, _ = create_backend("mirrored", cpu_replicas=2)
out = {}
for name, backend in (("mirrored", mirrored), ("single", create_backend("single")[0])):
    r = distbatch.fit(
        model_fn=lambda: keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, "tanh"),
                                           keras.layers.Dense(1, "sigmoid")]),
        optimizer_fn=lambda: keras.optimizers.SGD(0.1), data=(x[:256], y[:256], w[:256]),
        validation_data=(x[256:], y[256:]), loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.Precision(name="precision"),
                 "accuracy"], global_batch_size=32, epochs=3, backend=backend, seed=5)
    out[name] = {"history": r.history, "weights": [a.tolist() for a in r.model.get_weights()]}
print("RESULT", json.dumps(out))
'''


@pytest.mark.slow
def test_metric_states_are_summed_across_replicas_exactly(tmp_path):
    """AUC and precision of 2 mirrored replicas equal one device's at the same global batch
    (averaging the replicas' AUCs would not)."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_METRICS], capture_output=True, text=True,
                          timeout=600, cwd=str(tmp_path),
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    m, s = out["mirrored"]["history"], out["single"]["history"]
    for key in ("loss", "auc", "precision", "accuracy", "val_loss", "val_auc", "val_precision"):
        assert m[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    assert 0.5 < s["val_auc"][-1] < 1.0
    for a, b in zip(out["mirrored"]["weights"], out["single"]["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_evaluation_covers_the_validation_set_once_from_one_iterator():
    """The validation iterator is made once per run and repeats its batches: each of the 12
    evaluations must see exactly one pass (a dataset_fn with 3 batches, the last one short;
    an array set with a padded last batch), so the last evaluation is that of the final
    weights on all examples, and a callback's own evaluation agrees at every epoch."""
    import keras
    import tensorflow as tf
    x, y = _regression_data()
    xv, yv = x[256:], y[256:]   # 44 examples

    def val_fn(ctx):
        return tf.data.Dataset.from_tensor_slices((xv, yv)).batch(16)   # 16, 16, 12

    seen = []

    class Check(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(xv, verbose=0)
            seen.append((logs["val_mae"], float(np.mean(np.abs(pred - yv)))))

    for val in (val_fn, (xv, yv)):
        seen.clear()
        r = _fit(validation_data=val, evals_per_epoch=4, callbacks=[Check()])
        assert len(r.history["val_mae"]) == len(seen) == 12
        for got, want in seen:
            assert got == pytest.approx(want, rel=1e-5)
        assert r.history["val_mae"][0] != pytest.approx(r.history["val_mae"][-1], rel=1e-3)
