"""Learning-rate recipes for large batches: scaling rules, warmup, decay.

Everything here is a pure function of its arguments or a Keras
``LearningRateSchedule`` (a pure function of the optimizer step), so the
training code deals only in steps and the schedule can be logged, plotted and
saved inside a ``.keras`` model.

Conventions (see docs/recipes.md):

* Durations arrive as STEPS. Epochs are converted once, by
  :func:`epochs_to_steps`.
* The warmup wrapper passes the ABSOLUTE step to the schedule it wraps, because
  Goyal et al.'s decay milestones are absolute epochs (x0.1 at 30, 60, 80 of
  90, with the 5 warmup epochs counted inside them). Cosine and polynomial
  decay are therefore curves over ``[0, total_steps]``; the warmup ramp
  replaces their first ``warmup_steps`` and ends at their value there, so the
  schedule is continuous (TF Model Garden's ``LinearWarmup`` convention).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

from distbatch.choices import DECAYS, SCALING_RULES, WARMUP_MODES  # noqa: F401 - re-exported
from distbatch.errors import ParameterError, UsageError


def scaled_learning_rate(
    base_lr: float, base_batch_size: int, global_batch_size: int, rule: str
) -> float:
    """Peak learning rate for ``global_batch_size`` from one tuned at ``base_batch_size``.

    With ``k = global_batch_size / base_batch_size``:

    * ``linear``: ``lr = base_lr * k``. Goyal et al. 2017, "Accurate, Large
      Minibatch SGD: Training ImageNet in 1 Hour" (arXiv:1706.02677), sec. 2.1:
      k small steps of SGD ~ one step with a k-times larger batch when the lr
      is k times larger (0.1 per 256 images for ResNet-50).
    * ``sqrt``: ``lr = base_lr * sqrt(k)``. Krizhevsky 2014, "One weird trick
      for parallelizing CNNs" (arXiv:1404.5997); Hoffer et al. 2017, "Train
      longer, generalize better" (arXiv:1705.08741): keeps the covariance of
      the update constant. Goyal's Table measured it worse than linear at 8k.
    * ``adaptive-sqrt``: ``lr = base_lr * sqrt(k)``, the lr part of Malladi et al.
      2022's rule for Adam-family optimizers (arXiv:2205.10287), which also rescales
      the betas and epsilon (distbatch.recipes.adaptive.sde_scaling).
    * ``none``: ``lr = base_lr``.
    """
    if rule not in SCALING_RULES:
        raise ParameterError(f"{{rule}} must be one of {', '.join(SCALING_RULES)}, got {rule!r}", "rule")
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise ParameterError(f"{{base_lr}} must be a finite number > 0, got {base_lr!r}", "base_lr")
    for name, value in (("base_batch_size", base_batch_size), ("global_batch_size", global_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{{{name}}} must be an integer >= 1, got {value!r}", name)
    k = global_batch_size / base_batch_size
    if rule == "linear":
        return float(base_lr * k)
    if rule in ("sqrt", "adaptive-sqrt"):
        return float(base_lr * math.sqrt(k))
    return float(base_lr)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Convert a duration in (possibly fractional) epochs to whole optimizer steps.

    ``steps = floor(epochs * steps_per_epoch + 0.5)`` (round half up), so
    ``epochs_to_steps(5, 100) == 500`` and ``epochs_to_steps(0.25, 10) == 3``.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise UsageError(f"steps per epoch must be an integer >= 1, got {steps_per_epoch!r}")
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs >= 0):
        raise UsageError(f"a duration in epochs must be a finite number >= 0, got {epochs!r}")
    return int(math.floor(epochs * steps_per_epoch + 0.5))


@keras.saving.register_keras_serializable(package="distbatch")
class ConstantSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``lr(step) = learning_rate`` for every step.

    Keras has no constant schedule (``PiecewiseConstantDecay`` needs at least
    one boundary); this one lets "warmup then constant" be a schedule like the
    others.
    """

    def __init__(self, learning_rate: float, name: str = "ConstantSchedule"):
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.name = name

    def __call__(self, step):
        step = ops.convert_to_tensor(step)  # keeps graph/eager behaviour uniform
        return ops.cast(self.learning_rate, "float32") + ops.cast(step, "float32") * 0.0

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "name": self.name}


@keras.saving.register_keras_serializable(package="distbatch")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warmup over the first ``warmup_steps`` steps, then ``after_warmup(step)``.

    With ``W = warmup_steps``, ``s0 = start_lr``, ``inner = after_warmup`` and
    ``t`` the absolute optimizer step (0-based):

    * ``gradual``: ``lr(t) = s0 + (inner(W) - s0) * t / W`` for ``t < W``;
      a constant increment per step that reaches ``inner(W)`` at ``t = W``
      (Goyal et al. 2017, sec. 2.2, "gradual warmup", starting from the
      unscaled lr). ``inner(W)`` is the peak lr for constant/step schedules.
    * ``constant``: ``lr(t) = s0`` for ``t < W`` (Goyal's "constant warmup",
      which they found worse than none; kept for comparison studies).
    * ``lr(t) = inner(t)`` for ``t >= W`` in both modes: ``inner`` sees the
      ABSOLUTE step, so multi-step milestones stay absolute epochs.

    The wrapped schedule is serialized with ``keras.optimizers.schedules
    .serialize``, so nested schedules round-trip exactly through
    ``get_config``/``from_config`` and survive ``.keras`` save/load.
    """

    def __init__(
        self,
        after_warmup: keras.optimizers.schedules.LearningRateSchedule,
        warmup_steps: int,
        start_lr: float,
        mode: str = "gradual",
        name: str = "WarmupSchedule",
    ):
        super().__init__()
        if mode not in ("gradual", "constant"):
            raise UsageError(f"warmup mode must be 'gradual' or 'constant', got {mode!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise UsageError(f"warmup steps must be an integer >= 1, got {warmup_steps!r}")
        if not (math.isfinite(start_lr) and start_lr >= 0):
            raise UsageError(f"warmup start lr must be a finite number >= 0, got {start_lr!r}")
        if isinstance(after_warmup, dict):
            after_warmup = keras.optimizers.schedules.deserialize(after_warmup)
        if not isinstance(after_warmup, keras.optimizers.schedules.LearningRateSchedule):
            raise UsageError(
                f"after_warmup must be a keras LearningRateSchedule, got {type(after_warmup).__name__}"
            )
        self.after_warmup = after_warmup
        self.warmup_steps = warmup_steps
        self.start_lr = float(start_lr)
        self.mode = mode
        self.name = name

    def __call__(self, step):
        t = ops.cast(step, "float32")
        w = ops.cast(self.warmup_steps, "float32")
        after = ops.cast(self.after_warmup(step), "float32")
        start = ops.cast(self.start_lr, "float32")
        if self.mode == "gradual":
            target = ops.cast(self.after_warmup(self.warmup_steps), "float32")
            during = start + (target - start) * (t / w)
        else:
            during = start + 0.0 * t
        return ops.where(t < w, during, after)

    def get_config(self) -> dict:
        return {
            "after_warmup": keras.optimizers.schedules.serialize(self.after_warmup),
            "warmup_steps": self.warmup_steps,
            "start_lr": self.start_lr,
            "mode": self.mode,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> "WarmupSchedule":
        config = dict(config)
        config["after_warmup"] = keras.optimizers.schedules.deserialize(config["after_warmup"])
        return cls(**config)


def _decay_schedule(
    decay: str,
    *,
    peak_lr: float,
    total_steps: int,
    decay_steps: Sequence[int],
    decay_factor: float,
    end_lr: float,
    power: float,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The after-warmup schedule, using Keras's own schedules where they exist."""
    if decay == "constant":
        return ConstantSchedule(peak_lr)
    if decay == "cosine":
        # lr(t) = end + (peak - end) * 0.5 * (1 + cos(pi * min(t, T) / T))
        return keras.optimizers.schedules.CosineDecay(
            peak_lr, decay_steps=total_steps, alpha=end_lr / peak_lr
        )
    if decay == "linear":
        # lr(t) = (peak - end) * (1 - min(t, T) / T) ** power + end
        return keras.optimizers.schedules.PolynomialDecay(
            peak_lr, decay_steps=total_steps, end_learning_rate=end_lr, power=power
        )
    # step: lr(t) = peak * factor ** (number of milestones m with t >= m).
    # PiecewiseConstantDecay switches AFTER a boundary (t > b), so b = m - 1.
    milestones = list(decay_steps)
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[m - 1 for m in milestones],
        values=[peak_lr * decay_factor**i for i in range(len(milestones) + 1)],
    )


def build_lr_schedule(
    *,
    peak_lr: float,
    total_steps: int,
    start_lr: float = 0.0,
    warmup: str = "gradual",
    warmup_steps: int = 0,
    decay: str = "constant",
    decay_steps: Sequence[int] = (),
    decay_factor: float = 0.1,
    end_lr: float = 0.0,
    power: float = 1.0,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Build "warmup wrapping decay" from durations already given in steps.

    Args:
        peak_lr: lr reached after warmup (the scaled lr; see
            :func:`scaled_learning_rate`).
        total_steps: length of training in optimizer steps (cosine and linear
            decay reach ``end_lr`` there).
        start_lr: first warmup lr (Goyal: the unscaled base lr; or 0).
        warmup: "gradual", "constant" or "none". With ``warmup_steps == 0``
            "gradual"/"constant" mean no warmup.
        warmup_steps: warmup length in steps, ``<= total_steps``.
        decay: "constant", "cosine", "step" (x ``decay_factor`` at each of
            ``decay_steps``, absolute steps) or "linear" (polynomial with
            ``power``; 1.0 is linear).
        end_lr: final lr for cosine/linear decay, ``0 <= end_lr <= peak_lr``.

    Returns the after-warmup schedule itself when there is no warmup, else a
    :class:`WarmupSchedule` wrapping it.
    """
    if warmup not in WARMUP_MODES:
        raise ParameterError(f"{{warmup}} must be one of {', '.join(WARMUP_MODES)}, got {warmup!r}", "warmup")
    if decay not in DECAYS:
        raise ParameterError(f"{{decay}} must be one of {', '.join(DECAYS)}, got {decay!r}", "decay")
    if not (math.isfinite(peak_lr) and peak_lr > 0):
        raise UsageError(f"peak learning rate must be a finite number > 0, got {peak_lr!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UsageError(f"total training steps must be an integer >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise UsageError(f"warmup steps must be an integer >= 0, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise UsageError(
            f"warmup ({warmup_steps} steps) is longer than training ({total_steps} steps)"
        )
    if warmup == "none" and warmup_steps:
        raise ParameterError(f"{{warmup}} none takes no warmup length, got {warmup_steps} warmup steps",
                             "warmup")
    if warmup == "constant" and warmup_steps and start_lr <= 0:
        raise UsageError(f"constant warmup needs a start lr > 0 (it holds it), got {start_lr!r}")
    if not (math.isfinite(end_lr) and 0 <= end_lr <= peak_lr):
        raise ParameterError(f"{{end_lr}} must be in [0, peak lr {peak_lr:g}], got {end_lr!r}", "end_lr")
    if not (math.isfinite(power) and power > 0):
        raise ParameterError(f"{{power}} must be > 0, got {power!r}", "power")
    if decay == "step":
        if not (0 < decay_factor <= 1):
            raise ParameterError(f"{{decay_factor}} must be in (0, 1], got {decay_factor!r}", "decay_factor")
        steps = list(decay_steps)
        if not steps:
            raise ParameterError("{decay} step needs at least one milestone, got none", "decay")
        if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1 or steps[-1] > total_steps:
            raise UsageError(
                f"decay milestones must increase strictly within [1, {total_steps}] steps, got {steps}"
            )
    inner = _decay_schedule(
        decay,
        peak_lr=float(peak_lr),
        total_steps=total_steps,
        decay_steps=[int(s) for s in decay_steps],
        decay_factor=float(decay_factor),
        end_lr=float(end_lr),
        power=float(power),
    )
    if warmup == "none" or warmup_steps == 0:
        return inner
    return WarmupSchedule(inner, warmup_steps=warmup_steps, start_lr=float(start_lr), mode=warmup)
