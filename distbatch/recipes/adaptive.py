"""Large-batch rules for adaptive optimizers (adam, adamw, lamb).

``scaling="adaptive-sqrt"``: the square-root scaling rule of Malladi, Lyu, Panigrahi and
Arora 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms" (NeurIPS 2022,
arXiv:2205.10287). Adam's stochastic differential equation stays the same when the batch is
multiplied by ``k = global_batch / base_batch`` and, at the same number of epochs,

    lr      -> lr * sqrt(k)
    1 - b1  -> (1 - b1) * k            b1 -> 1 - k (1 - b1)
    1 - b2  -> (1 - b2) * k            b2 -> 1 - k (1 - b2)
    eps     -> eps / sqrt(k)

(eps shrinks because the preconditioner sqrt(v) shrinks by sqrt(k) with the gradient
noise.) The betas leave their valid range [0, 1) once ``k (1 - b) > 1``: Adam's default
b1 = 0.9 does so past k = 10, b2 = 0.999 past k = 1000. Such a beta is CAPPED at
``BETA_MIN = 0`` (no averaging of that moment: b1 = 0 is RMSprop's update, b2 = 0 divides
by |g|) and named in :attr:`AdaptiveScaling.capped`; past the cap the SDE argument no
longer holds, and the run's summary says so. lr and eps stay valid for every k > 0 and
are never capped.

``scaling="adascale"`` with one of these optimizers multiplies the lr by ``gain ** 0.5``
instead of ``gain`` (:func:`adascale_lr_exponent`): the square-root counterpart of
AdaScale's linear rule, as AdaptDL's AdamScale does; tau still advances by the gain.

Pure Python (no TensorFlow): the Recipe calls it while building the optimizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from distbatch.choices import ADAPTIVE_OPTIMIZERS

# keras.optimizers.Adam / AdamW / Lamb's own defaults (Keras 3; tests/test_adaptive_scaling.py
# checks them against the signatures): the betas and eps a base-batch run uses.
KERAS_DEFAULTS = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
BETA_MIN = 0.0  # the floor of a capped beta: the edge of [0, 1)


@dataclass(frozen=True)
class AdaptiveScaling:
    """Malladi's rule at one k: the lr factor, the effective hyperparameters, what was capped."""
    k: float
    lr_factor: float
    beta_1: float
    beta_2: float
    epsilon: float
    capped: tuple[str, ...]  # names of the betas the rule pushed below BETA_MIN

    def optimizer_kwargs(self) -> dict:
        return {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


def _scaled_beta(beta: float, k: float) -> tuple[float, bool]:
    """1 - k (1 - beta), floored at BETA_MIN; (value, capped)."""
    value = 1.0 - k * (1.0 - beta)
    if abs(value) < 1e-12:  # exactly 0 but for rounding (k = 10 at 0.9, 1000 at 0.999): not capped
        value = 0.0
    return (BETA_MIN, True) if value < BETA_MIN else (value, False)


def sde_scaling(k: float, *, beta_1: float = KERAS_DEFAULTS["beta_1"],
                beta_2: float = KERAS_DEFAULTS["beta_2"],
                epsilon: float = KERAS_DEFAULTS["epsilon"]) -> AdaptiveScaling:
    """Malladi et al.'s square-root rule for ``k = global batch / base batch`` from the base
    batch's ``beta_1``, ``beta_2``, ``epsilon`` (see the module docstring for the formula and
    the cap)::

        sde_scaling(4)   -> lr x 2,  beta_1 0.6, beta_2 0.996, epsilon 5e-8,  capped ()
        sde_scaling(32)  -> lr x 5.66, beta_1 0 (capped; the rule gives -2.2), beta_2 0.968
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (math.isfinite(k) and k > 0):
        raise ValueError(f"k (global batch / base batch) must be a finite number > 0, got {k!r}")
    for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not 0 <= beta < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    b1, capped_1 = _scaled_beta(beta_1, k)
    b2, capped_2 = _scaled_beta(beta_2, k)
    capped = tuple(name for name, c in (("beta_1", capped_1), ("beta_2", capped_2)) if c)
    return AdaptiveScaling(k=float(k), lr_factor=math.sqrt(k), beta_1=b1, beta_2=b2,
                           epsilon=epsilon / math.sqrt(k), capped=capped)


def adascale_lr_exponent(optimizer: str) -> float:
    """AdaScale's lr = gain ** p x schedule(tau): p = 0.5 for adam/adamw/lamb, 1 for SGD family.

    An adaptive optimizer divides by sqrt(v), which already shrinks as the batch grows, so the
    linear rule's gain would overshoot; the square-root rule (Malladi et al. 2022) is what keeps
    its dynamics, and AdaptDL's AdamScale uses the same square root of the gain.
    """
    return 0.5 if optimizer in ADAPTIVE_OPTIMIZERS else 1.0
