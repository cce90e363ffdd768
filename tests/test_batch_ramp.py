"""The batch-size ramp (distbatch/training/batch_ramp.py): global_batch_size "ramp" grows the
batch at epoch ends to the largest base x 2^k <= max_global_batch_size not above the measured
noise scale B_simple, never lowering it; the lr follows the recipe's scaling rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import cli_in_process, load_summary, load_weights, max_weight_diff, run_cli

from distbatch.errors import ParameterError
from distbatch.recipes.recipe import Recipe
from distbatch.training.batch_ramp import (RAMP_FACTOR, RampBatch, RampLR, RampSchedule,
                                           choose_ramp_batch, lr_factor)
from distbatch.training.config import TrainConfig

CANDS = [16, 32, 64, 128, 256]


@pytest.mark.parametrize("b_simple,current,expected", [
    (None, 16, 16), (float("nan"), 32, 32), (-5.0, 16, 16), (0.0, 16, 16),
    (15.9, 16, 16),         # below the base batch: stay
    (16.0, 16, 16), (31.9, 16, 16), (32.0, 16, 32),
    (200.0, 16, 128),       # jumps straight to the largest fitting candidate
    (1e9, 16, 256),         # capped at the largest candidate (max_global_batch_size)
    (40.0, 128, 128),       # never lowers the batch
])
def test_choose_ramp_batch(b_simple, current, expected):
    assert choose_ramp_batch(CANDS, b_simple, current, factor=1.0) == expected


def test_choose_ramp_batch_factor():
    assert RAMP_FACTOR == 2.0  # docs/batch_ramp.md: the measured choice
    assert choose_ramp_batch(CANDS, 100.0, 16) == 128   # the default: <= 2 x B_simple
    assert choose_ramp_batch(CANDS, 100.0, 16, factor=0.5) == 32
    assert choose_ramp_batch(CANDS, 15.9, 16) == 16 and choose_ramp_batch(CANDS, 16.0, 16) == 32


@pytest.mark.parametrize("rule,expected", [("linear", 8.0), ("sqrt", math.sqrt(8)),
                                           ("adaptive-sqrt", math.sqrt(8)), ("none", 1.0)])
def test_lr_factor(rule, expected):
    assert lr_factor(rule, 256, 32) == pytest.approx(expected, rel=1e-12)
    assert lr_factor(rule, 32, 32) == 1.0


class FakeLR:
    def __init__(self):
        self.calls = []

    def set_segment(self, **kw):
        self.calls.append(kw)


def _done(seg, b_simple):
    return {"segment": seg, "step": seg.end_step, "b_simple": b_simple, "info": {}}


def test_ramp_policy_decisions_with_fake_noise():
    """2048 examples, base 16, max 256, 4.5 epochs, linear rule, factor 1: B_simple per
    epoch [20, 70, 30, 900] -> batches 16, 16, 64, 64, 256 (never lower), each segment one
    epoch (the last half of one), the lr factor B/16 and tau on the base batch's epoch axis."""
    lr = FakeLR()
    logs = []
    p = RampBatch(candidates=CANDS, base_batch=16, rule="linear", replicas=1,
                  num_train_examples=2048, epochs=4.5, total_steps=576, lr_state=lr, factor=1.0,
                  log=logs.append)
    seg = p.first()
    segs = [seg]
    for b in (20.0, 70.0, 30.0, 900.0):
        seg = p.next(_done(seg, b))
        segs.append(seg)
    assert p.next(_done(seg, 5000.0)) is None  # 4.5 epochs done
    assert [(s.plan.global_batch_size, s.start_step, s.end_step, s.start_epoch) for s in segs] == [
        (16, 0, 128, 0), (16, 128, 256, 1), (64, 256, 288, 2), (64, 288, 320, 3), (256, 320, 324, 4)]
    assert [c["factor"] for c in lr.calls] == [1, 1, 4, 4, 16]
    assert [c["start_tau"] for c in lr.calls] == [0, 128, 256, 384, 512]
    assert [c["rate"] for c in lr.calls] == [1, 1, 4, 4, 16]
    assert [s.info["lr_factor"] for s in segs] == [1, 1, 4, 4, 16]
    assert logs == ["distbatch: epoch 2: B_simple 70.0, global batch 16 -> 64 (32 steps/epoch, "
                    "lr x 4 (linear))",
                    "distbatch: epoch 4: B_simple 900.0, global batch 64 -> 256 (8 steps/epoch, "
                    "lr x 16 (linear))"]


def test_ramp_policy_records_b_simple_and_keeps_the_batch_without_one():
    p = RampBatch(candidates=CANDS, base_batch=16, rule="sqrt", replicas=2,
                  num_train_examples=512, epochs=2, total_steps=64, lr_state=FakeLR())
    seg = p.first()
    done = _done(seg, None)
    nxt = p.next(done)
    assert done["info"]["b_simple"] is None and nxt.plan.global_batch_size == 16
    assert nxt.plan.per_replica_batch_size == 8


def test_ramp_adaptive_sqrt_sets_the_rules_betas_at_each_batch():
    """adaptive-sqrt: at each batch the optimizer's beta_1, beta_2 and epsilon become
    sde_scaling(B / B0)'s (the inner optimizer of a loss-scale wrapper), recorded per segment
    and said in the change's line."""
    from types import SimpleNamespace

    from distbatch.recipes.adaptive import sde_scaling
    inner = SimpleNamespace(beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    logs = []
    p = RampBatch(candidates=CANDS, base_batch=16, rule="adaptive-sqrt", replicas=1,
                  num_train_examples=2048, epochs=3, total_steps=384, lr_state=FakeLR(), factor=1.0,
                  optimizer=SimpleNamespace(inner_optimizer=inner), log=logs.append)
    seg = p.first()
    assert (inner.beta_1, inner.beta_2, inner.epsilon) == (0.9, 0.999, 1e-7)  # k = 1: Keras's own
    seg = p.next(_done(seg, 70.0))  # -> 64, k = 4
    want = sde_scaling(4)
    assert seg.plan.global_batch_size == 64
    assert (inner.beta_1, inner.beta_2, inner.epsilon) == (want.beta_1, want.beta_2, want.epsilon)
    assert want.beta_1 == pytest.approx(0.6) and want.beta_2 == pytest.approx(0.996)
    assert {k: seg.info[k] for k in ("beta_1", "beta_2", "epsilon")} == want.optimizer_kwargs()
    assert seg.info["scaling_capped"] == []
    assert logs[-1].endswith(f"lr x 2 (adaptive-sqrt), beta_1 0.6, beta_2 0.996, epsilon {want.epsilon:.3g} "
                             f"(capped: nothing))")
    seg = p.next(_done(seg, 900.0))  # -> 256, k = 16: the rule's beta_1 (-0.6) is capped at 0
    assert (inner.beta_1, seg.info["scaling_capped"]) == (0.0, ["beta_1"])
    assert logs[-1].endswith("(capped: beta_1))")
    # other rules leave the optimizer alone
    other = SimpleNamespace(beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    q = RampBatch(candidates=CANDS, base_batch=16, rule="sqrt", replicas=1, num_train_examples=2048,
                  epochs=3, total_steps=384, lr_state=FakeLR(), factor=1.0, optimizer=other)
    assert "beta_1" not in q.next(_done(q.first(), 70.0)).info and other.beta_1 == 0.9


def test_a_new_step_uses_the_betas_set_before_it_is_traced():
    """What the ramp relies on: Keras's Adam reads beta_1 when distbatch's step is traced. One
    step at beta_1 0.9, then beta_1 set to 0.5 and a new step made: the first moment follows
    m2 = m1 + (1 - 0.5) (g2 - m1), computed by hand from the gradient at the weights then."""
    import keras
    import tensorflow as tf

    from distbatch.backends.single import SingleBackend
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import make_train_step
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    opt = keras.optimizers.Adam(0.01)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, size=8).astype("int32")
    backend = SingleBackend()
    plan = BatchPlan.derive(global_batch_size=8, replicas=1, num_train_examples=8)

    def grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
        return tape.gradient(loss, model.trainable_variables)[0].numpy()

    def one_step():
        it = backend.iterator(lambda w, L: tf.data.Dataset.from_tensors((x, y)).repeat())
        make_train_step(backend, model, opt, plan).multi(it, tf.constant(1, tf.int32))

    g1 = grad()
    one_step()
    m1 = opt._momentums[0].numpy()
    np.testing.assert_allclose(m1, 0.1 * g1, rtol=1e-5, atol=1e-7)
    g2 = grad()
    opt.beta_1 = 0.5
    one_step()
    np.testing.assert_allclose(opt._momentums[0].numpy(), m1 + 0.5 * (g2 - m1), rtol=1e-5, atol=1e-7)


def test_ramp_schedule_follows_batch_and_epoch_axis():
    """lr = factor x base(floor(tau)), tau = start_tau + rate x (step - start_step)."""
    import keras
    state = RampLR()
    base = keras.optimizers.schedules.PolynomialDecay(1.0, decay_steps=100, end_learning_rate=0.0)
    sched = RampSchedule(base, state)
    assert float(sched(10)) == pytest.approx(0.9)
    state.set_segment(factor=4.0, start_step=50, start_tau=50, rate=4.0)
    # step 55 at 4x the batch: tau = 50 + 4 x 5 = 70 base steps, lr 4 x 0.3
    assert float(sched(55)) == pytest.approx(1.2, rel=1e-6)
    again = RampSchedule.from_config(sched.get_config())  # no live state: the base schedule
    assert float(again(10)) == pytest.approx(0.9)


R = Recipe(base_batch_size=32, scaling="linear")


@pytest.mark.parametrize("changes,params", [
    ({}, ["global_batch_size", "max_global_batch_size"]),
    ({"max_global_batch_size": 16}, ["max_global_batch_size", "base_batch_size"]),
    ({"max_global_batch_size": 256, "batch_size_schedule": "0:32,1:64"},
     ["global_batch_size", "batch_size_schedule"]),
    ({"max_global_batch_size": 256, "steps": 10}, ["global_batch_size", "epochs", "steps"]),
    ({"max_global_batch_size": 256, "early_stopping_metric": "val_loss"},
     ["global_batch_size", "early_stopping_metric"]),
    ({"max_global_batch_size": 256, "resume": True}, ["global_batch_size", "resume"]),
])
def test_config_errors(changes, params):
    with pytest.raises(ParameterError) as err:
        TrainConfig(global_batch_size="ramp", recipe=R, **changes)
    assert err.value.params[:len(params)] == tuple(params), str(err.value)
    assert "\n" not in str(err.value)


def test_config_accepts_ramp_with_any_rule():
    for scaling in ("linear", "sqrt", "adascale", "none"):
        c = TrainConfig(global_batch_size="ramp", max_global_batch_size=256,
                        recipe=R.replace(scaling=scaling))
        assert c.global_batch_size == "ramp"
    with pytest.raises(ParameterError, match="only applies to global_batch_size auto or ramp"):
        TrainConfig(global_batch_size=32, max_global_batch_size=256)


def test_cli_flag_errors(capfd, tmp_path):
    proc = cli_in_process(capfd, "train", "--global-batch-size", "ramp", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-global-batch-size" in lines[0], proc.stderr
    proc = cli_in_process(capfd, "train", "--global-batch-size", "rampp", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "'auto' or 'ramp'" in proc.stderr
    assert not (tmp_path / "x").exists()


def _arrays(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    return x, (np.abs(x[:, :4]).argmax(1)).astype(np.int32)


def test_fit_errors_before_any_step():
    import keras

    import distbatch
    model = lambda: keras.Sequential([keras.Input((24,)), keras.layers.Dense(4)])  # noqa: E731
    with pytest.raises(ValueError, match="global_batch_size='ramp' needs max_global_batch_size"):
        distbatch.fit(model_fn=model, data=_arrays(), recipe=R, global_batch_size="ramp", epochs=1)
    with pytest.raises(ParameterError, match="give a recipe, not an optimizer_fn") as err:
        distbatch.fit(model_fn=model, data=_arrays(), optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                      global_batch_size="ramp", max_global_batch_size=64, epochs=1, backend="single")
    assert err.value.params[0] == "global_batch_size"
    with pytest.raises(ParameterError, match="give the length in epochs, got steps 5"):
        distbatch.fit(model_fn=model, data=_arrays(), recipe=R, global_batch_size="ramp",
                      max_global_batch_size=64, steps=5, backend="single")
    with pytest.raises(ParameterError, match="max_global_batch_size must be an integer >= "
                                             "base_batch_size"):
        distbatch.fit(model_fn=model, data=_arrays(), recipe=R, global_batch_size="ramp",
                      max_global_batch_size=8, epochs=1, backend="single")


# -- real runs --------------------------------------------------------------------------

COMMON = ["train", "--dataset", "mnist1d", "--train-size", "2048", "--val-size", "512",
          "--base-batch-size", "8", "--base-lr", "0.02", "--scaling", "linear", "--warmup", "none",
          "--decay", "cosine", "--epochs", "4", "--seed", "3"]
RAMP = [*COMMON, "--global-batch-size", "ramp", "--max-global-batch-size", "128"]


@pytest.mark.slow
def test_ramp_run_grows_the_batch_in_fewer_steps(tmp_path, dataset_cache):
    """The batch grows, every segment is one data epoch at its batch, fewer optimizer steps
    than the fixed base batch over the same 4 epochs; the trajectory is in summary.json and
    every change has its line."""
    proc = run_cli([*RAMP, "--backend", "single", "--out", str(tmp_path / "ramp")])
    run_cli([*COMMON, "--global-batch-size", "8", "--backend", "single", "--out", str(tmp_path / "base")])
    s, base = load_summary(tmp_path / "ramp"), load_summary(tmp_path / "base")
    traj = [tuple(t) for t in s["batch_trajectory"]]
    batches = [b for _, b in traj]
    assert batches[0] == 8 and batches[-1] > 8 and batches == sorted(batches)
    for seg, nxt in zip(s["segments"], s["segments"][1:]):
        assert nxt["start_step"] == seg["start_step"] + seg["steps"]
        assert seg["steps"] == 2048 // seg["global_batch_size"]
        assert nxt["global_batch_size"] <= max(seg["global_batch_size"], 2 * seg["b_simple"])
        assert seg["lr_factor"] == seg["global_batch_size"] / 8
    assert len(s["segments"]) == 4 and s["epochs"] == pytest.approx(4.0)
    assert s["steps"] == sum(seg["steps"] for seg in s["segments"]) < base["steps"] == 1024
    assert s["batch_ramp"]["candidates"] == [8, 16, 32, 64, 128] and s["batch_ramp"]["factor"] == 2
    changes = [line for line in proc.stderr.splitlines() if "-> " in line and "B_simple" in line]
    assert len(changes) == sum(a[1] != b[1] for a, b in zip(traj, traj[1:]))
    # lr at each history point: factor x the base batch's cosine at the epoch reached
    for h in s["history"]:
        seg = next(g for g in reversed(s["segments"]) if g["start_step"] < h["step"])
        assert h["lr"] > 0 and seg["lr_factor"] >= 1
    assert s["val_accuracy"] > 0.3


@pytest.mark.slow
def test_ramp_two_replicas_matches_one_device(tmp_path, dataset_cache):
    """Mirrored on 2 logical CPU devices and one device: the same decisions (B_simple comes
    from all-reduced statistics) and the same weights."""
    run_cli([*RAMP, "--backend", "mirrored", "--cpu-replicas", "2", "--out", str(tmp_path / "m")])
    run_cli([*RAMP, "--backend", "single", "--out", str(tmp_path / "s")])
    sm, ss = load_summary(tmp_path / "m"), load_summary(tmp_path / "s")
    assert sm["replicas"] == 2
    assert sm["batch_trajectory"] == ss["batch_trajectory"]
    assert [g["b_simple"] for g in sm["segments"]] == pytest.approx(
        [g["b_simple"] for g in ss["segments"]], rel=1e-3)
    assert max_weight_diff(load_weights(tmp_path / "m"), load_weights(tmp_path / "s")) < 1e-5


@pytest.mark.slow
def test_fit_ramp_equals_cli(tmp_path, capfd, dataset_cache):
    import distbatch
    proc = cli_in_process(capfd, *RAMP, "--backend", "single", "--model", "mlp",
                          "--out", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = distbatch.fit(model_fn="mlp", data="mnist1d", train_size=2048, val_size=512, seed=3,
                        recipe=Recipe(base_batch_size=8, base_lr=0.02, scaling="linear",
                                      warmup="none", decay="cosine"),
                        global_batch_size="ramp", max_global_batch_size=128, epochs=4,
                        backend="single")
    cli = load_summary(tmp_path / "cli")
    assert [tuple(t) for t in res.metrics["batch_trajectory"]] == [
        tuple(t) for t in cli["batch_trajectory"]]
    assert res.metrics["steps"] == cli["steps"]
    assert max_weight_diff(res.model.get_weights(), load_weights(tmp_path / "cli")) <= 1e-6
