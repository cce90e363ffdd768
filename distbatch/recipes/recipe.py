"""The large-batch recipe as one frozen, validated object: ``distbatch.Recipe``.

    recipe = distbatch.Recipe(optimizer="momentum", base_lr=0.1, base_batch_size=256,
                              scaling="linear", warmup="gradual", warmup_epochs=5,
                              decay="cosine")
    optimizer, schedule, summary = recipe.build(global_batch_size=8192,
                                                steps_per_epoch=156, total_steps=156 * 90)

Every field is checked once, in ``__post_init__``, with errors that name the
FIELD ("base_lr must be a finite number > 0, got -1"); the CLI builds the same
object from its flags (distbatch.cli.recipe_flags.recipe_from_args) and shows the same error
with the flag in place of the field. :meth:`Recipe.build` adds what needs the run's batch
arithmetic and Keras: epochs become steps there, once (distbatch/recipes/build.py).

Defaults are Goyal et al. 2017's ImageNet recipe (momentum 0.9, linear
scaling, gradual warmup from the unscaled lr, x0.1 step decay) with its 90
epochs scaled to the run: without ``warmup_epochs``/``warmup_steps`` the
warmup is 5/90 of training; without ``decay_epochs`` the milestones are at
30/90, 60/90 and 80/90 of training. The base lr 0.05 at base batch 32 is a
starting point for the small offline datasets, not a tuned value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from distbatch.choices import ADAPTIVE_OPTIMIZERS, DECAYS, OPTIMIZERS, SCALING_RULES, WARMUP_MODES
from distbatch.errors import ParameterError

if TYPE_CHECKING:  # building a Recipe (and the CLI's --help) must not import TensorFlow
    
    import keras

# Goyal et al.: 5 warmup epochs, x0.1 at epochs 30, 60, 80, of 90.
GOYAL_WARMUP_FRACTION = 5 / 90
GOYAL_MILESTONE_FRACTIONS = (30 / 90, 60 / 90, 80 / 90)
SCALINGS = SCALING_RULES + ("adascale",)
WARMUP_FROM = ("base", "zero")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return value


def _in_range(name: str, value, low: float, high: float = math.inf, *,
              low_open: bool = False, high_open: bool = False) -> None:
    value = _number(name, value)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        interval = (("(" if low_open else "[") + f"{low:g}, " + ("inf)" if high == math.inf else
                    f"{high:g}" + (")" if high_open else "]")))
        raise ParameterError(f"{{{name}}} must be a finite number in {interval}, got {value}", name)


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ParameterError(f"{{{name}}} must be >= {low}, got {value}", name)


def _choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ParameterError(f"{{{name}}} must be one of {', '.join(choices)}, got {value!r}", name)


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def parse_epoch_list(value, name: str = "decay_epochs") -> tuple[float, ...] | None:
    """Milestones in epochs as a tuple of floats, from a sequence or "E1,E2,..." text.

    ``None`` and "" mean "no milestones given" (Goyal's defaults apply).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            values = tuple(float(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise ParameterError(f"{{{name}}} must be comma-separated numbers, got {value!r}",
                                 name) from None
    else:
        try:
            values = tuple(_number(name, v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of epochs or 'E1,E2,...', "
                            f"got {value!r}") from None
        values = tuple(float(v) for v in values)
    if not values:
        raise ParameterError(f"{{{name}}} must list at least one epoch, got {value!r}", name)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ParameterError(f"{{{name}}} must be finite epochs >= 0, got {value!r}", name)
    return values


@dataclass(frozen=True)
class Recipe:
    """Optimizer, lr scaling rule, warmup and decay of a large-batch run (docs/recipes.md).

    ``peak_lr = scaled_learning_rate(base_lr, base_batch_size, global_batch_size, scaling)``;
    warmup goes from ``min(base_lr, peak_lr)`` (``warmup_from="base"``) or 0 to it over
    ``warmup_epochs`` or ``warmup_steps`` (at most one; default 5/90 of training, capped
    at ``warmup_cap`` x training when that is set); then ``decay``. ``scaling="adascale"``:
    the lr adapts to the gradient noise (Johnson et al. 2020; pass ``adascale=`` to build),
    by gain ** 0.5 for adam/adamw/lamb. ``scaling="adaptive-sqrt"`` (adam/adamw/lamb only):
    Malladi et al. 2022's rule, lr x sqrt(k) and the betas and epsilon rescaled
    (distbatch.recipes.adaptive).
    """
    optimizer: str = "momentum"
    base_lr: float = 0.05
    base_batch_size: int = 32
    scaling: str = "linear"
    warmup: str = "gradual"
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    warmup_from: str = "base"
    decay: str = "step"
    decay_epochs: tuple[float, ...] | None = None
    decay_factor: float = 0.1
    end_lr: float = 0.0
    decay_power: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    exclude_bias_bn: bool = True
    momentum_correction: bool = False
    lars_eta: float = 0.001
    warmup_cap: float | None = None

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if not _number("base_lr", self.base_lr) > 0:  # also nan
            raise ParameterError(f"{{base_lr}} must be > 0, got {self.base_lr}", "base_lr")
        _in_range("base_lr", self.base_lr, 0, low_open=True)  # inf
        _integer("base_batch_size", self.base_batch_size, 1)
        _choice("scaling", self.scaling, SCALINGS)
        if self.scaling == "adaptive-sqrt" and self.optimizer not in ADAPTIVE_OPTIMIZERS:
            raise ParameterError(f"{{scaling}} adaptive-sqrt rescales the betas and epsilon of "
                                 f"{{optimizer}} {', '.join(ADAPTIVE_OPTIMIZERS)}, got {{optimizer}} "
                                 f"{self.optimizer}; use {{scaling}} linear or sqrt", "scaling", "optimizer")
        _choice("warmup", self.warmup, WARMUP_MODES)
        if self.warmup_epochs is not None:
            _in_range("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_steps is not None:
            _integer("warmup_steps", self.warmup_steps, 0)
        if self.warmup_epochs is not None and self.warmup_steps is not None:
            raise ParameterError(f"give {{warmup_epochs}} or {{warmup_steps}}, not both (got "
                                 f"{self.warmup_epochs} and {self.warmup_steps})",
                                 "warmup_epochs", "warmup_steps")
        _choice("warmup_from", self.warmup_from, WARMUP_FROM)
        _choice("decay", self.decay, DECAYS)
        object.__setattr__(self, "decay_epochs", parse_epoch_list(self.decay_epochs))
        _in_range("decay_factor", self.decay_factor, 0, 1, low_open=True)
        _in_range("end_lr", self.end_lr, 0)
        _in_range("decay_power", self.decay_power, 0, low_open=True)
        _in_range("momentum", self.momentum, 0, 1, high_open=True)
        _in_range("weight_decay", self.weight_decay, 0)
        _flag("exclude_bias_bn", self.exclude_bias_bn)
        _flag("momentum_correction", self.momentum_correction)
        _in_range("lars_eta", self.lars_eta, 0, low_open=True)
        if self.warmup_cap is not None:
            _in_range("warmup_cap", self.warmup_cap, 0, 1, low_open=True)

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` (validated again), like ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def build(
        self,
        *,
        global_batch_size: int,
        steps_per_epoch: int,
        total_steps: int,
        adascale=None,
    ) -> tuple[keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule, dict]:
        """Optimizer, lr schedule and summary.json fields for one run.

        All durations are converted to steps here. ``adascale`` (an AdaScaleState,
        exactly when ``scaling == "adascale"``): the arguments describe the BASE
        batch's run (global_batch_size = base batch, its steps per epoch and step
        budget); the optimizer then follows ``gain x schedule(tau)``
        (distbatch.recipes.adascale). The work is distbatch.recipes.build.build_recipe.
        """
        # Keras: a Recipe is made and checked without TensorFlow (the CLI's parsers and
        # TrainConfig use this module before TensorFlow loads); only building needs it.
        from distbatch.recipes.build import build_recipe
        return build_recipe(self, global_batch_size=global_batch_size,
                            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                            adascale=adascale)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
