"""Command-line flags for the large-batch recipe (distbatch.recipes.recipe.Recipe).

``add_recipe_args(parser)`` adds the flags to ``distbatch train``;
``recipe_from_args(args)`` turns them into a Recipe, the only thing library code
sees. ``build_recipe(args, ...)`` is the two in one call, for scripts and tests
written against the flags. Defaults: see Recipe.
"""

from __future__ import annotations

import argparse

from distbatch.choices import DECAYS, OPTIMIZERS, SCALING_RULES, WARMUP_MODES
from distbatch.errors import ParameterError
from distbatch.cli.flags import flag_error
from distbatch.recipes.recipe import RECIPE_FIELDS, Recipe


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
                        "adaptive-sqrt (adam/adamw/lamb): Malladi et al. 2022, with k = global / "
                        "base batch: lr x sqrt(k), 1-beta1 and 1-beta2 x k (a beta below 0 is "
                        "capped at 0), epsilon / sqrt(k); "
                        "adascale: the lr adapts to the gradient noise (Johnson et al. 2020; by "
                        "gain ** 0.5 for adam/adamw/lamb), the "
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


def build_recipe(args: argparse.Namespace, *, global_batch_size: int, steps_per_epoch: int,
                 total_steps: int, adascale=None):
    """``recipe_from_args(args).build(...)`` with errors naming the flags (see Recipe.build)."""
    recipe = recipe_from_args(args)
    try:
        return recipe.build(global_batch_size=global_batch_size, steps_per_epoch=steps_per_epoch,
                            total_steps=total_steps, adascale=adascale)
    except ParameterError as e:
        raise flag_error(e) from None


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The Recipe the parsed recipe flags describe (errors name the flags).

    Fields the parser lacks keep their defaults (``warmup_cap`` is the sweep's).
    """
    values = {name: getattr(args, name) for name in RECIPE_FIELDS if hasattr(args, name)}
    try:
        return Recipe(**values)
    except ParameterError as e:
        raise flag_error(e) from None
