"""LR scaling rules, warmup and decay schedules: closed-form tables and round trips."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from distbatch.errors import UsageError
from distbatch.recipes.schedules import (
    ConstantSchedule,
    WarmupSchedule,
    build_lr_schedule,
    epochs_to_steps,
    scaled_learning_rate,
)


# ---------------------------------------------------------------- scaling rules
@pytest.mark.parametrize(
    "base_lr, base_bs, global_bs, rule, expected",
    [
        (0.1, 256, 8192, "linear", 3.2),  # Goyal: 0.1 per 256 -> 3.2 at 8k
        (0.1, 256, 8192, "sqrt", 0.1 * math.sqrt(32)),
        (0.1, 256, 8192, "none", 0.1),
        (0.1, 256, 256, "linear", 0.1),
        (0.1, 256, 128, "linear", 0.05),
        (0.05, 32, 1024, "linear", 1.6),
        (0.05, 32, 1024, "sqrt", 0.05 * math.sqrt(32)),
        (0.2, 100, 400, "sqrt", 0.4),
    ],
)
def test_scaled_learning_rate_table(base_lr, base_bs, global_bs, rule, expected):
    assert scaled_learning_rate(base_lr, base_bs, global_bs, rule) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((0.1, 256, 512, "cubic"), "'cubic'"),
        ((0.0, 256, 512, "linear"), "0.0"),
        ((-1.0, 256, 512, "linear"), "-1.0"),
        ((0.1, 0, 512, "linear"), "base_batch_size"),  # the Python API names the parameter
        ((0.1, 256, 0, "linear"), "global_batch_size"),
        ((0.1, 256, 2.5, "linear"), "2.5"),
    ],
)
def test_scaled_learning_rate_errors_name_the_value(args, fragment):
    with pytest.raises(UsageError, match=None) as err:
        scaled_learning_rate(*args)
    message = str(err.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    "epochs, spe, expected",
    [(5, 100, 500), (0, 7, 0), (0.25, 10, 3), (0.5, 3, 2), (1.5, 4, 6), (90, 1251, 112590)],
)
def test_epochs_to_steps(epochs, spe, expected):
    assert epochs_to_steps(epochs, spe) == expected


@pytest.mark.parametrize("epochs, spe", [(-1, 10), (float("nan"), 10), (1, 0), (1, 2.5)])
def test_epochs_to_steps_errors(epochs, spe):
    with pytest.raises(UsageError):
        epochs_to_steps(epochs, spe)


# ---------------------------------------------------------------- schedule tables
PEAK, START, END, TOTAL, WARM = 0.8, 0.1, 0.02, 200, 20
MILESTONES = [60, 120, 180]


def reference_lr(t, *, warmup, decay, power=1.0, factor=0.1, start=START, warm=WARM):
    """Closed-form lr(t) for the conventions documented in distbatch.recipes.schedules."""

    def inner(s):
        if decay == "constant":
            return PEAK
        if decay == "step":
            return PEAK * factor ** sum(s >= m for m in MILESTONES)
        frac = min(s, TOTAL) / TOTAL
        if decay == "cosine":
            return END + (PEAK - END) * 0.5 * (1 + math.cos(math.pi * frac))
        return (PEAK - END) * (1 - frac) ** power + END

    if warmup != "none" and t < warm:
        if warmup == "constant":
            return start
        return start + (inner(warm) - start) * t / warm
    return inner(t)


STEPS = [0, 1, 5, 10, 19, 20, 21, 59, 60, 61, 100, 119, 120, 150, 179, 180, 199, 200, 250]


@pytest.mark.parametrize("warmup", ["gradual", "constant", "none"])
@pytest.mark.parametrize("decay", ["constant", "cosine", "step", "linear"])
def test_schedule_table_matches_closed_form(warmup, decay):
    schedule = build_lr_schedule(
        peak_lr=PEAK, start_lr=START, total_steps=TOTAL, warmup=warmup,
        warmup_steps=0 if warmup == "none" else WARM, decay=decay,
        decay_steps=MILESTONES, end_lr=END,
    )
    got = [float(schedule(t)) for t in STEPS]
    want = [reference_lr(t, warmup=warmup, decay=decay) for t in STEPS]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_polynomial_power_and_warmup_from_zero():
    schedule = build_lr_schedule(
        peak_lr=PEAK, start_lr=0.0, total_steps=TOTAL, warmup="gradual", warmup_steps=WARM,
        decay="linear", end_lr=END, power=2.0,
    )
    got = [float(schedule(t)) for t in STEPS]
    want = [reference_lr(t, warmup="gradual", decay="linear", power=2.0, start=0.0) for t in STEPS]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert float(schedule(0)) == 0.0


def test_goyal_imagenet_recipe_in_epochs():
    """ResNet-50 at 8k: 3.2 peak, 5-epoch ramp from 0.1, x0.1 at epochs 30/60/80 of 90."""
    spe = 10  # small stand-in for 156 steps per epoch; milestones stay in epochs
    peak = scaled_learning_rate(0.1, 256, 8192, "linear")
    schedule = build_lr_schedule(
        peak_lr=peak, start_lr=0.1, total_steps=epochs_to_steps(90, spe), warmup="gradual",
        warmup_steps=epochs_to_steps(5, spe), decay="step",
        decay_steps=[epochs_to_steps(e, spe) for e in (30, 60, 80)],
    )
    table = {0: 0.1, 25: 0.1 + (3.2 - 0.1) * 25 / 50, 50: 3.2, 299: 3.2, 300: 0.32,
             599: 0.32, 600: 0.032, 800: 0.0032, 899: 0.0032}
    for step, lr in table.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
    # constant increment per step during the ramp
    ramp = np.array([float(schedule(t)) for t in range(51)])
    np.testing.assert_allclose(np.diff(ramp), (3.2 - 0.1) / 50, rtol=1e-5)


def test_no_warmup_returns_the_decay_itself():
    s = build_lr_schedule(peak_lr=0.5, total_steps=10, warmup="gradual", warmup_steps=0)
    assert isinstance(s, ConstantSchedule)
    s = build_lr_schedule(peak_lr=0.5, total_steps=10, warmup="constant", warmup_steps=2,
                          start_lr=0.1)
    assert isinstance(s, WarmupSchedule) and s.mode == "constant"


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(warmup_steps=300, total_steps=200), ["300", "200"]),
        (dict(warmup="sudden"), ["'sudden'"]),
        (dict(decay="exp"), ["'exp'"]),
        (dict(peak_lr=0.0), ["0.0"]),
        (dict(warmup="none", warmup_steps=5), ["5"]),
        (dict(warmup="constant", start_lr=0.0, warmup_steps=5), ["0.0"]),
        (dict(decay="step", decay_steps=[]), ["none"]),
        (dict(decay="step", decay_steps=[50, 40]), ["[50, 40]"]),
        (dict(decay="step", decay_steps=[50, 400]), ["[50, 400]", "200"]),
        (dict(decay="step", decay_steps=[50], decay_factor=1.5), ["1.5"]),
        (dict(decay="cosine", end_lr=2.0), ["2.0"]),
        (dict(decay="linear", power=0.0), ["0.0"]),
        (dict(total_steps=0), ["0"]),
    ],
)
def test_build_lr_schedule_errors_name_the_values(kwargs, fragments):
    base = dict(peak_lr=1.0, total_steps=200, warmup="gradual", warmup_steps=10)
    base.update(kwargs)
    with pytest.raises(UsageError) as err:
        build_lr_schedule(**base)
    for fragment in fragments:
        assert fragment in str(err.value)


# ---------------------------------------------------------------- serialization
def all_schedules():
    out = []
    for warmup in ("gradual", "constant", "none"):
        for decay in ("constant", "cosine", "step", "linear"):
            out.append(build_lr_schedule(
                peak_lr=PEAK, start_lr=START, total_steps=TOTAL, warmup=warmup,
                warmup_steps=0 if warmup == "none" else WARM, decay=decay,
                decay_steps=MILESTONES, end_lr=END, power=1.5,
            ))
    # doubly nested: a warmup wrapping a warmup
    out.append(WarmupSchedule(out[0], warmup_steps=5, start_lr=0.0))
    return out


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: type(s).__name__)
def test_get_config_from_config_round_trip_is_exact(schedule):
    config = schedule.get_config()
    clone = type(schedule).from_config(config)
    assert clone.get_config() == config
    # and through Keras's generic (de)serializer, which uses the registered name
    blob = keras.optimizers.schedules.serialize(schedule)
    clone2 = keras.optimizers.schedules.deserialize(blob)
    assert type(clone2) is type(schedule)
    assert keras.optimizers.schedules.serialize(clone2) == blob
    for t in (0, 3, 19, 20, 61, 150, 199):
        assert float(clone(t)) == float(schedule(t))
        assert float(clone2(t)) == float(schedule(t))


def test_registered_names():
    blob = keras.optimizers.schedules.serialize(all_schedules()[0])
    assert blob["registered_name"] == "distbatch>WarmupSchedule"
    assert keras.saving.get_registered_name(ConstantSchedule) == "distbatch>ConstantSchedule"


def test_schedule_survives_keras_model_save_and_load(tmp_path):
    from distbatch.recipes.optimizers import MomentumSGD

    schedule = all_schedules()[2]  # gradual warmup wrapping PiecewiseConstantDecay
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=MomentumSGD(schedule, momentum=0.9), loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    lr = loaded.optimizer._learning_rate
    assert isinstance(lr, WarmupSchedule)
    assert lr.get_config() == schedule.get_config()
    assert int(loaded.optimizer.iterations) == 2
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(schedule(2)))


# ---------------------------------------------------------------- CLI recipe
def parse(*flags):
    import argparse

    from distbatch.cli.recipe_flags import add_recipe_args

    parser = argparse.ArgumentParser()
    add_recipe_args(parser)
    return parser.parse_args(list(flags))


def test_build_recipe_goyal_defaults():
    from distbatch.recipes.optimizers import MomentumSGD
    from distbatch.cli.recipe_flags import build_recipe

    args = parse()  # momentum, base 0.05 @ 32, linear, gradual from base, step decay
    opt, schedule, summary = build_recipe(args, global_batch_size=1024, steps_per_epoch=10, total_steps=900)
    assert isinstance(opt, MomentumSGD) and opt.momentum == 0.9 and not opt.momentum_correction
    assert summary["peak_lr"] == pytest.approx(0.05 * 1024 / 32)
    assert summary["warmup_steps"] == 50            # 5/90 of 900
    assert summary["decay_steps"] == [300, 600, 800]  # 30, 60, 80 of 90
    assert float(schedule(0)) == pytest.approx(0.05)
    assert float(schedule(50)) == pytest.approx(1.6)
    assert float(schedule(300)) == pytest.approx(0.16)
    for key in ("base_lr", "base_batch_size", "scaling_rule", "peak_lr", "warmup_steps", "warmup",
                "decay", "optimizer", "momentum", "weight_decay"):
        assert key in summary
    assert summary["scaling_rule"] == "linear" and summary["base_batch_size"] == 32
    assert opt._learning_rate is schedule


@pytest.mark.parametrize(
    "flags, gbs, spe, total, peak, warmup_steps",
    [
        (["--base-lr", "0.1", "--base-batch-size", "256", "--warmup-epochs", "5"], 8192, 156, 156 * 90, 3.2, 780),
        (["--scaling", "sqrt", "--warmup-epochs", "0.5"], 512, 7, 70, 0.05 * 4, 4),
        (["--scaling", "none", "--warmup-steps", "3", "--decay", "cosine"], 512, 7, 70, 0.05, 3),
        (["--warmup", "none", "--warmup-epochs", "2"], 64, 5, 50, 0.1, 0),
        (["--base-batch-size", "64"], 32, 10, 100, 0.025, 6),  # below base: lr halves
    ],
)
def test_build_recipe_closed_form(flags, gbs, spe, total, peak, warmup_steps):
    from distbatch.cli.recipe_flags import build_recipe

    _, schedule, summary = build_recipe(parse(*flags), global_batch_size=gbs, steps_per_epoch=spe, total_steps=total)
    assert summary["peak_lr"] == pytest.approx(peak, rel=1e-12)
    assert summary["warmup_steps"] == warmup_steps
    if warmup_steps:
        assert float(schedule(warmup_steps)) == pytest.approx(float(schedule.after_warmup(warmup_steps)))
        assert float(schedule(0)) == pytest.approx(min(summary["base_lr"], peak))
    else:
        assert float(schedule(0)) == pytest.approx(peak)


def test_build_recipe_explicit_milestones_lars_and_zero_start():
    from distbatch.recipes.optimizers import LARS
    from distbatch.cli.recipe_flags import build_recipe

    args = parse("--optimizer", "lars", "--decay-epochs", "3,6", "--warmup-from", "zero",
                 "--warmup-epochs", "1", "--weight-decay", "5e-4", "--lars-eta", "0.02")
    opt, schedule, summary = build_recipe(args, global_batch_size=256, steps_per_epoch=4, total_steps=40)
    assert isinstance(opt, LARS) and opt.eta == 0.02 and opt.l2 == 5e-4
    assert summary["decay_steps"] == [12, 24] and summary["warmup_steps"] == 4
    assert [float(schedule(t)) for t in (0, 2, 4, 11, 12, 24)] == pytest.approx([0.0, 0.2, 0.4, 0.4, 0.04, 0.004])
    assert summary["lars_eta"] == 0.02 and summary["momentum"] == 0.9


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--warmup-epochs", "20"], "200"),             # 200 warmup steps > 100 training steps
        (["--decay-epochs", "3,x"], "'3,x'"),
        (["--decay-epochs", "3,30"], "300"),            # milestone beyond training
        (["--warmup", "constant", "--warmup-from", "zero"], "lr 0"),
        (["--optimizer", "adam", "--momentum-correction"], "'adam'"),
        (["--base-lr", "-0.1"], "-0.1"),
        (["--warmup-steps", "-2"], "-2"),
    ],
)
def test_build_recipe_errors(flags, fragment):
    from distbatch.cli.recipe_flags import build_recipe

    with pytest.raises(UsageError) as err:
        build_recipe(parse(*flags), global_batch_size=256, steps_per_epoch=10, total_steps=100)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_warmup_epochs_and_steps_are_mutually_exclusive():
    with pytest.raises(SystemExit):
        parse("--warmup-epochs", "1", "--warmup-steps", "5")
