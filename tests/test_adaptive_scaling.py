"""Large-batch rules for adaptive optimizers (issue #29 item 1, docs/adaptive_scaling.md):
Malladi et al. 2022's adaptive-sqrt rule with its caps, its refusal for the SGD family, AdaScale's
gain ** 0.5 for adam/adamw/lamb, and both through `distbatch train` into summary.json,
config.json and model.keras."""
from __future__ import annotations

import inspect
import json
import math
import zipfile

import pytest

from conftest import load_summary, run_cli

from distbatch.errors import ParameterError
from distbatch.recipes.adaptive import KERAS_DEFAULTS, adascale_lr_exponent, sde_scaling
from distbatch.cli.flags import flag_error
from distbatch.recipes.recipe import Recipe

E = 1e-7  # Keras's epsilon


@pytest.mark.parametrize("k, lr_factor, beta_1, beta_2, epsilon, capped", [
    (1, 1.0, 0.9, 0.999, E, ()),                                   # the base batch: unchanged
    (4, 2.0, 0.6, 0.996, E / 2, ()),                               # 1 - 4 x 0.1, 1 - 4 x 0.001
    (8, math.sqrt(8), 0.2, 0.992, E / math.sqrt(8), ()),
    (10, math.sqrt(10), 0.0, 0.99, E / math.sqrt(10), ()),         # exactly 0 (up to rounding)
    (16, 4.0, 0.0, 0.984, E / 4, ("beta_1",)),                     # 1 - 1.6 < 0: capped at 0
    (32, math.sqrt(32), 0.0, 0.968, E / math.sqrt(32), ("beta_1",)),
    (1000, math.sqrt(1000), 0.0, 0.0, E / math.sqrt(1000), ("beta_1",)),  # beta_2 exactly 0
    (2048, math.sqrt(2048), 0.0, 0.0, E / math.sqrt(2048), ("beta_1", "beta_2")),
    (0.5, math.sqrt(0.5), 0.95, 0.9995, E * math.sqrt(2), ()),    # a smaller batch: k < 1
])
def test_sde_rule_exact_values_and_caps(k, lr_factor, beta_1, beta_2, epsilon, capped):
    r = sde_scaling(k)
    assert r.k == k
    assert r.lr_factor == pytest.approx(lr_factor, rel=1e-12)
    assert r.beta_1 == pytest.approx(beta_1, abs=1e-12)
    assert r.beta_2 == pytest.approx(beta_2, abs=1e-12)
    assert r.epsilon == pytest.approx(epsilon, rel=1e-12)
    assert r.capped == capped
    assert 0.0 <= r.beta_1 < 1.0 and 0.0 <= r.beta_2 < 1.0


def test_sde_rule_from_other_base_hyperparameters():
    r = sde_scaling(8, beta_1=0.99, beta_2=0.9999, epsilon=1e-8)
    assert (r.beta_1, r.beta_2) == (pytest.approx(0.92, abs=1e-12), pytest.approx(0.9992, abs=1e-12))
    assert r.epsilon == pytest.approx(1e-8 / math.sqrt(8), rel=1e-12) and r.capped == ()
    r = sde_scaling(200, beta_1=0.99, beta_2=0.9999)
    assert r.beta_1 == 0.0 and r.beta_2 == pytest.approx(0.98, abs=1e-12) and r.capped == ("beta_1",)


@pytest.mark.parametrize("k", [0, -2, float("nan"), float("inf"), True])
def test_sde_rule_refuses_a_bad_k(k):
    with pytest.raises(ValueError, match="k .global batch / base batch."):
        sde_scaling(k)


def test_keras_defaults_are_the_base_hyperparameters():
    import keras
    for cls in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Lamb):
        params = inspect.signature(cls).parameters
        assert {n: params[n].default for n in KERAS_DEFAULTS} == KERAS_DEFAULTS, cls.__name__


@pytest.mark.parametrize("optimizer, cls", [("adam", "Adam"), ("adamw", "AdamW"), ("lamb", "Lamb")])
def test_recipe_builds_the_rescaled_optimizer_and_reports_the_caps(optimizer, cls):
    opt, schedule, summary = Recipe(optimizer=optimizer, scaling="adaptive-sqrt", base_lr=0.01,
                                    warmup="none", decay="constant").build(
        global_batch_size=1024, steps_per_epoch=10, total_steps=50)
    assert type(opt).__name__ == cls
    assert (opt.beta_1, opt.beta_2) == (0.0, pytest.approx(0.968, abs=1e-12))
    assert opt.epsilon == pytest.approx(1e-7 / math.sqrt(32), rel=1e-12)
    assert float(schedule(0)) == pytest.approx(0.01 * math.sqrt(32), rel=1e-6)
    assert summary["peak_lr"] == pytest.approx(0.01 * math.sqrt(32), rel=1e-12)
    assert summary["beta_1"] == 0.0 and summary["beta_2"] == pytest.approx(0.968, abs=1e-12)
    assert summary["epsilon"] == pytest.approx(1e-7 / math.sqrt(32), rel=1e-12)
    assert summary["scaling_capped"] == ["beta_1"] and summary["scaling_rule"] == "adaptive-sqrt"
    # k = 4: nothing capped, and the empty list says "checked, none" (None: not this rule).
    opt, _, summary = Recipe(optimizer=optimizer, scaling="adaptive-sqrt").build(
        global_batch_size=128, steps_per_epoch=10, total_steps=50)
    assert (opt.beta_1, opt.beta_2) == (pytest.approx(0.6, abs=1e-12), pytest.approx(0.996, abs=1e-12))
    assert summary["scaling_capped"] == [] and summary["peak_lr"] == pytest.approx(0.1, rel=1e-12)


def test_plain_sqrt_keeps_the_betas():
    opt, _, summary = Recipe(optimizer="adam", scaling="sqrt").build(
        global_batch_size=1024, steps_per_epoch=10, total_steps=50)
    assert (opt.beta_1, opt.beta_2, opt.epsilon) == (0.9, 0.999, 1e-7)
    assert summary["peak_lr"] == pytest.approx(0.05 * math.sqrt(32), rel=1e-12)
    assert summary["scaling_capped"] is None


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "lars"])
def test_adaptive_sqrt_refuses_the_sgd_family(optimizer):
    with pytest.raises(ParameterError) as e:
        Recipe(optimizer=optimizer, scaling="adaptive-sqrt")
    assert str(e.value) == (f"scaling adaptive-sqrt rescales the betas and epsilon of optimizer adam, "
                            f"adamw, lamb, got optimizer {optimizer}; use scaling linear or sqrt")
    assert str(flag_error(e.value)) == (
        f"--scaling adaptive-sqrt rescales the betas and epsilon of --optimizer adam, adamw, lamb, "
        f"got --optimizer {optimizer}; use --scaling linear or sqrt")
    assert "\n" not in str(e.value)


def test_cli_refuses_adaptive_sqrt_with_momentum_in_one_line(capfd):
    from conftest import assert_one_line_error, cli_in_process
    proc = cli_in_process(capfd, "train", "--optimizer", "momentum", "--scaling", "adaptive-sqrt",
                          "--global-batch-size", "64", "--out", "unused")
    assert_one_line_error(proc, "--scaling adaptive-sqrt rescales the betas and epsilon of --optimizer "
                                "adam, adamw, lamb, got --optimizer momentum; use --scaling linear or sqrt")


def test_build_optimizer_refuses_betas_for_sgd():
    from distbatch.recipes.optimizers import build_optimizer
    with pytest.raises(ValueError, match="beta_1 apply to adam, adamw and lamb, not 'momentum'"):
        build_optimizer("momentum", 0.1, beta_1=0.5)
    assert build_optimizer("adam", 0.1, beta_1=0.5, epsilon=1e-9).beta_1 == 0.5


# ---------------------------------------------------------------- AdaScale's exponent

def test_adascale_exponent_by_optimizer():
    assert [adascale_lr_exponent(o) for o in ("adam", "adamw", "lamb")] == [0.5] * 3
    assert [adascale_lr_exponent(o) for o in ("sgd", "momentum", "nesterov", "lars")] == [1.0] * 4


def _adascale_state(gain: float, tau: float = 0.0):
    from distbatch.recipes.adascale import AdaScaleState
    st = AdaScaleState(scale=16.0, base_batch_size=8, total_base_steps=1000)
    st.gain.assign(gain)
    st.tau.assign(tau)
    return st


@pytest.mark.parametrize("optimizer, factor", [("adam", 3.0), ("lamb", 3.0), ("momentum", 9.0),
                                               ("sgd", 9.0)])
def test_adascale_lr_is_gain_to_the_exponent(optimizer, factor):
    """A fixed gain of 9 on a step-decay schedule: adam's lr is sqrt(9) = 3 x schedule(floor(tau)),
    SGD's 9 x; tau (not the optimizer's step) picks the schedule's value."""
    st = _adascale_state(9.0)
    opt, schedule, summary = Recipe(optimizer=optimizer, scaling="adascale", base_lr=0.1,
                                    warmup="none", decay="step", decay_epochs="1",
                                    decay_factor=0.5).build(
        global_batch_size=8, steps_per_epoch=10, total_steps=100, adascale=st)
    assert summary["adascale_lr_exponent"] == (0.5 if factor == 3.0 else 1.0)
    assert summary["peak_lr"] == 0.1  # the base batch's schedule
    assert float(schedule(0)) == pytest.approx(0.1 * factor, rel=1e-6)
    assert float(opt.learning_rate) == pytest.approx(0.1 * factor, rel=1e-6)
    st.advance()                                   # tau 9: still before the milestone at 10
    assert float(schedule(1)) == pytest.approx(0.1 * factor, rel=1e-6)
    st.advance()                                   # tau 18: after it, x 0.5
    assert float(schedule(2)) == pytest.approx(0.05 * factor, rel=1e-6)
    assert float(st.tau.numpy()) == 18.0           # progress follows the gain, not its root


def test_adascale_update_the_optimizer_applies():
    """What the optimizer does with that lr on one step from w = 0 with gradient g = 0.5 at a
    gain of 16: SGD moves w by 16 x 0.1 x 0.5 = 0.8; Adam's first step is about lr x g / |g|, so
    it moves w by about sqrt(16) x 0.1 = 0.4."""
    import keras
    import numpy as np
    moved = {}
    for optimizer in ("sgd", "adam"):
        st = _adascale_state(16.0)
        opt, _, _ = Recipe(optimizer=optimizer, scaling="adascale", base_lr=0.1, warmup="none",
                           decay="constant").build(global_batch_size=8, steps_per_epoch=10,
                                                   total_steps=100, adascale=st)
        w = keras.Variable(np.zeros(3, np.float32))
        opt.apply_gradients([(keras.ops.convert_to_tensor(np.full(3, 0.5, np.float32)), w)])
        moved[optimizer] = float(-np.asarray(w)[0])
    assert moved["sgd"] == pytest.approx(0.8, rel=1e-6)
    # Keras's Adam, step 1: lr sqrt(1 - b2) / (1 - b1) x m / (sqrt(v) + eps) with m = (1 - b1) g,
    # v = (1 - b2) g^2: lr x sqrt(1 - b2) g / (sqrt(1 - b2) g + eps).
    root = math.sqrt(0.001) * 0.5
    assert moved["adam"] == pytest.approx(0.4 * root / (root + 1e-7), rel=1e-5)
    assert moved["adam"] != pytest.approx(0.8, rel=0.1)  # not the linear gain


def test_adascale_schedule_config_round_trip_keeps_the_exponent():
    from distbatch.recipes.adascale import AdaScaleSchedule
    from distbatch.recipes.schedules import ConstantSchedule
    s = AdaScaleSchedule(ConstantSchedule(0.1), _adascale_state(4.0), lr_exponent=0.5)
    assert float(s(0)) == pytest.approx(0.2, rel=1e-6)
    config = s.get_config()
    assert config["lr_exponent"] == 0.5 and config["scale"] == 16.0
    clone = AdaScaleSchedule.from_config(config)
    assert clone.lr_exponent == 0.5 and clone.get_config() == config
    old = {k: v for k, v in config.items() if k != "lr_exponent"}  # saved before the exponent
    assert AdaScaleSchedule.from_config(old).lr_exponent == 1.0
    with pytest.raises(ValueError, match=r"^lr_exponent must be in \(0, 1\], got 2$"):
        AdaScaleSchedule(ConstantSchedule(0.1), lr_exponent=2)


# ---------------------------------------------------------------- through `distbatch train`

TINY = ["--backend", "single", "--dataset", "mnist1d", "--model", "mlp", "--seed", "3",
        "--base-lr", "0.01", "--base-batch-size", "32", "--warmup", "none"]


def _keras_optimizer_config(out) -> dict:
    with zipfile.ZipFile(out / "model.keras") as z:
        config = json.loads(z.read("config.json"))
    return config["compile_config"]["optimizer"]["config"]


@pytest.mark.slow
def test_train_adaptive_sqrt_writes_the_rescaled_hyperparameters(tmp_path, dataset_cache):
    """batch 1024 from base 32 (k = 32): beta_1 capped at 0 and reported, beta_2 0.968,
    epsilon 1e-7 / sqrt(32), lr 0.01 x sqrt(32), in summary.json, config.json and the saved
    optimizer."""
    out = tmp_path / "run"
    run_cli(["train", *TINY, "--train-size", "1024", "--val-size", "128", "--decay", "constant",
             "--optimizer", "adam", "--scaling", "adaptive-sqrt", "--global-batch-size", "1024",
             "--steps", "3", "--out", str(out)])
    s = load_summary(out)
    lr, eps = 0.01 * math.sqrt(32), 1e-7 / math.sqrt(32)
    assert s["scaling_rule"] == "adaptive-sqrt" and s["steps"] == 3
    assert s["peak_lr"] == pytest.approx(lr, rel=1e-12)
    assert s["beta_1"] == 0.0 and s["beta_2"] == pytest.approx(0.968, abs=1e-12)
    assert s["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert s["scaling_capped"] == ["beta_1"]
    assert [r["lr"] for r in s["history"]][-1] == pytest.approx(lr, rel=1e-6)
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert {k: recipe[k] for k in ("beta_1", "beta_2", "epsilon", "scaling_capped")} == \
        {k: s[k] for k in ("beta_1", "beta_2", "epsilon", "scaling_capped")}
    saved = _keras_optimizer_config(out)  # what the optimizer itself ran with
    assert saved["beta_1"] == 0.0 and saved["beta_2"] == pytest.approx(0.968, abs=1e-12)
    assert saved["epsilon"] == pytest.approx(eps, rel=1e-12)


@pytest.mark.slow
def test_train_adascale_adam_lr_is_the_root_of_the_gain(tmp_path, dataset_cache):
    """Constant schedule: the last step's lr is base_lr x final_gain ** 0.5 for adam (and
    base_lr x final_gain for momentum); tau = the sum of the gains either way."""
    got = {}
    for optimizer in ("adam", "momentum"):
        out = tmp_path / optimizer
        run_cli(["train", *TINY, "--train-size", "640", "--val-size", "160", "--decay", "constant",
                 "--optimizer", optimizer, "--scaling", "adascale", "--global-batch-size", "256",
                 "--epochs", "1", "--out", str(out)])
        got[optimizer] = s = load_summary(out)
        assert s["adascale_lr_exponent"] == (0.5 if optimizer == "adam" else 1.0)
        assert s["adascale_final_gain"] > 1.2  # a gain whose root differs from itself
        power = s["adascale_lr_exponent"]
        assert s["history"][-1]["lr"] == pytest.approx(0.01 * s["adascale_final_gain"] ** power, rel=1e-5)
        assert s["scale_invariant_steps"] == pytest.approx(s["steps"] * s["adascale_mean_gain"], rel=1e-4)


def test_start_line_shows_the_rescaled_betas_and_the_caps(capsys):
    import keras
    import numpy as np

    import distbatch
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(512, 4)).astype("float32"), rng.integers(0, 2, 512))
    model_fn = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # noqa: E731
    for batch, expected in ((128, "beta_1 0.6, beta_2 0.996, epsilon 5e-08 (capped: nothing)"),
                            (512, "beta_1 0, beta_2 0.984, epsilon 2.5e-08 (capped: beta_1)")):
        distbatch.fit(model_fn=model_fn, data=data, global_batch_size=batch, steps=1,
                      backend="single", verbose=True,
                      recipe=distbatch.Recipe(optimizer="adam", scaling="adaptive-sqrt",
                                              base_batch_size=32, warmup="none", decay="constant"))
        start = [line for line in capsys.readouterr().err.splitlines() if "global batch" in line][0]
        assert start.endswith(expected), start
