"""AdaScale SGD (distbatch.recipes.adascale): the gain in closed form, tau, S = 1 equal to the plain
schedule exactly, the same run on 2 replicas, and an exact resume of tau and the averages."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_summary, load_weights, max_weight_diff, run_cli

from distbatch.recipes.adascale import default_theta, gain


@pytest.mark.parametrize("sigma2,mu2,scale,expected", [
    (1.0, 1.0, 1, 1.0),                 # S = 1: no adaptation
    (1.0, 0.0, 8, 8.0),                 # pure noise: linear scaling
    (0.0, 1.0, 8, 1.0),                 # no noise: a bigger batch buys nothing
    (3.0, 1.0, 4, 4.0 / (0.75 + 1.0)),  # (s + m) / (s/S + m)
    (1.0, 1.0, 32, 2.0 / (1 / 32 + 1.0)),
])
def test_gain_closed_form(sigma2, mu2, scale, expected):
    assert gain(sigma2, mu2, scale) == pytest.approx(expected, rel=1e-12)
    assert 1.0 <= gain(sigma2, mu2, scale) <= scale


def test_theta_is_the_papers():
    assert default_theta(32) == pytest.approx(0.968)
    assert default_theta(1000) == 0.0 and default_theta(4000) == 0.0


def _state(scale, b0=8, total=100):
    from distbatch.recipes.adascale import AdaScaleState
    return AdaScaleState(scale=scale, base_batch_size=b0, total_base_steps=total)


def test_state_gain_and_tau_from_norms():
    """Known squared norms at b_small = 16 and b_big = 64 (S = 8 at b0 = 8): the state's gain
    equals the closed form of McCandlish's unbiased estimates, and tau adds the gains."""
    from distbatch.measure.noise import unbiased_estimates
    st = _state(8.0)
    small, big = 0.5, 0.2
    g2, tr = unbiased_estimates(small, big, 16, 64)
    expected = gain(tr / 8, g2, 8.0)
    for k in range(1, 4):  # constant inputs: the bias-corrected averages equal them every step
        r = float(st.update_gain(small, big, 16, 64).numpy())
        assert r == pytest.approx(expected, rel=1e-5)
        st.advance()
        assert float(st.tau.numpy()) == pytest.approx(k * expected, rel=1e-5)
    assert not bool(st.finished())


def test_state_clips_and_skips_non_finite():
    st = _state(4.0)
    # small < big: a negative trace estimate is clipped to sigma^2 = 1e-6: gain ~ 1.
    r = float(st.update_gain(0.1, 0.3, 16, 64).numpy())
    assert r == pytest.approx(1.0, abs=1e-5)
    before = [float(v.numpy()) for v in (st.ema_sigma2, st.ema_mu2, st.count)]
    r2 = float(st.update_gain(float("inf"), 0.3, 16, 64).numpy())
    assert [float(v.numpy()) for v in (st.ema_sigma2, st.ema_mu2, st.count)] == before
    assert math.isfinite(r2)


def test_bad_scale_is_a_value_error():
    with pytest.raises(ValueError, match="scale"):
        _state(0.5)


TINY = ["--dataset", "mnist1d", "--train-size", "640", "--val-size", "160", "--seed", "4",
        "--base-lr", "0.05", "--base-batch-size", "32", "--decay", "cosine", "--warmup", "none",
        "--model", "mlp"]


@pytest.mark.slow
def test_scale_one_is_exactly_the_plain_schedule(tmp_path, dataset_cache):
    plain, ada = tmp_path / "plain", tmp_path / "ada"
    run_cli(["train", "--backend", "single", *TINY, "--global-batch-size", "32", "--epochs", "2",
             "--scaling", "none", "--out", str(plain)])
    run_cli(["train", "--backend", "single", *TINY, "--global-batch-size", "32", "--epochs", "2",
             "--scaling", "adascale", "--out", str(ada)])
    assert max_weight_diff(load_weights(plain), load_weights(ada)) == 0.0
    a, p = load_summary(ada), load_summary(plain)
    assert a["steps"] == p["steps"] == 40
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in p["history"]]
    assert a["adascale_mean_gain"] == 1.0 and a["scale_invariant_steps"] == 40.0


@pytest.mark.slow
def test_large_batch_ends_on_the_base_budget(tmp_path, dataset_cache):
    out = tmp_path / "ada8"
    run_cli(["train", "--backend", "single", *TINY, "--global-batch-size", "256", "--epochs", "4",
             "--scaling", "adascale", "--out", str(out)])
    s = load_summary(out)
    budget = 4 * (640 // 32)
    assert s["base_steps_budget"] == budget
    # tau passes the budget on the last step, and not before it.
    assert budget <= s["scale_invariant_steps"] < budget + 8
    assert math.ceil(budget / 8) <= s["steps"] < budget
    assert 1.0 <= s["adascale_mean_gain"] <= 8.0
    # tau is the sum of the gains: steps x mean gain.
    assert s["scale_invariant_steps"] == pytest.approx(s["steps"] * s["adascale_mean_gain"], rel=1e-4)
    assert s["b_simple"] is not None  # the statistics are logged too


@pytest.mark.slow
def test_resume_restores_tau_and_averages(tmp_path, dataset_cache):
    """Stop after k steps (a cap), resume to the end: equal to the uninterrupted run."""
    import keras

    from distbatch.recipes.adascale import AdaScaleState
    from distbatch.backends.single import SingleBackend
    from distbatch.data.datasets import load_dataset
    from distbatch.training.plan import BatchPlan
    from distbatch.cli.recipe_flags import build_recipe
    from distbatch.cli import build_parser
    from distbatch.training.trainer import LoopOptions, Trainer

    data = load_dataset("mnist1d", seed=0, train_size=640, val_size=160)
    args = build_parser("train").parse_args(["train", *TINY, "--global-batch-size", "128",
                                             "--scaling", "adascale", "--out", "x"])
    plan = BatchPlan.derive(global_batch_size=128, replicas=1, num_train_examples=640)

    def run(total, ckpt, resume):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(10)])
        st = AdaScaleState(scale=4.0, base_batch_size=32, total_base_steps=60)
        opt, _, _ = build_recipe(args, global_batch_size=32, steps_per_epoch=20, total_steps=60,
                                 adascale=st)
        opt.build(model.trainable_variables)
        res = Trainer(SingleBackend(), model, opt, plan, data,
                      LoopOptions(total_steps=total, verbose=False, checkpoint_dir=str(ckpt),
                                  resume=resume, checkpoint_every=3),
                      adascale=st).run()
        return model.get_weights(), res, float(st.tau.numpy())

    w_full, r_full, tau_full = run(60, tmp_path / "full", False)
    run(7, tmp_path / "cut", False)
    w_res, r_res, tau_res = run(60, tmp_path / "cut", True)
    assert r_full.metrics["steps"] == r_res.metrics["steps"] < 60
    assert tau_res == pytest.approx(tau_full, rel=1e-12)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_full, w_res)) <= 1e-6


@pytest.mark.slow
def test_two_replicas_equal_one_device(tmp_path, dataset_cache):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train", *TINY, "--global-batch-size", "128", "--epochs", "3", "--scaling", "adascale"]
    run_cli([*common, "--backend", "single", "--out", str(one)])
    run_cli([*common, "--backend", "mirrored", "--cpu-replicas", "2", "--out", str(two)])
    a, b = load_summary(one), load_summary(two)
    # One device splits its batch in two halves for the statistics; two replicas have a half
    # each: the same small batch, the same gains, the same run.
    assert a["steps"] == b["steps"]
    assert b["adascale_mean_gain"] == pytest.approx(a["adascale_mean_gain"], rel=1e-4)
    assert max_weight_diff(load_weights(one), load_weights(two)) < 1e-5


@pytest.mark.slow
def test_sweep_compares_scaling_rules(tmp_path, dataset_cache):
    import json
    out = tmp_path / "sweep"
    argv = ["sweep", "--scaling", "linear,adascale", "--batch-sizes", "32,128", "--epochs", "1",
            "--train-size", "640", "--val-size", "160", "--model", "mlp", "--out", str(out)]
    run_cli(argv)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point_id"] for r in rows) == [
        "bs=128/seed=0/scaling=adascale", "bs=128/seed=0/scaling=linear",
        "bs=32/seed=0/scaling=adascale", "bs=32/seed=0/scaling=linear"]
    by = {(r["scaling_rule"], r["global_batch_size"]): r for r in rows}
    assert by[("linear", 128)]["steps"] == 640 // 128
    assert 640 // 128 <= by[("adascale", 128)]["steps"] <= 640 // 32
    assert by[("adascale", 128)]["adascale_mean_gain"] >= 1.0
    report = (out / "report.md").read_text()
    assert "scaling rules compared" in report and "adascale: optimizer steps" in report
    assert (out / "scaling" / "adascale" / "report.md").is_file()
    # Idempotent: a resume trains nothing new.
    proc = run_cli([*argv, "--resume"])
    assert "4 points (4 already done)" in proc.stderr


@pytest.mark.slow
def test_sweep_bad_scaling_is_one_line(tmp_path):
    proc = run_cli(["sweep", "--scaling", "linear,bogus", "--out", str(tmp_path / "s")], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'linear,bogus'" in lines[0] and "--scaling" in lines[0]
