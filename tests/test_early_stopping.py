"""Early stopping: the stop rule, restored weights, and the same stop step on every rank.

The settings overfit on purpose (256 training examples, constant lr, no warmup):
validation loss bottoms out after ~2 epochs, so a patience of 3 evaluations stops
the run long before its 60 epochs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env, load_summary, run_cli

COMMON = ["--dataset", "mnist1d", "--train-size", "256", "--val-size", "200",
          "--global-batch-size", "32", "--epochs", "60", "--base-lr", "0.05", "--warmup", "none",
          "--decay", "constant", "--early-stopping-metric", "val_loss",
          "--early-stopping-patience", "3"]
PATIENCE = 3


def numpy_val_loss(model, data) -> float:
    """Mean sparse cross-entropy of the model's logits on the validation set, in NumPy."""
    logits = np.asarray(model.predict(data.x_val, verbose=0, batch_size=256), dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(data.y_val)), data.y_val].mean())


def check_summary(s: dict) -> None:
    """The stop rule, in closed form, on a finished summary."""
    hist = s["history"]
    spe = s["steps_per_epoch"]
    assert s["stopped_early"] is True
    assert s["steps"] < s["total_steps"]
    best = min(hist, key=lambda r: r["val_loss"])
    assert s["best_step"] == best["step"]
    assert s["restored_value"] == pytest.approx(best["val_loss"], abs=0)
    # No later evaluation improved, so it stopped exactly `patience` evaluations after the best.
    assert s["steps"] == s["best_step"] + PATIENCE * spe
    assert [r["step"] for r in hist] == list(range(spe, s["steps"] + 1, spe))
    assert s["best_epoch"] == pytest.approx(s["best_step"] / spe)
    assert s["stopped_epoch"] == pytest.approx(s["steps"] / spe)
    # Restored weights: the summary's final val_loss is the best one; the running train
    # metrics are those of the same evaluation point, and train_loss is an exact evaluation
    # of the restored weights on the training subset (not the last point's weights).
    assert s["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert s["train_loss_running"] == pytest.approx(best["train_loss"], rel=1e-9)


def check_saved_model(out_dir, s: dict) -> None:
    import keras

    from distbatch.data.datasets import load_dataset
    data = load_dataset("mnist1d", seed=0, train_size=256, val_size=200)
    model = keras.models.load_model(os.path.join(out_dir, "model.keras"), compile=False)
    assert numpy_val_loss(model, data) == pytest.approx(s["restored_value"], rel=1e-4)
    # train_loss is an exact evaluation of the restored weights on the first n training examples.
    n = s["train_eval_examples"]
    logits = model.predict(data.x_train[:n], verbose=0)
    train_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(
        data.y_train[:n], logits, from_logits=True)))
    assert train_loss == pytest.approx(s["train_loss"], rel=1e-4)


def test_stop_rule_in_process_single(dataset_cache):
    """Fast: the Trainer on one device, min_delta so large that only the first eval counts."""
    import keras

    from distbatch.backends.single import SingleBackend
    from distbatch.data.datasets import load_dataset
    from distbatch.training.plan import BatchPlan
    from distbatch.training.trainer import LoopOptions, Trainer

    data = load_dataset("mnist1d", seed=0, train_size=256, val_size=200)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
    plan = BatchPlan.derive(global_batch_size=64, replicas=1, num_train_examples=256)
    opts = LoopOptions(total_steps=400, evals_per_epoch=2, early_stopping_metric="val_loss",
                       early_stopping_patience=2, min_delta=10.0, verbose=False)
    res = Trainer(SingleBackend(), model, optimizer, plan, data, opts).run()
    m = res.metrics
    eval_every = plan.steps_per_epoch // 2  # 4 steps/epoch, 2 evals/epoch -> every 2 steps
    assert m["best_step"] == eval_every            # nothing beats the first eval by 10
    assert m["steps"] == eval_every * (1 + 2)      # first eval + patience evals
    assert m["stopped_early"] is True
    assert m["restored_value"] == res.history[0]["val_loss"]
    # The model now holds the first evaluation's weights.
    assert numpy_val_loss(model, data) == pytest.approx(m["restored_value"], rel=1e-4)
    assert m["val_loss"] == pytest.approx(m["restored_value"], rel=1e-6)


@pytest.mark.slow
def test_mirrored_two_replicas_stops_and_restores_best(tmp_path, dataset_cache):
    out = tmp_path / "mirrored"
    run_cli(["train", "--backend", "mirrored", "--cpu-replicas", "2", *COMMON, "--out", str(out)])
    s = load_summary(out)
    assert s["replicas"] == 2
    check_summary(s)
    check_saved_model(out, s)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("horovodrun", path=str(VENV_BIN)) is None,
                    reason="horovodrun not installed")
def test_horovod_every_rank_stops_at_the_same_step(tmp_path, dataset_cache):
    out, reports = tmp_path / "hvd", tmp_path / "ranks"
    cmd = [str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
           "distbatch", "train", "--backend", "horovod", *COMMON, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=cli_env({"DISTBATCH_RANK_REPORT": str(reports)}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = load_summary(out)
    assert s["replicas"] == 2 and s["backend"] == "horovod"
    check_summary(s)
    check_saved_model(out, s)
    ranks = [json.loads((reports / f"rank{i}.json").read_text()) for i in range(2)]
    for r in ranks:  # every rank took the same decision at the same step, and exited cleanly
        assert r["steps"] == s["steps"]
        assert r["best_step"] == s["best_step"]
        assert r["stopped_early"] is True
        assert r["restored_value"] == pytest.approx(s["restored_value"], rel=1e-7)
