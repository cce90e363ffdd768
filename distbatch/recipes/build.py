"""Building a Recipe for one run: its durations in steps, the lr schedule and the optimizer
(``Recipe.build``; this module uses Keras, distbatch/recipes/recipe.py does not).

Warmup and decay given in epochs (or, without them, Goyal et al.'s fractions of training)
become steps here, once; the peak lr follows the scaling rule; AdaScale wraps the schedule in
its gain; adam/adamw/lamb get Keras's betas and epsilon, rescaled under adaptive-sqrt.
"""
from __future__ import annotations

import math

import keras

from distbatch.choices import ADAPTIVE_OPTIMIZERS
from distbatch.errors import ParameterError, UsageError
from distbatch.recipes.adascale import AdaScaleSchedule
from distbatch.recipes.adaptive import KERAS_DEFAULTS, adascale_lr_exponent, sde_scaling
from distbatch.recipes.optimizers import build_optimizer
from distbatch.recipes.recipe import GOYAL_MILESTONE_FRACTIONS, GOYAL_WARMUP_FRACTION, Recipe
from distbatch.recipes.schedules import build_lr_schedule, epochs_to_steps, scaled_learning_rate


def build_recipe(
    recipe: Recipe,
    *,
    global_batch_size: int,
    steps_per_epoch: int,
    total_steps: int,
    adascale=None,
) -> tuple[keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule, dict]:
    """Optimizer, lr schedule and summary.json fields of `recipe` for one run (see
    :meth:`Recipe.build`, which calls this)."""
    rule = "none" if recipe.scaling == "adascale" else recipe.scaling
    if (adascale is None) != (rule == recipe.scaling):
        raise ValueError("Recipe.build: pass adascale= exactly when scaling is 'adascale'")
    peak_lr = scaled_learning_rate(recipe.base_lr, recipe.base_batch_size, global_batch_size, rule)
    adaptive = recipe.optimizer in ADAPTIVE_OPTIMIZERS
    sde = (sde_scaling(global_batch_size / recipe.base_batch_size)
           if recipe.scaling == "adaptive-sqrt" else None)
    hyper = sde.optimizer_kwargs() if sde else dict(KERAS_DEFAULTS) if adaptive else {}
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UsageError(f"total training steps must be an integer >= 1, got {total_steps!r}")

    if recipe.warmup == "none":
        warmup_steps = 0
    elif recipe.warmup_steps is not None:
        warmup_steps = recipe.warmup_steps
    elif recipe.warmup_epochs is not None:
        warmup_steps = epochs_to_steps(recipe.warmup_epochs, steps_per_epoch)
    else:
        warmup_steps = int(math.floor(total_steps * GOYAL_WARMUP_FRACTION + 0.5))
    if recipe.warmup_cap is not None and recipe.warmup != "none":  # a warmup that must stay short
        warmup_steps = min(warmup_steps, int(math.floor(total_steps * recipe.warmup_cap + 0.5)))
    if warmup_steps > total_steps:
        raise UsageError(f"warmup ({warmup_steps} steps) is longer than training "
                         f"({total_steps} steps)")

    start_lr = min(recipe.base_lr, peak_lr) if recipe.warmup_from == "base" else 0.0
    if recipe.warmup == "constant" and recipe.warmup_from == "zero" and warmup_steps:
        raise ParameterError("{warmup} constant with {warmup_from} zero would hold lr 0; use "
                             "{warmup_from} base", "warmup", "warmup_from")

    decay_steps: list[int] = []
    if recipe.decay == "step":
        if recipe.decay_epochs:
            decay_steps = [epochs_to_steps(e, steps_per_epoch) for e in recipe.decay_epochs]
        else:
            decay_steps = sorted({max(1, int(math.floor(total_steps * f + 0.5)))
                                  for f in GOYAL_MILESTONE_FRACTIONS})

    schedule = build_lr_schedule(
        peak_lr=peak_lr,
        start_lr=start_lr,
        total_steps=total_steps,
        warmup=recipe.warmup,
        warmup_steps=warmup_steps,
        decay=recipe.decay,
        decay_steps=decay_steps,
        decay_factor=recipe.decay_factor,
        end_lr=recipe.end_lr,
        power=recipe.decay_power,
    )
    if adascale is not None:
        schedule = AdaScaleSchedule(schedule, adascale,
                                    lr_exponent=adascale_lr_exponent(recipe.optimizer))
    optimizer = build_optimizer(
        recipe.optimizer,
        schedule,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        exclude_bias_and_norm=recipe.exclude_bias_bn,
        momentum_correction=recipe.momentum_correction,
        lars_eta=recipe.lars_eta,
        **hyper,
    )
    uses_momentum = recipe.optimizer in ("momentum", "nesterov", "lars")
    summary = {
        "optimizer": recipe.optimizer,
        "base_lr": float(recipe.base_lr),
        "base_batch_size": int(recipe.base_batch_size),
        "scaling_rule": recipe.scaling,
        "peak_lr": peak_lr,
        "warmup": recipe.warmup if warmup_steps else "none",
        "warmup_steps": warmup_steps,
        "warmup_start_lr": start_lr if warmup_steps else None,
        "decay": recipe.decay,
        "decay_steps": decay_steps,
        "decay_factor": float(recipe.decay_factor) if recipe.decay == "step" else None,
        "end_lr": float(recipe.end_lr) if recipe.decay in ("cosine", "linear") else None,
        "momentum": float(recipe.momentum) if uses_momentum else None,
        "momentum_correction": bool(recipe.momentum_correction),
        "weight_decay": float(recipe.weight_decay),
        "exclude_bias_bn": bool(recipe.exclude_bias_bn),
        "lars_eta": float(recipe.lars_eta) if recipe.optimizer == "lars" else None,
        # adam/adamw/lamb: the betas and epsilon the optimizer runs with (adaptive-sqrt's
        # rescaled ones), and the betas the rule pushed out of [0, 1) and capped at 0.
        **{name: hyper.get(name) for name in ("beta_1", "beta_2", "epsilon")},
        "scaling_capped": list(sde.capped) if sde else None,
        "adascale_lr_exponent": (adascale_lr_exponent(recipe.optimizer)
                                 if adascale is not None else None),
    }
    return optimizer, schedule, summary
