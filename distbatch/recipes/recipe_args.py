"""Command-line flags for the large-batch recipe, and the one place they become objects.

``add_recipe_args(parser)`` adds the flags to ``distbatch train``;
``build_recipe(args, ...)`` turns the parsed flags plus the run's batch
arithmetic into (optimizer, lr schedule, summary fields). Epoch durations are
converted to steps here, once.

Defaults are Goyal et al. 2017's ImageNet recipe (momentum 0.9, linear
scaling, gradual warmup from the unscaled lr, x0.1 step decay) with its 90
epochs scaled to the run: without ``--warmup-epochs/--warmup-steps`` the
warmup is 5/90 of training; without ``--decay-epochs`` the milestones are at
30/90, 60/90 and 80/90 of training. The base lr 0.05 at base batch 32 is a
starting point for the small offline datasets, not a tuned value.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from distbatch.choices import DECAYS, OPTIMIZERS, SCALING_RULES, WARMUP_MODES
from distbatch.errors import UsageError

if TYPE_CHECKING:  # building the parser (and --help) must not import TensorFlow
    import keras

# Goyal et al.: 5 warmup epochs, x0.1 at epochs 30, 60, 80, of 90.
GOYAL_WARMUP_FRACTION = 5 / 90
GOYAL_MILESTONE_FRACTIONS = (30 / 90, 60 / 90, 80 / 90)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """Add the optimizer / lr-scaling / warmup / decay flags to ``parser``."""
    g = parser.add_argument_group("large-batch recipe (docs/recipes.md)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                   help="optimizer (default: momentum)")
    g.add_argument("--base-lr", type=float, default=0.05,
                   help="lr tuned at --base-batch-size (default: %(default)s)")
    g.add_argument("--base-batch-size", type=int, default=32,
                   help="batch size at which --base-lr was tuned (default: %(default)s)")
    g.add_argument("--scaling", choices=SCALING_RULES + ("adascale",), default="linear",
                   help="lr scaling rule for the global batch (default: linear, Goyal et al. 2017); "
                        "adascale: the lr adapts to the gradient noise (Johnson et al. 2020), the "
                        "length (--epochs/--steps) is counted at --base-batch-size and the run "
                        "ends when the scale-invariant step count reaches it")
    g.add_argument("--warmup", choices=WARMUP_MODES, default="gradual",
                   help="warmup mode (default: gradual)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--warmup-epochs", type=float, default=None,
                        help="warmup length in epochs (default: 5/90 of training)")
    length.add_argument("--warmup-steps", type=int, default=None,
                        help="warmup length in optimizer steps")
    g.add_argument("--warmup-from", choices=("base", "zero"), default="base",
                   help="warmup start lr: the unscaled --base-lr (Goyal) or 0 (default: base)")
    g.add_argument("--decay", choices=DECAYS, default="step",
                   help="lr decay after warmup (default: %(default)s)")
    g.add_argument("--decay-epochs", default=None, metavar="E1,E2,...",
                   help="step decay milestones in epochs (default: 30/90, 60/90, 80/90 of training)")
    g.add_argument("--decay-factor", type=float, default=0.1,
                   help="step decay multiplier per milestone (default: 0.1)")
    g.add_argument("--end-lr", type=float, default=0.0,
                   help="final lr of cosine/linear decay (default: 0)")
    g.add_argument("--decay-power", type=float, default=1.0,
                   help="power of --decay linear (polynomial decay; default: 1)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="momentum for momentum/nesterov/lars (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay; L2 for sgd/momentum/nesterov/lars, decoupled for adamw/lamb (default: 0)")
    g.add_argument("--no-exclude-bias-bn", dest="exclude_bias_bn", action="store_false",
                   help="also decay (and LARS-adapt) biases and normalization parameters")
    g.add_argument("--momentum-correction", action="store_true",
                   help="scale the velocity by lr_t/lr_{t-1} when the lr changes (Goyal sec. 2.2)")
    g.add_argument("--lars-eta", type=float, default=0.001,
                   help="LARS trust coefficient (default: 0.001)")


def _parse_epoch_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--decay-epochs must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"--decay-epochs must list at least one epoch, got {text!r}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UsageError(f"--decay-epochs must be finite epochs >= 0, got {text!r}")
    return values


def _in_range(value: float, flag: str, low: float, high: float = math.inf, *,
              low_open: bool = False, high_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        interval = (("(" if low_open else "[") + f"{low:g}, " + ("inf)" if high == math.inf else
                    f"{high:g}" + (")" if high_open else "]")))
        raise UsageError(f"{flag} must be a finite number in {interval}, got {value}")


def validate_recipe_args(args: argparse.Namespace) -> None:
    """The recipe's numeric flags, checked before TensorFlow starts (build_recipe re-checks
    what needs the run's step counts)."""
    _in_range(args.base_lr, "--base-lr", 0, low_open=True)
    _in_range(args.momentum, "--momentum", 0, 1, high_open=True)
    _in_range(args.weight_decay, "--weight-decay", 0)
    _in_range(args.decay_factor, "--decay-factor", 0, 1, low_open=True)
    _in_range(args.end_lr, "--end-lr", 0)
    _in_range(args.decay_power, "--decay-power", 0, low_open=True)
    _in_range(args.lars_eta, "--lars-eta", 0, low_open=True)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.warmup_epochs is not None:
        _in_range(args.warmup_epochs, "--warmup-epochs", 0)
    if args.decay_epochs:
        _parse_epoch_list(args.decay_epochs)


def build_recipe(
    args: argparse.Namespace,
    *,
    global_batch_size: int,
    steps_per_epoch: int,
    total_steps: int,
    adascale=None,
) -> tuple[keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule, dict]:
    """Optimizer, lr schedule and summary.json fields for one run.

    ``peak_lr = scaled_learning_rate(base_lr, base_batch_size,
    global_batch_size, scaling)``; warmup starts at ``min(base_lr, peak_lr)``
    (``--warmup-from base``; the min keeps a run below the base batch from
    warming DOWN) or 0. All durations are converted to steps here.

    ``adascale`` (an AdaScaleState, with ``args.scaling == "adascale"``): the
    arguments describe the BASE batch's run (global_batch_size = base batch,
    its steps per epoch and step budget); the optimizer then follows
    ``gain x schedule(tau)`` (distbatch.recipes.adascale).
    """
    from distbatch.recipes.optimizers import build_optimizer
    from distbatch.recipes.schedules import build_lr_schedule, epochs_to_steps, scaled_learning_rate

    rule = "none" if args.scaling == "adascale" else args.scaling
    if (adascale is None) != (rule == args.scaling):
        raise ValueError("build_recipe: pass adascale= exactly when args.scaling is 'adascale'")
    peak_lr = scaled_learning_rate(args.base_lr, args.base_batch_size, global_batch_size, rule)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UsageError(f"total training steps must be an integer >= 1, got {total_steps!r}")

    if args.warmup == "none":
        warmup_steps = 0
    elif args.warmup_steps is not None:
        if args.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
        warmup_steps = args.warmup_steps
    elif args.warmup_epochs is not None:
        if not (math.isfinite(args.warmup_epochs) and args.warmup_epochs >= 0):
            raise UsageError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
        warmup_steps = epochs_to_steps(args.warmup_epochs, steps_per_epoch)
    else:
        warmup_steps = int(math.floor(total_steps * GOYAL_WARMUP_FRACTION + 0.5))
    cap = getattr(args, "warmup_cap", None)  # a default warmup that must stay short (the sweep's)
    if cap is not None and args.warmup != "none":
        warmup_steps = min(warmup_steps, int(math.floor(total_steps * cap + 0.5)))
    if warmup_steps > total_steps:
        raise UsageError(f"warmup ({warmup_steps} steps) is longer than training ({total_steps} steps)")

    start_lr = min(args.base_lr, peak_lr) if args.warmup_from == "base" else 0.0
    if args.warmup == "constant" and args.warmup_from == "zero" and warmup_steps:
        raise UsageError("--warmup constant with --warmup-from zero would hold lr 0; use --warmup-from base")

    decay_steps: list[int] = []
    if args.decay == "step":
        if args.decay_epochs:
            decay_steps = [epochs_to_steps(e, steps_per_epoch) for e in _parse_epoch_list(args.decay_epochs)]
        else:
            decay_steps = sorted({max(1, int(math.floor(total_steps * f + 0.5))) for f in GOYAL_MILESTONE_FRACTIONS})

    schedule = build_lr_schedule(
        peak_lr=peak_lr,
        start_lr=start_lr,
        total_steps=total_steps,
        warmup=args.warmup,
        warmup_steps=warmup_steps,
        decay=args.decay,
        decay_steps=decay_steps,
        decay_factor=args.decay_factor,
        end_lr=args.end_lr,
        power=args.decay_power,
    )
    if adascale is not None:
        from distbatch.recipes.adascale import AdaScaleSchedule
        schedule = AdaScaleSchedule(schedule, adascale)
    optimizer = build_optimizer(
        args.optimizer,
        schedule,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        exclude_bias_and_norm=args.exclude_bias_bn,
        momentum_correction=args.momentum_correction,
        lars_eta=args.lars_eta,
    )
    uses_momentum = args.optimizer in ("momentum", "nesterov", "lars")
    summary = {
        "optimizer": args.optimizer,
        "base_lr": float(args.base_lr),
        "base_batch_size": int(args.base_batch_size),
        "scaling_rule": args.scaling,
        "peak_lr": peak_lr,
        "warmup": args.warmup if warmup_steps else "none",
        "warmup_steps": warmup_steps,
        "warmup_start_lr": start_lr if warmup_steps else None,
        "decay": args.decay,
        "decay_steps": decay_steps,
        "decay_factor": float(args.decay_factor) if args.decay == "step" else None,
        "end_lr": float(args.end_lr) if args.decay in ("cosine", "linear") else None,
        "momentum": float(args.momentum) if uses_momentum else None,
        "momentum_correction": bool(args.momentum_correction),
        "weight_decay": float(args.weight_decay),
        "exclude_bias_bn": bool(args.exclude_bias_bn),
        "lars_eta": float(args.lars_eta) if args.optimizer == "lars" else None,
    }
    return optimizer, schedule, summary
