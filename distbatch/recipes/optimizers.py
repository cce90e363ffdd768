"""Optimizers for large-batch training, chosen by name.

Three things Keras 3 does not give us directly:

* :class:`MomentumSGD`: momentum SGD with an explicit ``momentum_correction``
  flag (Goyal et al. 2017, sec. 2.2) and COUPLED L2 weight decay
  (``g + wd * w`` enters the velocity, as in Goyal/Caffe2). Keras's own
  ``SGD`` is the uncorrected form and its ``weight_decay`` is decoupled.
* :class:`LARS` (You, Gitman, Ginsburg 2017, arXiv:1708.03888).
* Bias/normalization parameters excluded from weight decay in a way that is
  saved with the optimizer (Keras's ``exclude_from_weight_decay()`` is not in
  ``get_config`` and is lost by ``load_model``).

Which variables count as "bias or normalization": every trainable variable of
rank <= 1 (Dense/Conv biases, BatchNorm/LayerNorm gamma and beta, PReLU-free
scalars). Kernels and embeddings have rank >= 2. The rank test does not depend
on layer names, and on Keras's built-in layers it selects exactly the
variables named ``bias``, ``gamma`` and ``beta``. Variables named through
``optimizer.exclude_from_weight_decay(var_list=..., var_names=...)`` are
excluded as well.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from distbatch.choices import ADAPTIVE_OPTIMIZERS, OPTIMIZERS  # noqa: F401 - re-exported
from distbatch.errors import ParameterError


def is_bias_or_norm(variable) -> bool:
    """True for rank <= 1 variables: biases and normalization scales/offsets."""
    return len(variable.shape) <= 1


class _ExcludeBiasAndNorm:
    """Mixin: no weight decay (and, for LARS, no trust ratio) on rank <= 1 variables.

    Overrides ``Optimizer._use_weight_decay`` (what Keras's decoupled weight
    decay consults) and saves the flag in ``get_config``.
    """

    def __init__(self, *args, exclude_bias_and_norm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.exclude_bias_and_norm = bool(exclude_bias_and_norm)

    def _use_weight_decay(self, variable) -> bool:
        if self.exclude_bias_and_norm and is_bias_or_norm(variable):
            return False
        return super()._use_weight_decay(variable)

    def get_config(self) -> dict:
        config = super().get_config()
        config["exclude_bias_and_norm"] = self.exclude_bias_and_norm
        return config


def _check_unit_interval(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ParameterError(f"{{{name}}} must be in [0, 1), got {value!r}", name)
    return float(value)


def _check_weight_decay(value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ParameterError(f"{{weight_decay}} must be a finite number >= 0, got {value!r}", "weight_decay")
    return float(value)


@keras.saving.register_keras_serializable(package="distbatch")
class MomentumSGD(_ExcludeBiasAndNorm, keras.optimizers.Optimizer):
    """Momentum SGD with optional momentum correction and coupled L2 decay.

    With ``g = grad + wd * w`` (``wd = 0`` for excluded variables), ``m`` the
    momentum and ``lr_t`` the lr of step t, Goyal et al. 2017 (sec. 2.2)
    write two forms that agree while lr is fixed:

    * eq. (10), ``momentum_correction=False`` (the lr lives inside v; this is
      Keras's ``SGD`` and Caffe2's form)::

          v <- m * v + lr_t * g;   w <- w - v

    * corrected, ``momentum_correction=True``::

          v <- m * (lr_t / lr_{t-1}) * v + lr_t * g;   w <- w - v

      which is exactly eq. (9), the reference form with the velocity in
      gradient units, ``u <- m * u + g; w <- w - lr_t * u`` (``v = lr * u``).
      We store ``u`` and apply (9): identical numbers, and still defined when
      ``lr_{t-1} = 0`` (warmup from zero), where the ratio is not.

    Without correction a sudden lr increase (end of constant warmup, or
    every step of a gradual warmup) lets the old, small-lr history dominate
    too little; Goyal found correction important when ``lr_t >> lr_{t-1}``.

    Nesterov (``nesterov=True``): the step is ``lr_t * g + m * v`` (form 10)
    or ``lr_t * (g + m * u)`` (form 9), after the velocity update.
    ``momentum=0`` is plain SGD (both forms coincide). The velocity slots
    mean different things in the two forms: do not flip the flag when resuming.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        momentum_correction: bool = False,
        exclude_bias_and_norm: bool = True,
        name: str = "MomentumSGD",
        **kwargs,
    ):
        # Our decay is coupled (inside update_step); Keras's base class would
        # add a decoupled one whenever weight_decay is set, so it gets None.
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=None,
            exclude_bias_and_norm=exclude_bias_and_norm,
            **kwargs,
        )
        self.momentum = _check_unit_interval("momentum", momentum)
        self.nesterov = bool(nesterov)
        self.l2 = _check_weight_decay(weight_decay)
        self.momentum_correction = bool(momentum_correction)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = []
        if self.momentum:
            self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.l2 and self._use_weight_decay(variable):
            g = g + self.l2 * variable
        if not self.momentum:
            self.assign_sub(variable, lr * g)
            return
        # Python-float hyperparameters take the variable's dtype when multiplied
        # (ops.cast(0.9, "float64") would round through float32 first).
        m = self.momentum
        v = self.velocities[self._get_variable_index(variable)]
        if self.momentum_correction:  # eq. (9): v holds u, in gradient units
            self.assign(v, m * v + g)
            step = g + m * v if self.nesterov else v
            self.assign_sub(variable, lr * step)
        else:  # eq. (10): v holds lr * u
            self.assign(v, m * v + lr * g)
            step = lr * g + m * v if self.nesterov else v
            self.assign_sub(variable, step)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.l2,
            momentum_correction=self.momentum_correction,
        )
        return config


@keras.saving.register_keras_serializable(package="distbatch")
class LARS(_ExcludeBiasAndNorm, keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, arXiv:1708.03888).

    For each adapted variable ``w`` with gradient ``g`` (Algorithm 1):

        local_lr = eta * |w| / (|g| + wd * |w|)   (1 if |w| = 0 or |g| = 0)
        v <- m * v + lr_t * local_lr * (g + wd * w)
        w <- w - v

    ``|.|`` is the L2 norm of the whole variable ("layer"), ``eta`` the trust
    coefficient (paper: 0.001), ``lr_t`` the global lr (warmup + decay).
    Variables of rank <= 1 (biases, BatchNorm gamma/beta) are neither
    adapted nor decayed: ``v <- m * v + lr_t * g; w <- w - v``, as in the
    reference implementations (TF Model Garden ``LARS`` excludes them by
    name, NVIDIA's by dimension). ``exclude_bias_and_norm=False`` adapts and
    decays everything. Weight decay here is the paper's coupled L2.

    (Model Garden's ratio uses ``|g + wd * w|`` in the denominator; the paper's
    ``|g| + wd * |w|`` is what is implemented and tested here.)
    """

    def __init__(
        self,
        learning_rate=1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        exclude_bias_and_norm: bool = True,
        name: str = "LARS",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=None,  # coupled L2, applied in update_step
            exclude_bias_and_norm=exclude_bias_and_norm,
            **kwargs,
        )
        self.momentum = _check_unit_interval("momentum", momentum)
        self.l2 = _check_weight_decay(weight_decay)
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ParameterError(f"{{eta}} must be a finite number > 0, got {eta!r}", "eta")
        self.eta = float(eta)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        m = self.momentum  # Python floats: exact in the variable's dtype
        v = self.velocities[self._get_variable_index(variable)]
        if self._use_weight_decay(variable):  # adapted: not bias/norm
            wd = self.l2
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            ratio = ops.where(
                ops.logical_and(w_norm > 0, g_norm > 0),
                self.eta * w_norm / (g_norm + wd * w_norm),
                ops.ones_like(w_norm),
            )
            update = lr * ratio * (g + wd * variable)
        else:
            update = lr * g
        self.assign(v, m * v + update)
        self.assign_sub(variable, v)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.l2, eta=self.eta)
        return config


@keras.saving.register_keras_serializable(package="distbatch")
class AdamW(_ExcludeBiasAndNorm, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` (decoupled decay, Loshchilov & Hutter 2019)
    with bias/normalization excluded from decay, saved in the config."""


@keras.saving.register_keras_serializable(package="distbatch")
class Lamb(_ExcludeBiasAndNorm, keras.optimizers.Lamb):
    """``keras.optimizers.Lamb`` (You et al. 2019, arXiv:1904.00962) with
    bias/normalization excluded from weight decay, saved in the config.

    Keras's Lamb applies weight decay decoupled, ``w <- w - lr * wd * w``
    before the trust-ratio step, not inside the update as the paper does.
    """


def build_optimizer(
    name: str,
    learning_rate,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    exclude_bias_and_norm: bool = True,
    momentum_correction: bool = False,
    lars_eta: float = 0.001,
    beta_1: float | None = None,
    beta_2: float | None = None,
    epsilon: float | None = None,
) -> keras.optimizers.Optimizer:
    """Optimizer by name; ``learning_rate`` is a float or a LearningRateSchedule.

    * ``sgd``: :class:`MomentumSGD` with momentum 0.
    * ``momentum`` / ``nesterov``: :class:`MomentumSGD` (coupled L2 decay,
      optional ``momentum_correction``).
    * ``adam``: ``keras.optimizers.Adam``; weight decay is refused because
      Keras's is decoupled, which is AdamW: use ``adamw``.
    * ``adamw``: :class:`AdamW`; ``lamb``: :class:`Lamb` (Keras's).
    * ``lars``: :class:`LARS` with trust coefficient ``lars_eta``.

    ``beta_1``, ``beta_2``, ``epsilon`` (adam, adamw, lamb only; None keeps Keras's
    defaults 0.9, 0.999, 1e-7): what ``scaling="adaptive-sqrt"`` rescales
    (distbatch.recipes.adaptive).

    ``exclude_bias_and_norm`` keeps rank <= 1 variables out of weight decay
    (and out of LARS adaptation).
    """
    if name not in OPTIMIZERS:
        raise ParameterError(f"{{optimizer}} must be one of {', '.join(OPTIMIZERS)}, got {name!r}", "optimizer")
    weight_decay = _check_weight_decay(weight_decay)
    momentum = _check_unit_interval("momentum", momentum)
    if momentum_correction and name not in ("momentum", "nesterov"):
        raise ParameterError(
            f"{{momentum_correction}} applies to {{optimizer}} momentum or nesterov, got {name!r}",
            "momentum_correction", "optimizer")
    adaptive = {k: float(v) for k, v in (("beta_1", beta_1), ("beta_2", beta_2), ("epsilon", epsilon))
                if v is not None}
    if adaptive and name not in ADAPTIVE_OPTIMIZERS:
        raise ValueError(f"{', '.join(adaptive)} apply to adam, adamw and lamb, not {name!r}")
    if name in ("sgd", "momentum", "nesterov"):
        return MomentumSGD(
            learning_rate,
            momentum=0.0 if name == "sgd" else momentum,
            nesterov=name == "nesterov",
            weight_decay=weight_decay,
            momentum_correction=momentum_correction,
            exclude_bias_and_norm=exclude_bias_and_norm,
        )
    if name == "lars":
        return LARS(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=lars_eta,
            exclude_bias_and_norm=exclude_bias_and_norm,
        )
    if name == "adam":
        if weight_decay:
            raise ParameterError(
                f"{{optimizer}} adam takes no weight decay (Keras's is decoupled, i.e. AdamW), "
                f"got {{weight_decay}} {weight_decay:g}; use {{optimizer}} adamw",
                "optimizer", "weight_decay")
        return keras.optimizers.Adam(learning_rate, **adaptive)
    if name == "adamw":  # Keras's AdamW insists on a float weight decay
        return AdamW(learning_rate, weight_decay=weight_decay, exclude_bias_and_norm=exclude_bias_and_norm,
                     **adaptive)
    return Lamb(learning_rate, weight_decay=weight_decay or None, exclude_bias_and_norm=exclude_bias_and_norm,
                **adaptive)
