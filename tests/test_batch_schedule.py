"""Batch-size schedules (Smith, Kindermans, Le 2017): parsing, segment arithmetic, and a
schedule run that equals the same fixed-batch segments run by hand."""
from __future__ import annotations

import numpy as np
import pytest

from distbatch.training.batch_schedule import (check_schedule_run, parse_batch_schedule, plan_schedule,
                                               schedule_recipe)
from distbatch.errors import ParameterError, UsageError


@pytest.mark.parametrize("text, expected", [
    ("0:64", [(0, 64)]),
    ("0:64,10:128,20:256", [(0, 64), (10, 128), (20, 256)]),
    (" 0:32 , 3.0:64 ,", [(0, 32), (3, 64)]),
    ([(0, 32), (3.0, 64)], [(0, 32), (3, 64)]),   # distbatch.fit's form
])
def test_parse(text, expected):
    assert parse_batch_schedule(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "at least one"),
    ("64", "EPOCH:BATCH, got '64'"),
    ("0:64:2", "EPOCH:BATCH"),
    ("1:64", "must start at epoch 0, got 1"),
    ("0:64,0.5:128", "whole numbers >= 0 .* got 0.5:128"),
    ([(0, 64), (1, 2.5)], r"\(epoch, global batch\) pairs of numbers, got \(1, 2.5\)"),
    (64, "must be 'E0:B0,E1:B1,...' or a list of \\(epoch, global batch\\) pairs, got int 64"),
    ("0:64,10:128,5:256", r"increase strictly, got \[0, 10, 5\]"),
    ("0:0", "batches must be >= 1, got 0"),
])
def test_parse_errors(text, message):
    with pytest.raises(ParameterError, match="^batch_size_schedule .*" + message) as err:
        parse_batch_schedule(text)
    assert str(err.value.for_flags()).startswith("--batch-size-schedule ")


def test_segments_rederive_batch_and_steps():
    s = plan_schedule([(0, 64), (10, 128), (20, 256)], epochs=25, replicas=2,
                      accumulation_steps=2, num_train_examples=1000)
    rows = [(g.start_epoch, g.end_epoch, g.plan.global_batch_size, g.plan.per_replica_batch_size,
             g.plan.steps_per_epoch, g.start_step, g.steps) for g in s.segments]
    assert rows == [(0, 10, 64, 16, 15, 0, 150),      # 1000 // 64 = 15 steps/epoch
                    (10, 20, 128, 32, 7, 150, 70),    # 1000 // 128 = 7
                    (20, 25.0, 256, 64, 3, 220, 15)]  # 1000 // 256 = 3, 5 epochs
    assert s.total_steps == 235
    assert [s.global_step_at_epoch(e) for e in (0, 1, 10, 11, 20, 21, 25)] == [
        0, 15, 150, 157, 220, 223, 235]
    assert s.as_dict()[1]["steps_per_epoch"] == 7


def test_segment_errors():
    with pytest.raises(ParameterError, match=r"epoch 10 is not before the end of training \(epochs 10\)") as err:
        plan_schedule([(0, 64), (10, 128)], epochs=10, replicas=1, num_train_examples=1000)
    assert "(--epochs 10)" in str(err.value.for_flags())
    with pytest.raises(UsageError, match="not divisible by replicas"):
        plan_schedule([(0, 64), (1, 100)], epochs=2, replicas=8, num_train_examples=1000)
    with pytest.raises(UsageError, match="larger than the training set"):
        plan_schedule([(0, 64), (1, 2048)], epochs=2, replicas=1, num_train_examples=1000)


def _config(**kw):
    from distbatch.recipes.recipe import Recipe
    from distbatch.training.config import TrainConfig
    recipe = {k: kw.pop(k) for k in ("decay", "decay_epochs", "warmup", "warmup_epochs") if k in kw}
    base = dict(batch_size_schedule="0:32,2:64", epochs=4.0, out="o")
    base.update(kw)
    return TrainConfig(recipe=Recipe(**recipe), **base)


def _check(config):
    check_schedule_run(config.batch_size_schedule, global_batch_size=config.global_batch_size,
                       steps=config.steps, epochs=config.epochs, resume=config.resume,
                       early_stopping=bool(config.early_stopping_metric))
    return plan_schedule(config.batch_size_schedule, epochs=config.epochs, replicas=1,
                         num_train_examples=256)


def test_flag_interactions():
    s = _check(_config())
    assert s.total_steps == 2 * 8 + 2 * 4
    with pytest.raises(ParameterError, match="needs the length in epochs .* got steps 10") as err:
        _config(steps=10, epochs=None)
    assert "needs the length in --epochs (the batch changes at epochs), got --steps 10" in str(
        err.value.for_flags())
    with pytest.raises(ParameterError, match="global_batch_size 64 disagrees .* \\(32\\)") as err:
        _check(_config(global_batch_size=64))
    assert str(err.value.for_flags()).startswith("--global-batch-size 64 disagrees with the first "
                                                 "batch of --batch-size-schedule (32)")
    assert _check(_config(global_batch_size=32))
    config = _config(warmup_epochs=3.0)
    r = schedule_recipe(config.recipe, s)
    assert r.decay == "constant" and config.recipe.decay == "step"  # a new Recipe; the config's is frozen
    assert (r.warmup_steps, r.warmup_epochs) == (2 * 8 + 1 * 4, None)  # 3 epochs across segments
    with pytest.raises(UsageError, match="replaces lr decay .* got decay cosine"):
        schedule_recipe(_config(decay="cosine").recipe, s)
    with pytest.raises(ParameterError, match="decay_epochs 2") as err:
        schedule_recipe(_config(decay_epochs="2").recipe, s)
    assert "got --decay step --decay-epochs 2; use --decay constant" in str(err.value.for_flags())


def _mlp(keras, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((40,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(10)])


def test_schedule_run_equals_fixed_batch_segments_by_hand(dataset_cache):
    """One Trainer with the schedule's policy vs a hand-written loop: batch 16 for epochs 0-1,
    batch 48 for epoch 2.

    The hand loop takes the examples of step t of epoch e as perm_e[t*B:(t+1)*B], with
    perm_e = pipeline.epoch_permutation(seed, e): the documented data order.
    """
    import keras
    import tensorflow as tf

    from distbatch.backends.single import SingleBackend
    from distbatch.data.datasets import load_dataset
    from distbatch.training.pipeline import epoch_permutation
    from distbatch.recipes.schedules import build_lr_schedule
    from distbatch.training.batch_policy import ScheduledBatch
    from distbatch.training.trainer import LoopOptions, Trainer

    data = load_dataset("mnist1d", seed=0, train_size=240, val_size=60)
    sched = plan_schedule([(0, 16), (2, 48)], epochs=3, replicas=1, num_train_examples=240)
    assert [(g.plan.steps_per_epoch, g.start_step, g.steps) for g in sched.segments] == [
        (15, 0, 30), (5, 30, 5)]
    lr = lambda: build_lr_schedule(peak_lr=0.2, start_lr=0.05, total_steps=35,  # noqa: E731
                                   warmup="gradual", warmup_steps=10, decay="constant")

    model = _mlp(keras, 1)
    init = [w.copy() for w in model.get_weights()]
    schedule = lr()
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build(model.trainable_variables)
    policy = ScheduledBatch(sched, lambda s: float(schedule(s)))
    res = Trainer(SingleBackend(), model, optimizer, sched.first_plan, data,
                  LoopOptions(total_steps=sched.total_steps, seed=3, verbose=False), policy=policy).run()
    m = res.metrics
    assert m["steps"] == 35 and int(optimizer.iterations.numpy()) == 35
    assert m["epochs"] == pytest.approx(3.0)
    assert [(g["global_batch_size"], g["steps_per_epoch"], g["start_step"], g["steps"])
            for g in m["segments"]] == [(16, 15, 0, 30), (48, 5, 30, 5)]
    # lr at segment starts: warmup 0.05 -> 0.2 over 10 steps, then constant 0.2.
    assert [g["lr_at_start"] for g in m["segments"]] == pytest.approx([0.05, 0.2])
    assert [(h["step"], h["epoch"]) for h in res.history] == [(15, 1.0), (30, 2.0), (35, 3.0)]

    # The same thing by hand.
    ref = _mlp(keras, 99)
    ref.set_weights(init)
    ref_opt = keras.optimizers.SGD(lr())
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    for epoch, B in ((0, 16), (1, 16), (2, 48)):
        perm = epoch_permutation(tf, 240, 3, epoch).numpy()
        for t in range(240 // B):
            idx = perm[t * B:(t + 1) * B]
            with tf.GradientTape() as tape:
                logits = ref(tf.gather(x, idx), training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    tf.gather(y, idx), logits, from_logits=True))
            ref_opt.apply_gradients(zip(tape.gradient(loss, ref.trainable_variables),
                                        ref.trainable_variables))
    assert int(ref_opt.iterations.numpy()) == 35
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), ref.get_weights()))
    assert diff < 1e-5
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), init))
    assert moved > 1e-2  # it trained


@pytest.mark.slow
def test_cli_schedule_on_two_replicas_matches_one_device(tmp_path, dataset_cache):
    from conftest import load_summary, load_weights, max_weight_diff, run_cli
    common = ["train", "--dataset", "mnist1d", "--train-size", "256", "--val-size", "64",
              "--batch-size-schedule", "0:32,1:64", "--epochs", "2", "--warmup-epochs", "0.5",
              "--base-lr", "0.1", "--base-batch-size", "16"]
    run_cli([*common, "--backend", "mirrored", "--cpu-replicas", "2", "--out", str(tmp_path / "m")])
    run_cli([*common, "--backend", "single", "--out", str(tmp_path / "s")])
    sm, ss = load_summary(tmp_path / "m"), load_summary(tmp_path / "s")
    assert sm["replicas"] == 2
    assert [(g["global_batch_size"], g["per_replica_batch_size"], g["steps_per_epoch"], g["steps"])
            for g in sm["batch_size_schedule"]] == [(32, 16, 8, 8), (64, 32, 4, 4)]
    assert sm["steps"] == sm["total_steps"] == 12 and sm["epochs"] == pytest.approx(2.0)
    assert sm["decay"] == "constant" and sm["warmup_steps"] == 4
    # peak lr scaled for the FIRST batch (linear rule: 0.1 * 32 / 16), held after warmup
    assert sm["peak_lr"] == pytest.approx(0.2)
    assert [g["lr_at_start"] for g in sm["segments"]] == pytest.approx([0.1, 0.2])
    assert [h["step"] for h in sm["history"]] == [8, 12]
    assert max_weight_diff(load_weights(tmp_path / "m"), load_weights(tmp_path / "s")) < 1e-5
