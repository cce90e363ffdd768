"""AdaScale SGD (Johnson, Agrawal, Gu, Guestrin, ICML 2020, arXiv:2007.05105).

A learning rate that adapts to the batch size, with no new hyperparameter.
With S = global batch / base batch (the batch the plain schedule lr_0(t) was
tuned for), each step t:

    sigma^2 = tr(Sigma) / b0        variance of one base-batch gradient
    mu^2    = |G|^2                 squared norm of the true gradient
    r_t     = (sigma^2 + mu^2) / (sigma^2 / S + mu^2)        1 <= r_t <= S
    lr_t    = r_t * lr_0(floor(tau_t))
    tau_t+1 = tau_t + r_t           "scale-invariant iterations"

and training ends when tau reaches T, the base batch's step budget (between
T/S and T optimizer steps). Early in training mu^2 dominates and r ~ 1 (no
warmup needed); as the gradient gets noisy r grows towards S (linear scaling).

tr(Sigma) and |G|^2 come from the same per-step statistics as the gradient
noise scale (distbatch.measure.noise: squared gradient norms at the micro-batch and at
the global batch, McCandlish et al. 2018's unbiased estimators), averaged by
bias-corrected exponential moving averages with theta = max(1 - S/1000, 0)
(the paper's choice); sigma^2 is clipped at >= 1e-6 and mu^2 at >= 0 before
averaging. With S = 1 the gain is exactly 1 and lr_t = lr_0(t).

With adam, adamw or lamb the lr factor is r_t ** 0.5 instead of r_t (lr_t = sqrt(r_t) *
lr_0(floor(tau_t)), the square-root rule of adaptive optimizers, distbatch.recipes.adaptive);
tau still advances by r_t.

The state lives in TensorFlow variables updated inside the train step, so
several steps per call, every backend, checkpoints and resume all see it.
Under tf.distribute the variables are sync-on-read (each replica updates its
own copy with identical all-reduced values; no extra communication).
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

SIGMA2_MIN = 1e-6


def gain(sigma2: float, mu2: float, scale: float) -> float:
    """r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) (AdaScale, eq. 2); plain floats, for tables."""
    if scale == 1:
        return 1.0
    return (sigma2 + mu2) / (sigma2 / scale + mu2)


def default_theta(scale: float) -> float:
    """The paper's averaging constant: theta = max(1 - S/1000, 0)."""
    return max(1.0 - scale / 1000.0, 0.0)


class AdaScaleState:
    """Gain, tau and the moving averages, as variables (create inside the backend's scope)."""

    def __init__(self, *, scale: float, base_batch_size: int, total_base_steps: int,
                 theta: float | None = None, always_measure: bool = False) -> None:
        """`always_measure`: keep the statistics even at S = 1 (the goodput-adaptive batch
        starts at the base batch and needs the noise scale to leave it)."""
        if not (math.isfinite(scale) and scale >= 1):
            raise ValueError(f"scale must be >= 1 (global batch / base batch), got {scale!r}")
        if total_base_steps < 1:
            raise ValueError(f"total_base_steps must be >= 1, got {total_base_steps!r}")
        self.base_batch_size = int(base_batch_size)
        self.total_base_steps = int(total_base_steps)
        self.always_measure = always_measure
        self._fixed_theta = theta

        def var(name, dtype=tf.float32, value=0.0):
            return tf.Variable(value, dtype=dtype, trainable=False, name=f"adascale_{name}",
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        # S and theta are variables so that an adaptive batch can change them between steps.
        self._scale = var("scale", value=float(scale))
        self._theta = var("theta", value=default_theta(scale) if theta is None else float(theta))
        self.scale = float(scale)
        self.tau = var("tau", tf.float64)
        self.gain = var("gain", value=1.0)
        self.ema_sigma2 = var("ema_sigma2")
        self.ema_mu2 = var("ema_mu2")
        self.count = var("count")   # averaged steps, for the bias correction
        self.checkpoint = tf.train.Checkpoint(tau=self.tau, gain=self.gain, ema_sigma2=self.ema_sigma2,
                                              ema_mu2=self.ema_mu2, count=self.count,
                                              scale=self._scale, theta=self._theta)

    @property
    def needs_statistics(self) -> bool:
        return self.scale != 1 or self.always_measure

    @property
    def theta(self) -> float:
        return float(self._theta.numpy())

    def set_scale(self, scale: float) -> None:
        """A new global batch: S = batch / base batch (theta follows unless it was given)."""
        if not (math.isfinite(scale) and scale >= 1):
            raise ValueError(f"scale must be >= 1 (global batch / base batch), got {scale!r}")
        self.scale = float(scale)
        self._scale.assign(self.scale)
        self._theta.assign(default_theta(scale) if self._fixed_theta is None else self._fixed_theta)

    def noise_scale(self) -> float | None:
        """B_simple = tr(Sigma) / |G|^2 from the averages (sigma^2 = tr(Sigma) / b0); None
        before the first measured step."""
        mu2 = float(self.ema_mu2.numpy())
        if float(self.count.numpy()) == 0 or mu2 <= 0:
            return None
        return float(self.ema_sigma2.numpy()) * self.base_batch_size / mu2

    def update_gain(self, small_sq, big_sq, b_small: int, b_big: int):
        """Fold one step's squared norms into the averages; set and return the gain r_t.

        small_sq: mean squared norm of the b_small-example gradients; big_sq: squared norm of
        the b_big-example (global) gradient. A step with non-finite norms (float16 overflow)
        leaves the averages as they are.
        """
        if not self.needs_statistics:
            return self.gain.read_value()
        big_sq, small_sq = tf.cast(big_sq, tf.float32), tf.cast(small_sq, tf.float32)
        tr_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        mu2 = tf.maximum((b_big * big_sq - b_small * small_sq) / (b_big - b_small), 0.0)
        sigma2 = tf.maximum(tr_sigma / self.base_batch_size, SIGMA2_MIN)
        ok = tf.logical_and(tf.math.is_finite(sigma2), tf.math.is_finite(mu2))
        th, scale = tf.identity(self._theta), tf.identity(self._scale)
        ema_s = tf.where(ok, th * self.ema_sigma2 + (1 - th) * sigma2, self.ema_sigma2)
        ema_m = tf.where(ok, th * self.ema_mu2 + (1 - th) * mu2, self.ema_mu2)
        count = self.count + tf.cast(ok, tf.float32)
        correction = tf.where(th > 0, 1.0 - tf.pow(th, count), 1.0)
        s2, m2 = ema_s / correction, ema_m / correction
        r = tf.clip_by_value((s2 + m2) / (s2 / scale + m2), 1.0, scale)
        r = tf.where(count > 0, r, 1.0)
        self.ema_sigma2.assign(ema_s)
        self.ema_mu2.assign(ema_m)
        self.count.assign(count)
        self.gain.assign(r)
        return r

    def advance(self):
        """tau += r_t, after the update that used lr_0(floor(tau_t))."""
        return self.tau.assign_add(tf.cast(self.gain, tf.float64))

    def finished(self):
        return self.tau >= float(self.total_base_steps)


@keras.saving.register_keras_serializable(package="distbatch")
class AdaScaleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr = gain ** lr_exponent * base(floor(tau)): the optimizer's step counter is ignored
    (tau replaces it; tau advances by the gain itself whatever the exponent).

    ``lr_exponent`` is 1 for the SGD family (the paper) and 0.5 for adam/adamw/lamb
    (distbatch.recipes.adaptive.adascale_lr_exponent: the square-root rule of adaptive
    optimizers). Serialises as the base schedule's config plus S and the exponent; a loaded
    copy has no live state and then returns base(step) (gain 1), which is what continuing at
    the base batch means.
    """

    def __init__(self, base, state: AdaScaleState | None = None, scale: float = 1.0,
                 lr_exponent: float = 1.0):
        if not (isinstance(lr_exponent, (int, float)) and 0 < lr_exponent <= 1):
            raise ValueError(f"lr_exponent must be in (0, 1], got {lr_exponent!r}")
        self.base = base
        self.state = state
        self.scale = float(state.scale if state is not None else scale)
        self.lr_exponent = float(lr_exponent)

    def __call__(self, step):
        if self.state is None:
            return self.base(step)
        tau = tf.cast(tf.floor(self.state.tau), tf.float32)
        factor = tf.cast(self.state.gain, tf.float32)
        if self.lr_exponent != 1.0:
            factor = tf.pow(factor, self.lr_exponent)
        return factor * tf.cast(self.base(tau), tf.float32)

    def get_config(self) -> dict:
        return {"base": keras.saving.serialize_keras_object(self.base), "scale": self.scale,
                "lr_exponent": self.lr_exponent}

    @classmethod
    def from_config(cls, config: dict) -> "AdaScaleSchedule":
        # A model saved before the exponent existed used the linear gain.
        return cls(keras.saving.deserialize_keras_object(config["base"]), scale=config["scale"],
                   lr_exponent=config.get("lr_exponent", 1.0))
