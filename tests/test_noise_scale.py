"""The gradient noise scale against a problem where it is known exactly.

Linear regression, x ~ N(0, I_d), y = w*.x + eps with eps ~ N(0, sigma^2), and
the per-example loss l(w) = (w.x - y)^2 at FIXED weights w = w* + u:

    grad l = 2 (u.x - eps) x
    G      = E[grad] = 2 u                                 (E[x x^T] = I)
    E|grad|^2 = 4 (E[(u.x)^2 |x|^2] + sigma^2 E|x|^2)
              = 4 (|u|^2 (d + 2) + sigma^2 d)              (Isserlis: E[x_i x_j x_k^2] = d_ij (1 + 2 d_ik))
    tr(Sigma) = E|grad|^2 - |G|^2 = 4 (|u|^2 (d + 1) + sigma^2 d)
    B_simple  = tr(Sigma) / |G|^2 = d + 1 + d sigma^2 / |u|^2

The derivation is checked by Monte Carlo, then the REAL train step
(distbatch.training.step.make_train_step with noise_scale=True, learning rate 0 so the
weights stay at w) is run on fresh samples for many steps, its small_sq/big_sq
are fed to NoiseScaleTracker, and the estimate must land within 10% of the
closed form: on 1 replica (noise_splits=2) and on 2 mirrored replicas (2
logical CPUs, in a subprocess since logical devices are fixed per process).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from distbatch.cli import recommend as recommend_cli
from distbatch.measure import recommend as rec_mod
from distbatch.errors import UsageError
from distbatch.measure.noise import NoiseScaleTracker, unbiased_estimates

D, SIGMA = 8, 1.0


def closed_form(u: np.ndarray, sigma: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) of l = (w.x - y)^2 at w = w* + u, x ~ N(0, I)."""
    d, u2 = len(u), float(u @ u)
    return 4.0 * u2, 4.0 * (u2 * (d + 1) + sigma ** 2 * d)


def problem(seed: int = 0):
    """w*, u (|u| = 1, not axis-aligned) for the regression problem."""
    rng = np.random.default_rng(seed)
    w_star = rng.standard_normal(D)
    u = rng.standard_normal(D)
    return w_star, u / np.linalg.norm(u)


def samples(n: int, w_star: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(w_star))).astype(np.float32)
    y = (x @ w_star + SIGMA * rng.standard_normal(n)).astype(np.float32)
    return x, y


# -- 1. the closed form, by Monte Carlo ----------------------------------------------------

@pytest.mark.parametrize("d,sigma,scale", [(8, 1.0, 1.0), (3, 0.0, 2.0), (16, 2.0, 0.5)])
def test_closed_form_matches_monte_carlo(d, sigma, scale):
    rng = np.random.default_rng(d)
    u = scale * rng.standard_normal(d)
    n = 400_000
    x = rng.standard_normal((n, d))
    eps = sigma * rng.standard_normal(n)
    grads = 2.0 * ((x @ u) - eps)[:, None] * x           # per-example gradients, (n, d)
    mean = grads.mean(0)
    g2_mc = float(mean @ mean)
    trace_mc = float(((grads - mean) ** 2).sum(1).mean())
    g2, trace = closed_form(u, sigma)
    assert g2_mc == pytest.approx(g2, rel=0.02)
    assert trace_mc == pytest.approx(trace, rel=0.02)
    assert trace / g2 == pytest.approx(d + 1 + d * sigma ** 2 / float(u @ u))


# -- 2. unbiased_estimates and the tracker, by hand ----------------------------------------

def test_unbiased_estimates_by_hand():
    # b_small=2, b_big=6: |G|^2 = (6*3 - 2*5)/4 = 2; S = (5 - 3)/(1/2 - 1/6) = 6
    g2, s = unbiased_estimates(5.0, 3.0, 2, 6)
    assert g2 == pytest.approx(2.0)
    assert s == pytest.approx(6.0)


def test_unbiased_estimates_invert_the_expectations():
    # E|g_B|^2 = |G|^2 + tr(Sigma)/B exactly; the estimator must return (|G|^2, tr(Sigma)).
    for g2, trace, bs, bb in [(4.0, 68.0, 32, 64), (0.5, 10.0, 1, 1000), (1e-3, 3.0, 16, 48)]:
        est = unbiased_estimates(g2 + trace / bs, g2 + trace / bb, bs, bb)
        assert est == pytest.approx((g2, trace), rel=1e-9)


@pytest.mark.parametrize("bs,bb", [(0, 4), (4, 4), (8, 4)])
def test_unbiased_estimates_reject_bad_sizes(bs, bb):
    with pytest.raises(ValueError, match=f"b_small={bs}, b_big={bb}"):
        unbiased_estimates(1.0, 1.0, bs, bb)


def test_tracker_bias_corrected_ema_by_hand():
    t = NoiseScaleTracker(b_small=2, b_big=6, beta=0.5)
    assert t.b_simple is None
    # step 1: (|G|^2, S) = (2, 6); bias-corrected EMA = the value itself
    assert t.update(5.0, 3.0, step=1) == pytest.approx(3.0)
    assert t.corrected == pytest.approx((2.0, 6.0))
    # step 2: small=10, big=4 -> |G|^2 = (24 - 20)/4 = 1, S = 6/(1/3) = 18
    # raw EMA: g2 = .5*(.5*2) + .5*1 = 1.0, s = .5*(.5*6) + .5*18 = 10.5; correction 1-.25 = .75
    value = t.update(10.0, 4.0, step=2)
    assert t.corrected == pytest.approx((1.0 / 0.75, 10.5 / 0.75))
    # the ratio of the averages (10.5), not the average of the per-step ratios 3 and 18
    # with the same weights ((.25 * 3 + .5 * 18) / .75 = 13)
    assert value == pytest.approx(10.5)
    assert t.trajectory == [(1, pytest.approx(3.0)), (2, pytest.approx(10.5))]


def test_tracker_ratio_of_averages_not_average_of_ratios():
    t = NoiseScaleTracker(b_small=1, b_big=3, beta=0.9)
    # by hand:
    # step a: small=3, big=5/3 -> g2 = (5 - 3)/2 = 1, s = (4/3)/(2/3) = 2      (ratio 2)
    # step b: small=21, big=9  -> g2 = (27 - 21)/2 = 3, s = 12/(2/3) = 18      (ratio 6)
    t.update(3.0, 5.0 / 3.0)
    t.update(21.0, 9.0)
    w1, w2 = 0.9 * 0.1, 0.1                    # EMA weights of the two steps (before correction)
    expected = (w1 * 2 + w2 * 18) / (w1 * 1 + w2 * 3)
    assert t.b_simple == pytest.approx(expected)
    assert t.b_simple != pytest.approx((w1 * 2 + w2 * 6) / (w1 + w2))


def test_tracker_none_while_gradient_estimate_not_positive():
    t = NoiseScaleTracker(b_small=2, b_big=4)
    # |G|^2 = (4*0 - 2*1)/2 = -1 < 0: no value yet (S = 1/(1/2 - 1/4) = 4)
    assert t.update(1.0, 0.0, step=1) is None
    assert t.trajectory == []
    # |G|^2 = (4*4 - 2*5)/2 = 3, S = 1/(1/4) = 4; EMA weights .99*.01 and .01 (correction cancels)
    expected = (0.0099 * 4 + 0.01 * 4) / (0.0099 * -1 + 0.01 * 3)
    assert t.update(5.0, 4.0, step=2) == pytest.approx(expected)
    assert t.trajectory == [(2, pytest.approx(expected))]


# -- 3. the real train step on the regression problem --------------------------------------

def measure_b_simple(backend_name: str, cpu_replicas: int | None, noise_splits: int,
                     global_batch: int = 64, steps: int = 800, beta: float = 0.999) -> dict:
    """Run make_train_step with lr 0 on fresh regression samples; return the tracker's numbers."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from distbatch.backends import create_backend
    backend, _ = create_backend(backend_name, cpu_replicas=cpu_replicas)
    import keras
    import tensorflow as tf

    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import StepOptions, make_train_step

    w_star, u = problem()
    x, y = samples(steps * global_batch, w_star, seed=1)
    plan = BatchPlan.derive(global_batch_size=global_batch, replicas=backend.num_replicas,
                            num_train_examples=len(x))
    with backend.scope():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
        optimizer = keras.optimizers.SGD(learning_rate=0.0)
        optimizer.build(model.trainable_variables)
    model.layers[0].kernel.assign((w_star + u).astype(np.float32)[:, None])
    backend.prepare(model, optimizer)

    def loss_fn(target, pred):  # per-example (w.x - y)^2
        return tf.square(pred[:, 0] - target)

    step = make_train_step(backend, model, optimizer, plan, loss_fn,
                           StepOptions(noise_scale=True, noise_splits=noise_splits))
    per_replica = global_batch // backend.num_replicas
    # consecutive elements go to local replicas 0..L-1: replica r of step t gets batch t*R + r
    iterator = iter(backend.distribute(
        lambda w, L: tf.data.Dataset.from_tensor_slices((x, y)).batch(per_replica)))
    tracker = NoiseScaleTracker(step.b_small, global_batch, beta=beta)
    for t in range(steps):
        out = step(iterator)
        tracker.update(float(out["small_sq"]), float(out["big_sq"]), t + 1)
    kernel = model.layers[0].kernel.numpy()[:, 0]
    g2, trace = tracker.corrected
    return {"b_simple": tracker.b_simple, "g2": g2, "trace": trace, "b_small": step.b_small,
            "weight_drift": float(np.max(np.abs(kernel - (w_star + u)))),
            "replicas": backend.num_replicas}


def _check(result: dict, expect_b_small: int) -> None:
    w_star, u = problem()
    g2, trace = closed_form(u, SIGMA)
    assert result["b_small"] == expect_b_small
    assert result["weight_drift"] < 1e-6           # lr 0: the weights did not move
    assert result["g2"] == pytest.approx(g2, rel=0.10)
    assert result["trace"] == pytest.approx(trace, rel=0.10)
    assert result["b_simple"] == pytest.approx(trace / g2, rel=0.10)


def test_train_step_recovers_b_simple_single_replica():
    result = measure_b_simple("single", None, noise_splits=2)
    _check(result, expect_b_small=32)


@pytest.mark.slow
def test_train_step_recovers_b_simple_two_mirrored_replicas(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import json, sys; sys.path.insert(0, %r); import test_noise_scale as t; "
            "print('RESULT', json.dumps(t.measure_b_simple('mirrored', 2, noise_splits=1)))" % here)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    _check(result, expect_b_small=32)


# -- 4. `distbatch recommend`: the pure logic, by tables ------------------------------------

POW2 = {32: 1000.0, 64: 1900.0, 128: 3500.0, 256: 6000.0, 512: 9000.0}


@pytest.mark.parametrize("x,expected", [
    (1, 1), (0.3, 1), (1.4, 1), (1.5, 2), (2.8, 2), (2.9, 4), (3, 4), (143, 128),
    (181, 128), (182, 256), (1000, 1024)])
def test_round_to_power_of_two(x, expected):
    # geometric midpoints: between 2 and 4 it is 2*sqrt(2) = 2.83; between 128 and 256, 181.02
    assert rec_mod.round_to_power_of_two(x) == expected


@pytest.mark.parametrize("b_simple,throughputs,replicas,batch,fragment", [
    (143.0, POW2, 1, 128, "rounded to the power of two 128"),
    (90.0, POW2, 1, 64, "rounded to the power of two 64"),       # log2 90 = 6.49
    (10.0, POW2, 1, 32, "below the smallest measured batch 32"),
    (5000.0, POW2, 1, 512, "above the largest batch that ran here (512)"),
    # 512 ran out of memory: 256 is the largest feasible batch
    (600.0, {**POW2, 512: None}, 1, 256, "above the largest batch that ran here (256)"),
    # a batch above a failed one does not count as feasible
    (700.0, {**POW2, 256: None}, 1, 128, "(128)"),
    (100.0, {48: 1.0, 96: 2.0, 192: 3.0}, 3, 126, "multiple of 3 replicas (126)"),
    (40.0, {16: 1.0, 32: 1.0, 64: 1.0}, 4, 32, "power of two 32"),
])
def test_recommend_batch_table(b_simple, throughputs, replicas, batch, fragment):
    rec = rec_mod.recommend_batch(b_simple, throughputs, replicas=replicas)
    assert rec.global_batch_size == batch
    assert fragment in rec.reason
    assert [r["global_batch_size"] for r in rec.rows] == sorted(throughputs)


@pytest.mark.parametrize("b_simple", [None, 0.0, -3.0, float("nan"), float("inf")])
def test_recommend_batch_rejects_bad_noise_scale(b_simple):
    with pytest.raises(UsageError, match=f"got {b_simple!r}"):
        rec_mod.recommend_batch(b_simple, POW2)


def test_recommend_batch_rejects_nothing_ran():
    with pytest.raises(UsageError, match="no batch size ran"):
        rec_mod.recommend_batch(50.0, {32: None, 64: None})


@pytest.mark.parametrize("batch,b_crit", [(1, 1), (32, 143.0), (4096, 17.0), (17.0, 17.0)])
def test_tradeoff_hyperbola(batch, b_crit):
    steps, examples = rec_mod.tradeoff(batch, b_crit)
    assert (steps - 1) * (examples - 1) == pytest.approx(1.0)
    assert steps == pytest.approx(1 + b_crit / batch)
    if batch == b_crit:
        assert (steps, examples) == (2.0, 2.0)


def test_rows_predict_time_from_throughput():
    bs = 100.0
    # hardware scales perfectly (T = 10 B): time ~ (B + B_noise)/B falls with B -> largest is fastest
    linear = rec_mod.recommend_batch(bs, {b: 10.0 * b for b in POW2})
    assert linear.fastest_batch_size == 512
    # throughput flat: time ~ B + B_noise grows with B -> smallest is fastest
    flat = rec_mod.recommend_batch(bs, {b: 500.0 for b in POW2})
    assert flat.fastest_batch_size == 32
    row = {r["global_batch_size"]: r for r in flat.rows}
    assert row[32]["time_vs_fastest"] == 1.0
    assert row[512]["time_vs_fastest"] == pytest.approx((512 + bs) / (32 + bs))
    assert row[128]["steps_vs_min"] == pytest.approx(1 + bs / 128)
    assert row[128]["examples_vs_min"] == pytest.approx(1 + 128 / bs)
    # a failed batch stays in the table without a time
    failed = rec_mod.recommend_batch(bs, {**POW2, 512: None})
    assert {r["global_batch_size"]: r["time_vs_fastest"] for r in failed.rows}[512] is None


@pytest.mark.parametrize("batch,base,epochs,steps,expected", [
    (32, 32, 10.0, None, {"warmup": "none"}),
    (16, 32, 10.0, None, {"warmup": "none"}),
    (256, 32, 90.0, None, {"warmup": "gradual", "warmup_epochs": 5.0}),
    (256, 32, None, None, {"warmup": "gradual", "warmup_epochs": 0.5556}),
    (256, 32, None, 900, {"warmup": "gradual", "warmup_steps": 50}),
])
def test_warmup_for(batch, base, epochs, steps, expected):
    assert rec_mod.warmup_for(batch, base, epochs=epochs, steps=steps) == expected


def test_suggested_command_exact():
    import argparse
    args = argparse.Namespace(dataset="mnist1d", model="mlp", optimizer="momentum", base_lr=0.05,
                              base_batch_size=32, scaling="linear", epochs=None, steps=900)
    assert recommend_cli.suggested_command(args, 256, {"warmup": "gradual", "warmup_steps": 50}) == [
        "distbatch", "train", "--dataset", "mnist1d", "--model", "mlp", "--global-batch-size", "256",
        "--optimizer", "momentum", "--base-lr", "0.05", "--base-batch-size", "32",
        "--scaling", "linear", "--warmup", "gradual", "--warmup-steps", "50", "--steps", "900",
        "--out", "runs/train-bs256"]
    args.steps, args.epochs = None, 20.0
    args.train_size, args.val_size, args.cpu_replicas, args.backend = 1000, 200, 2, "mirrored"
    args.weight_decay, args.exclude_bias_bn = 1e-4, False
    assert recommend_cli.suggested_command(args, 32, {"warmup": "none"})[-17:] == [
        "--warmup", "none", "--epochs", "20", "--backend", "mirrored", "--cpu-replicas", "2",
        "--train-size", "1000", "--val-size", "200", "--weight-decay", "0.0001", "--no-exclude-bias-bn",
        "--out", "runs/train-bs32"]


# -- 5. `distbatch recommend`, end to end -----------------------------------------------------

@pytest.mark.slow
def test_recommend_cli_end_to_end(tmp_path, dataset_cache):
    from conftest import load_summary, run_cli

    from distbatch.recipes.schedules import scaled_learning_rate
    out = tmp_path / "rec"
    proc = run_cli(["recommend", "--dataset", "mnist1d", "--train-size", "1000", "--val-size", "200",
                    "--noise-batch-size", "64", "--noise-steps", "96", "--batch-sizes", "32,64,128",
                    "--throughput-steps", "5", "--base-lr", "0.05", "--base-batch-size", "32",
                    "--epochs", "18", "--out", str(out)], timeout=240)
    with open(out / "recommendation.json") as f:
        result = json.load(f)
    noise = load_summary(out / "noise")
    assert noise["global_batch_size"] == 64 and noise["total_steps"] == 96
    assert result["b_simple"] == pytest.approx(noise["b_simple"])
    throughputs = {r["global_batch_size"]: r["samples_per_sec"] for r in result["rows"]}
    assert sorted(throughputs) == [32, 64, 128]
    for b, t in throughputs.items():
        assert t == pytest.approx(load_summary(out / "throughput" / f"bs{b}")["samples_per_sec"])
    again = rec_mod.recommend_batch(result["b_simple"], throughputs)
    assert result["global_batch_size"] == again.global_batch_size
    assert result["peak_lr"] == pytest.approx(
        scaled_learning_rate(0.05, 32, result["global_batch_size"], "linear"))
    assert result["command"][:2] == ["distbatch", "train"]
    command = result["command"]  # complete: pastes into `distbatch train` (tests/test_first_hour.py)
    assert command[command.index("--epochs") + 1] == "18" and command[-2] == "--out"
    assert f"Recommended global batch: {result['global_batch_size']}" in proc.stdout
    assert "(S/S_min - 1)(E/E_min - 1) = 1" in proc.stdout
    # a second run refuses to overwrite the recommendation
    again_proc = run_cli(["recommend", "--dataset", "mnist1d", "--train-size", "1000",
                          "--out", str(out)], check=False)
    assert again_proc.returncode == 2
    assert "recommendation.json" in again_proc.stderr


@pytest.mark.slow
def test_recommend_cli_bad_batch_is_one_line(tmp_path, dataset_cache):
    from conftest import run_cli
    proc = run_cli(["recommend", "--dataset", "mnist1d", "--train-size", "500", "--val-size", "100",
                    "--batch-sizes", "32,1024", "--out", str(tmp_path / "r")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distbatch: error: --batch-sizes 1024 is larger than the training set (500 examples)"]
    assert not (tmp_path / "r").exists()


def test_tracker_skips_non_finite_steps():
    # float16 loss scaling: an overflowed step has inf gradients and is skipped by the optimizer;
    # it must not turn the averages into inf/nan for the rest of the run.
    t = NoiseScaleTracker(b_small=2, b_big=6, beta=0.5)
    t.update(5.0, 3.0, step=1)
    assert t.update(float("inf"), 3.0, step=2) == pytest.approx(3.0)
    assert t.update(5.0, float("nan"), step=3) == pytest.approx(3.0)
    assert (t.steps, t.skipped) == (1, 2)
    assert t.update(10.0, 4.0, step=4) == pytest.approx(10.5)  # as if steps 2-3 never happened


@pytest.mark.parametrize("gb,splits,message", [
    (33, 2, "batch of 33 into 2 equal micro-batches; 33 is not divisible by 2 (global batch 33); "
            "try global_batch_size 32"),
    (32, 1, "needs two batch sizes"),
])
def test_train_step_rejects_unsplittable_batch(gb, splits, message):
    import keras

    from distbatch.backends.single import SingleBackend
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import StepOptions, make_train_step
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
    plan = BatchPlan.derive(global_batch_size=gb, replicas=1, num_train_examples=100)
    with pytest.raises(UsageError, match=re.escape(message)):
        make_train_step(SingleBackend(), model, keras.optimizers.SGD(0.0), plan,
                        options=StepOptions(noise_scale=True, noise_splits=splits))
