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
(distbatch.step.make_train_step with noise_scale=True, learning rate 0 so the
weights stay at w) is run on fresh samples for many steps, its small_sq/big_sq
are fed to NoiseScaleTracker, and the estimate must land within 10% of the
closed form: on 1 replica (noise_splits=2) and on 2 mirrored replicas (2
logical CPUs, in a subprocess since logical devices are fixed per process).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from distbatch.noise import NoiseScaleTracker, unbiased_estimates

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
    assert t.update(1.0, 0.0, step=1) is None  # |G|^2 = (4*0 - 2*1)/2 = -1 < 0: no value yet
    assert t.trajectory == []
    # |G|^2 = (4*4 - 2*5)/2 = 3, S = 1/(1/4) = 4; EMA(|G|^2) = .99*.01*-1 + .01*3 > 0
    assert t.update(5.0, 4.0, step=2) == pytest.approx((0.99 * 0.01 * 0 + 0.01 * 4) / (0.99 * 0.01 * -1 + 0.01 * 3))


# -- 3. the real train step on the regression problem --------------------------------------

def measure_b_simple(backend_name: str, cpu_replicas: int | None, noise_splits: int,
                     global_batch: int = 64, steps: int = 1200, beta: float = 0.999) -> dict:
    """Run make_train_step with lr 0 on fresh regression samples; return the tracker's numbers."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from distbatch.backends import create_backend
    backend, _ = create_backend(backend_name, cpu_replicas=cpu_replicas)
    import keras
    import tensorflow as tf

    from distbatch.plan import BatchPlan
    from distbatch.step import StepOptions, make_train_step

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
