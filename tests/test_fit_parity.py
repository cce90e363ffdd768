"""distbatch.fit and `distbatch train` build the same run (distbatch/training/assembly.py):
the same settings end with the same weights, and fit takes everything train takes
(model names, dataset specs, batch schedules, the adaptive batch, mixed precision,
loss weights), checks it before a step runs, and refuses a resume with other settings."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import cli_in_process, load_summary, load_weights, max_weight_diff


def _npz(path, n=320, n_val=64, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(24, 4))
    x = rng.normal(size=(n + n_val, 24)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    np.savez(path, x_train=x[:n] * scale, y_train=y[:n], x_test=x[n:] * scale, y_test=y[n:])
    return str(path)


RECIPE = dict(optimizer="momentum", base_lr=0.05, base_batch_size=32, scaling="linear",
              warmup="gradual", warmup_epochs=1.0, decay="cosine")
RECIPE_FLAGS = ["--optimizer", "momentum", "--base-lr", "0.05", "--base-batch-size", "32",
                "--scaling", "linear", "--warmup", "gradual", "--warmup-epochs", "1",
                "--decay", "cosine"]


@pytest.mark.slow
def test_fit_by_name_equals_cli_train(tmp_path, capfd):
    """fit(model_fn="mlp", data="x.npz", recipe=..., seed=s) and `distbatch train --model mlp
    --dataset x.npz ... --seed s`: the same weights (1e-6) and the same history."""
    import distbatch
    data = _npz(tmp_path / "x.npz")
    proc = cli_in_process(capfd, "train", "--model", "mlp", "--dataset", data, "--global-batch-size",
                          "64", "--epochs", "3", "--seed", "5", "--backend", "single",
                          "--out", tmp_path / "cli", *RECIPE_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = distbatch.fit(model_fn="mlp", data=data, recipe=distbatch.Recipe(**RECIPE), seed=5,
                        global_batch_size=64, epochs=3, backend="single")
    assert max_weight_diff(res.model.get_weights(), load_weights(tmp_path / "cli")) <= 1e-6
    cli = load_summary(tmp_path / "cli")
    assert [h["val_accuracy"] for h in cli["history"]] == pytest.approx(res.history["val_accuracy"],
                                                                       abs=1e-6)
    assert res.metrics["steps"] == cli["steps"] == 15


@pytest.mark.slow
def test_fit_batch_size_schedule_equals_cli(tmp_path, capfd):
    import distbatch
    data = _npz(tmp_path / "x.npz")
    recipe = {**RECIPE, "decay": "constant"}
    flags = [f if f != "cosine" else "constant" for f in RECIPE_FLAGS]
    proc = cli_in_process(capfd, "train", "--model", "mlp", "--dataset", data, "--batch-size-schedule",
                          "0:32,1:64", "--epochs", "2", "--seed", "1", "--backend", "single",
                          "--out", tmp_path / "cli", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = distbatch.fit(model_fn="mlp", data=data, recipe=distbatch.Recipe(**recipe), seed=1,
                        batch_size_schedule=[(0, 32), (1, 64)], epochs=2, backend="single")
    assert [(s["global_batch_size"], s["steps"]) for s in res.metrics["segments"]] == [(32, 10), (64, 5)]
    assert max_weight_diff(res.model.get_weights(), load_weights(tmp_path / "cli")) <= 1e-6


@pytest.mark.slow
def test_fit_adaptive_batch_with_callbacks(tmp_path):
    """global_batch_size="auto": candidates from the base batch, AdaScale lr, a Keras callback
    sees every evaluation with global metrics."""
    import keras

    import distbatch
    data = _npz(tmp_path / "x.npz", n=512)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs))

    res = distbatch.fit(model_fn="mlp", data=data, backend="single", epochs=2,
                        recipe=distbatch.Recipe(optimizer="momentum", base_lr=0.05,
                                                base_batch_size=32, scaling="adascale",
                                                warmup="none", decay="constant"),
                        global_batch_size="auto", max_global_batch_size=128,
                        callbacks=[Record()])
    batches = [s["global_batch_size"] for s in res.metrics["segments"]]
    assert set(batches) <= {32, 64, 128} and batches[0] == 32
    assert res.metrics["batch_trajectory"][0] == (0, 32) or res.metrics["batch_trajectory"][0] == [0, 32]
    assert len(seen) == len(res.records) and all("val_accuracy" in s for s in seen)
    # The run ends at the step where tau (the sum of the gains) reaches the base budget of
    # 2 epochs x 16 steps; one step adds at most S = 128 / 32 = 4.
    assert 32 <= res.metrics["scale_invariant_steps"] < 32 + 4


def _tiny_model():
    import keras
    return keras.Sequential([keras.Input((24,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(4)])


def _arrays(n=256, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    return x * scale, (np.abs(x[:, :4]).argmax(1)).astype(np.int32)


def test_fit_mixed_precision_bfloat16_and_policy_restored():
    import keras

    import distbatch
    before = keras.mixed_precision.dtype_policy().name
    res = distbatch.fit(model_fn=_tiny_model, data=_arrays(), global_batch_size=64, steps=3,
                        optimizer_fn=lambda: keras.optimizers.SGD(0.1), backend="single",
                        mixed_precision="bfloat16", evals_per_epoch=1)
    assert res.model.layers[0].dtype_policy.name == "mixed_bfloat16"
    assert res.model.layers[0].kernel.dtype == "float32"  # variables stay float32
    assert keras.mixed_precision.dtype_policy().name == before
    assert np.isfinite(res.metrics["train_loss"])


def test_fit_float16_wraps_the_optimizer_in_loss_scaling():
    import keras

    import distbatch
    res = distbatch.fit(model_fn=_tiny_model, data=_arrays(), global_batch_size=64, steps=2,
                        optimizer_fn=lambda: keras.optimizers.SGD(0.1), backend="single",
                        mixed_precision="float16")
    assert isinstance(res.model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_fit_loss_weights_scale_each_outputs_loss():
    """loss_weights=[1, 0.25] trains exactly as a loss that multiplies output 2 by 0.25."""
    import keras

    import distbatch
    x, y = _arrays(seed=3)
    y2 = x[:, :1] * 2.0

    def two_outputs():
        keras.utils.set_random_seed(7)
        inp = keras.Input((24,))
        h = keras.layers.Dense(8, activation="relu")(inp)
        return keras.Model(inp, [keras.layers.Dense(4, name="cls")(h),
                                 keras.layers.Dense(1, name="reg")(h)])

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    common = dict(model_fn=two_outputs, data=(x, (y, y2)), global_batch_size=32, steps=6,
                  optimizer_fn=lambda: keras.optimizers.SGD(0.05), backend="single", seed=2)
    a = distbatch.fit(loss=[ce, "mse"], loss_weights=[1.0, 0.25], **common)
    b = distbatch.fit(loss=[ce, lambda t, p: 0.25 * keras.losses.mean_squared_error(t, p)], **common)
    c = distbatch.fit(loss=[ce, "mse"], **common)
    assert max_weight_diff(a.model.get_weights(), b.model.get_weights()) <= 1e-6
    assert max_weight_diff(a.model.get_weights(), c.model.get_weights()) > 1e-4
    with pytest.raises(ValueError, match=r"loss_weights: unknown outputs \['nope'\]"):
        distbatch.fit(loss=[ce, "mse"], loss_weights={"nope": 1.0}, **common)
    with pytest.raises(ValueError, match="loss_weights: each weight must be a finite number >= 0, got -1"):
        distbatch.fit(loss=[ce, "mse"], loss_weights=[1.0, -1], **common)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(global_batch_size="auto"), ValueError, "global_batch_size='auto' needs max_global_batch_size"),
    (dict(global_batch_size=64, max_global_batch_size=128), ValueError,
     "max_global_batch_size=128 only applies to global_batch_size='auto' or 'ramp', got global_batch_size=64"),
    (dict(global_batch_size=None), TypeError, "global_batch_size is required"),
    (dict(global_batch_size="big"), ValueError, "global_batch_size must be an int, 'auto' or 'ramp', got 'big'"),
    (dict(global_batch_size=None, batch_size_schedule="0:32,x"), ValueError,
     "batch_size_schedule entries must be EPOCH:BATCH, got 'x'"),
    (dict(global_batch_size=None, batch_size_schedule=[(1, 32)]), ValueError,
     "batch_size_schedule must start at epoch 0, got 1"),
    (dict(global_batch_size=64, mixed_precision="fp16"), ValueError,
     "mixed_precision must be one of off, float16, bfloat16 .*got 'fp16'"),
    (dict(global_batch_size=64, model_fn="resnet9000"), ValueError,
     "model_fn: unknown built-in model 'resnet9000'"),
    (dict(global_batch_size=64, train_size=10), ValueError,
     "train_size and val_size apply to data given as a dataset name or path"),
])
def test_fit_new_parameters_are_checked_before_a_step(monkeypatch, kwargs, error, message):
    import keras

    import distbatch
    from distbatch.training import step
    monkeypatch.setattr(step, "make_train_step", lambda *a, **k: pytest.fail("a step was built"))
    args = dict(model_fn=_tiny_model, data=_arrays(), epochs=1, backend="single",
                optimizer_fn=lambda: keras.optimizers.SGD(0.1))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        distbatch.fit(**args)


def test_fit_schedule_with_adascale_is_refused_naming_parameters():
    import distbatch
    from distbatch.errors import ParameterError
    with pytest.raises(ParameterError, match="scaling adascale adapts the lr to a fixed global batch; "
                                             "it does not combine with batch_size_schedule"):
        distbatch.fit(model_fn=_tiny_model, data=_arrays(), epochs=2, backend="single",
                      batch_size_schedule=[(0, 32), (1, 64)],
                      recipe=distbatch.Recipe(base_batch_size=32, scaling="adascale"))


def test_fit_resume_refuses_other_settings_before_training(tmp_path):
    """resume=True compares the run's settings with those in checkpoint_dir: another global
    batch and 100x-scaled data are both refused by name, before any step; the same settings
    resume."""
    import keras

    import distbatch
    from distbatch.errors import ParameterError
    ckpt = str(tmp_path / "ckpt")
    common = dict(model_fn=_tiny_model, optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                  backend="single", checkpoint_dir=ckpt, epochs=2)
    first = distbatch.fit(data=_arrays(), global_batch_size=64, **common)
    assert os.path.isfile(os.path.join(ckpt, "fit_settings.json"))
    with pytest.raises(ParameterError, match=r"^resume=True: global_batch_size is 32 but the run in "
                                             r"'.*ckpt' used 64; resume with the same settings or "
                                             r"another checkpoint_dir$"):
        distbatch.fit(data=_arrays(), global_batch_size=32, resume=True, **common)
    with pytest.raises(ParameterError, match=r"resume=True: data.sample_sha256 is '[0-9a-f]+' but the "
                                             r"run in .* used '[0-9a-f]+'"):
        distbatch.fit(data=_arrays(scale=100.0), global_batch_size=64, resume=True, **common)
    again = distbatch.fit(data=_arrays(), global_batch_size=64, resume=True, **common)
    assert again.metrics["steps"] == first.metrics["steps"]  # nothing left to train
    assert max_weight_diff(again.model.get_weights(), first.model.get_weights()) == 0.0


def test_fit_verbose_prints_the_cli_start_line(capfd):
    import keras

    import distbatch
    capfd.readouterr()
    distbatch.fit(model_fn=_tiny_model, data=_arrays(), global_batch_size=64, steps=2,
                  recipe=distbatch.Recipe(optimizer="momentum", base_lr=0.1, base_batch_size=32,
                                          warmup="none", decay="constant"),
                  backend="single", verbose=True)
    err = capfd.readouterr().err
    assert ("distbatch: single: 1 replica(s) on 1 worker(s), this is worker 0 (requested); global batch 64 = 64 per replica x 1 replicas x 1 "
            "accumulation; 4 steps/epoch, 2 steps; peak lr 0.2, warmup 0 steps") in err, err
    distbatch.fit(model_fn=_tiny_model, data=_arrays(), global_batch_size=64, steps=1,
                  optimizer_fn=lambda: keras.optimizers.SGD(0.1), backend="single")
    assert capfd.readouterr().err.count("distbatch:") == 0  # verbose=False: silent
