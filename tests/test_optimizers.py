"""MomentumSGD (momentum correction), LARS and build_optimizer, checked against NumPy."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from distbatch.errors import UsageError
from distbatch.recipes.optimizers import (
    LARS,
    OPTIMIZERS,
    AdamW,
    Lamb,
    MomentumSGD,
    build_optimizer,
    is_bias_or_norm,
)

RNG = np.random.default_rng(42)
W0 = RNG.normal(size=(3, 2))            # a "kernel": rank 2, adapted and decayed
B0 = RNG.normal(size=(2,))              # a "bias": rank 1, excluded
GRADS_W = [RNG.normal(size=(3, 2)) for _ in range(3)]
GRADS_B = [RNG.normal(size=(2,)) for _ in range(3)]
# The lr changes every step. Schedules compute in float32, so use float32 values
# to let NumPy (float64) and the optimizer agree to ~1e-12.
LRS = [float(np.float32(x)) for x in (0.1, 0.5, 0.2)]


def changing_lr():
    """lr = 0.1, 0.5, 0.2 at steps 0, 1, 2."""
    return keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], LRS)


def run(optimizer, steps, w0=W0, b0=B0, grads_w=GRADS_W, grads_b=GRADS_B):
    w = keras.Variable(w0.astype("float64"), dtype="float64", name="kernel")
    b = keras.Variable(b0.astype("float64"), dtype="float64", name="bias")
    for i in range(steps):
        optimizer.apply_gradients([(tf.constant(grads_w[i]), w), (tf.constant(grads_b[i]), b)])
    return w.numpy(), b.numpy()


# ---------------------------------------------------------------- momentum correction
def numpy_momentum(w, grads, lrs, m, *, corrected, nesterov=False, wd=0.0):
    """Goyal et al. 2017 eq. (10), with or without the lr_t / lr_{t-1} correction."""
    v = np.zeros_like(w)
    prev = None
    for g, lr in zip(grads, lrs):
        g = g + wd * w
        ratio = lr / prev if (corrected and prev is not None) else 1.0
        v = m * ratio * v + lr * g
        w = w - (lr * g + m * v if nesterov else v)
        prev = lr
    return w


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_momentum_sgd_matches_numpy(corrected, steps):
    opt = MomentumSGD(changing_lr(), momentum=0.9, momentum_correction=corrected)
    w, b = run(opt, steps)
    np.testing.assert_allclose(w, numpy_momentum(W0, GRADS_W[:steps], LRS[:steps], 0.9, corrected=corrected), rtol=1e-12)
    np.testing.assert_allclose(b, numpy_momentum(B0, GRADS_B[:steps], LRS[:steps], 0.9, corrected=corrected), rtol=1e-12)


def test_correction_changes_the_result_when_lr_changes_and_equals_eq9():
    w_off, _ = run(MomentumSGD(changing_lr(), momentum=0.9), 3)
    w_on, _ = run(MomentumSGD(changing_lr(), momentum=0.9, momentum_correction=True), 3)
    assert not np.allclose(w_off, w_on, rtol=1e-3)
    # eq. (9): u <- m u + g; w <- w - lr u
    u, w = np.zeros_like(W0), W0.copy()
    for g, lr in zip(GRADS_W, LRS):
        u = 0.9 * u + g
        w = w - lr * u
    np.testing.assert_allclose(w_on, w, rtol=1e-12)


def test_uncorrected_equals_keras_sgd():
    # Keras's SGD rounds momentum 0.9 through float32 (ops.cast of a Python
    # float), hence 1e-6 rather than 1e-12 on float64 variables.
    ours = run(MomentumSGD(changing_lr(), momentum=0.9), 3)
    keras_sgd = run(keras.optimizers.SGD(changing_lr(), momentum=0.9), 3)
    np.testing.assert_allclose(ours[0], keras_sgd[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], keras_sgd[1], rtol=1e-6)
    ours = run(MomentumSGD(changing_lr(), momentum=0.9, nesterov=True), 3)
    keras_sgd = run(keras.optimizers.SGD(changing_lr(), momentum=0.9, nesterov=True), 3)
    np.testing.assert_allclose(ours[0], keras_sgd[0], rtol=1e-6)


def test_nesterov_corrected_matches_numpy():
    w, _ = run(MomentumSGD(changing_lr(), momentum=0.9, nesterov=True, momentum_correction=True), 3)
    u, want = np.zeros_like(W0), W0.copy()
    for g, lr in zip(GRADS_W, LRS):
        u = 0.9 * u + g
        want = want - lr * (g + 0.9 * u)
    np.testing.assert_allclose(w, want, rtol=1e-12)


def test_coupled_l2_skips_bias_unless_told():
    wd = 0.01
    w, b = run(MomentumSGD(changing_lr(), momentum=0.9, weight_decay=wd), 3)
    np.testing.assert_allclose(w, numpy_momentum(W0, GRADS_W, LRS, 0.9, corrected=False, wd=wd), rtol=1e-12)
    np.testing.assert_allclose(b, numpy_momentum(B0, GRADS_B, LRS, 0.9, corrected=False), rtol=1e-12)
    _, b = run(MomentumSGD(changing_lr(), momentum=0.9, weight_decay=wd, exclude_bias_and_norm=False), 3)
    np.testing.assert_allclose(b, numpy_momentum(B0, GRADS_B, LRS, 0.9, corrected=False, wd=wd), rtol=1e-12)


def test_plain_sgd():
    w, _ = run(build_optimizer("sgd", changing_lr()), 3)
    np.testing.assert_allclose(w, W0 - sum(lr * g for lr, g in zip(LRS, GRADS_W)), rtol=1e-12)


# ---------------------------------------------------------------- LARS
def numpy_lars(w, grads, lrs, *, m, wd, eta, adapt):
    """You, Gitman, Ginsburg 2017, Algorithm 1; excluded variables: plain momentum."""
    v = np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        if adapt:
            wn, gn = np.linalg.norm(w), np.linalg.norm(g)
            ratio = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
            update = lr * ratio * (g + wd * w)
        else:
            update = lr * g
        v = m * v + update
        w = w - v
    return w


@pytest.mark.parametrize("steps", [1, 2])
def test_lars_matches_numpy(steps):
    kw = dict(m=0.9, wd=5e-4, eta=0.02)
    opt = LARS(changing_lr(), momentum=0.9, weight_decay=5e-4, eta=0.02)
    w, b = run(opt, steps)
    want_w = numpy_lars(W0, GRADS_W[:steps], LRS[:steps], adapt=True, **kw)
    want_b = numpy_lars(B0, GRADS_B[:steps], LRS[:steps], adapt=False, **kw)
    np.testing.assert_allclose(w, want_w, rtol=1e-12)
    np.testing.assert_allclose(b, want_b, rtol=1e-12)
    # the trust ratio matters: an unadapted kernel would land elsewhere
    assert not np.allclose(w, numpy_lars(W0, GRADS_W[:steps], LRS[:steps], adapt=False, **kw), rtol=1e-3)


def test_lars_without_exclusion_adapts_the_bias():
    kw = dict(m=0.9, wd=5e-4, eta=0.02)
    opt = LARS(changing_lr(), momentum=0.9, weight_decay=5e-4, eta=0.02, exclude_bias_and_norm=False)
    _, b = run(opt, 2)
    np.testing.assert_allclose(b, numpy_lars(B0, GRADS_B[:2], LRS[:2], adapt=True, **kw), rtol=1e-12)


def test_lars_zero_weights_use_ratio_one():
    zero = np.zeros((3, 2))
    opt = LARS(LRS[0], momentum=0.9, weight_decay=5e-4, eta=0.001)
    w, _ = run(opt, 1, w0=zero)
    np.testing.assert_allclose(w, -LRS[0] * GRADS_W[0], rtol=1e-12)


def test_lars_inside_tf_function_custom_loop():
    w = keras.Variable(W0, dtype="float64", name="kernel")
    b = keras.Variable(B0, dtype="float64", name="bias")
    opt = LARS(changing_lr(), momentum=0.9, weight_decay=5e-4, eta=0.02)

    @tf.function
    def step(gw, gb):
        opt.apply_gradients([(gw, w), (gb, b)])

    for i in range(2):
        step(tf.constant(GRADS_W[i]), tf.constant(GRADS_B[i]))
    kw = dict(m=0.9, wd=5e-4, eta=0.02)
    np.testing.assert_allclose(w.numpy(), numpy_lars(W0, GRADS_W[:2], LRS[:2], adapt=True, **kw), rtol=1e-12)
    np.testing.assert_allclose(b.numpy(), numpy_lars(B0, GRADS_B[:2], LRS[:2], adapt=False, **kw), rtol=1e-12)


@pytest.mark.parametrize("name", ["lars", "momentum", "lamb"])  # AdamW shares Lamb's mixin
def test_optimizer_survives_keras_save_and_load(tmp_path, name):
    from distbatch.recipes.schedules import build_lr_schedule

    schedule = build_lr_schedule(peak_lr=0.5, start_lr=0.05, total_steps=20, warmup_steps=4, decay="cosine")
    opt = build_optimizer(name, schedule, weight_decay=1e-3, momentum_correction=name == "momentum")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    model.fit(x, np.ones((8, 1), "float32"), batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(opt)
    assert loaded.optimizer.get_config() == opt.get_config()
    for a, b in zip(loaded.optimizer.variables, opt.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- by name
@pytest.mark.parametrize(
    "name, cls, extra",
    [
        ("sgd", MomentumSGD, {"momentum": 0.0, "nesterov": False}),
        ("momentum", MomentumSGD, {"momentum": 0.9, "nesterov": False, "weight_decay": 1e-4}),
        ("nesterov", MomentumSGD, {"momentum": 0.9, "nesterov": True}),
        ("adam", keras.optimizers.Adam, {}),
        ("adamw", AdamW, {"weight_decay": 1e-4, "exclude_bias_and_norm": True}),
        ("lamb", Lamb, {"weight_decay": 1e-4}),
        ("lars", LARS, {"momentum": 0.9, "eta": 0.001, "weight_decay": 1e-4}),
    ],
)
def test_build_optimizer_every_name(name, cls, extra):
    opt = build_optimizer(name, 0.1, weight_decay=0.0 if name == "adam" else 1e-4)
    assert type(opt) is cls
    config = opt.get_config()
    assert config["learning_rate"] == pytest.approx(0.1)
    for key, value in extra.items():
        assert config[key] == value, key
    assert type(opt).from_config(config).get_config() == config


def test_unknown_optimizer_lists_choices():
    with pytest.raises(UsageError) as err:
        build_optimizer("rmsprop", 0.1)
    message = str(err.value)
    assert "'rmsprop'" in message
    assert all(name in message for name in OPTIMIZERS)


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("adam", {"weight_decay": 1e-4}, "adamw"),
        ("adam", {"momentum_correction": True}, "'adam'"),
        ("sgd", {"momentum_correction": True}, "'sgd'"),
        ("momentum", {"momentum": 1.2}, "1.2"),
        ("momentum", {"weight_decay": -1.0}, "-1.0"),
        ("lars", {"lars_eta": 0.0}, "0.0"),
    ],
)
def test_build_optimizer_errors(name, kwargs, fragment):
    with pytest.raises(UsageError) as err:
        build_optimizer(name, 0.1, **kwargs)
    assert fragment in str(err.value)


def test_adamw_and_lamb_exclude_rank1_from_decay():
    for cls in (AdamW, Lamb):
        decayed = run(cls(0.01, weight_decay=0.1), 2)
        plain = run(cls(0.01, weight_decay=None if cls is Lamb else 0.0), 2)
        assert not np.allclose(decayed[0], plain[0])        # kernel is decayed
        np.testing.assert_allclose(decayed[1], plain[1], rtol=1e-12)  # bias is not
        everything = run(cls(0.01, weight_decay=0.1, exclude_bias_and_norm=False), 2)
        assert not np.allclose(everything[1], plain[1])


def test_is_bias_or_norm_on_keras_layers():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.BatchNormalization(),
                              keras.layers.Flatten(), keras.layers.Dense(3), keras.layers.LayerNormalization()])
    excluded = sorted(v.name for v in model.trainable_variables if is_bias_or_norm(v))
    kept = sorted(v.name for v in model.trainable_variables if not is_bias_or_norm(v))
    assert kept == ["kernel", "kernel"]
    assert excluded == sorted(["bias", "gamma", "beta", "bias", "gamma", "beta"])
