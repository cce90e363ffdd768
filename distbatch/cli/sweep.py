"""`distbatch sweep`: train at each global batch size (and seed), one result row
per point, then the report.

This module is the command's flags only (no TensorFlow: it is imported to build the CLI's
help); the sweep itself is distbatch.measure.sweep.run_sweep (the same call from Python),
imported when the command runs. For each point the learning rate follows the scaling rule
from (--base-lr, --base-batch-size) and the warmup of the recipe flags; `--scaling
linear,adascale` compares rules, one set of points each, in one report with one
recommendation. `--resume` skips finished points and continues an interrupted one from its
last checkpoint. A diverged or out-of-memory point is recorded and the sweep goes on; a full,
read-only or unwritable disk stops it (exit 4, errors.EXIT_IO).

Budget: a fixed number of epochs (default), a fixed number of steps, or until
--target-accuracy (with --steps or --epochs as the cap). Fixed epochs give
small batches more optimizer steps; steps-to-target (Shallue et al. 2019) is
the fair comparison and is reported next to it.
"""
from __future__ import annotations

import argparse
import re

from distbatch.cli.train import add_train_args, config_from_args, record_of
from distbatch.errors import ParameterError, UsageError, require
# The library's names, also re-exported from here (benchmarks and tests import point_config,
# summary_to_row and the defaults from distbatch.cli.sweep).
from distbatch.measure.sweep_points import (  # noqa: F401
    DEFAULT_BATCH_SIZES, DEFAULT_EPOCHS, DEFAULT_OUT, DEFAULT_TARGET, DEFAULT_WARMUP_CAP,
    DEFAULT_WARMUP_EPOCHS, SWEEP_DEFAULTS, SWEEP_MARKERS, SWEEP_MAY_CHANGE, SWEEP_OUTPUTS,
    check_sweep, oom_row, point_config, summary_to_row)
from distbatch.cli.flags import FLAG_NAMES
from distbatch.recipes.recipe import SCALINGS
from distbatch.training.config import TrainConfig

DEFAULT_BATCHES = ",".join(map(str, DEFAULT_BATCH_SIZES))


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    require(bool(sizes), f"--batch-sizes must list at least one size, got {text!r}")
    bad = [s for s in sizes if s < 1]
    require(not bad, f"--batch-sizes must be positive, got {bad[0] if bad else ''}")
    require(len(set(sizes)) == len(sizes), f"--batch-sizes has duplicates: {text!r}")
    return sorted(sizes)


def parse_scalings(text: str) -> tuple[str, ...]:
    """argparse type of the sweep's --scaling: one or more rules, comma-separated."""
    rules = tuple(r.strip() for r in str(text).split(",") if r.strip())
    bad = [r for r in rules if r not in SCALINGS]
    if not rules or bad or len(set(rules)) != len(rules):
        raise argparse.ArgumentTypeError(f"must be one or more of {', '.join(SCALINGS)}, "
                                         f"comma-separated, without repeats; got {text!r}")
    return rules


def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train at several global batch sizes; rows, plots and a report",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                   help=f"global batch sizes (default {DEFAULT_BATCHES}: 32x)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per batch size (default 1)")
    p.add_argument("--stop-at-target", action="store_true",
                   help="stop each point when --target-accuracy is reached (budget: until target)")
    p.add_argument("--no-noise-scale", dest="noise_scale", action="store_false",
                   help="do not estimate the gradient noise scale (it is on by default in a sweep)")
    add_train_args(p, sweep=True)
    scaling = next(a for a in p._actions if a.dest == "scaling")
    scaling.choices, scaling.type, scaling.metavar = None, parse_scalings, "RULE[,RULE...]"
    scaling.help = (f"lr scaling rule(s), comma-separated, one set of points each, e.g. "
                    f"'linear,adascale' to compare them per batch ({', '.join(SCALINGS)}; default "
                    f"linear); adascale points run without warmup")
    for action in p._actions:  # the sweep's own warmup default (see DEFAULT_WARMUP_CAP)
        if action.dest == "warmup_epochs":
            action.help = (f"warmup length in epochs (sweep default: {DEFAULT_WARMUP_EPOCHS:g} epoch, "
                           f"capped at 1/{round(1 / DEFAULT_WARMUP_CAP)} of each point's training)")
    # The embedded default (distbatch.measure.sweep.SWEEP_DEFAULTS, measured in docs/sweep.md);
    # --help shows these values, not `distbatch train`'s.
    p.set_defaults(func=sweep_command, epochs=None, out=DEFAULT_OUT, **SWEEP_DEFAULTS)
    show_defaults(p, {
        "model": f"sweep default: {SWEEP_DEFAULTS['model']}",
        "epochs": f"sweep default: {DEFAULT_EPOCHS:g} epochs",
        "target_accuracy": f"sweep default: {SWEEP_DEFAULTS['target_accuracy']:g}",
        "evals_per_epoch": f"sweep default: {SWEEP_DEFAULTS['evals_per_epoch']}",
        "out": f"sweep default: {DEFAULT_OUT}",
        "noise_scale": "on by default in a sweep; --no-noise-scale turns it off"})


def show_defaults(parser: argparse.ArgumentParser, texts: dict) -> None:
    """Replace the '(default ...)' part of each named flag's help (written for `distbatch
    train`) with the command's own default."""
    for action in parser._actions:
        if action.dest in texts and action.option_strings and action.help:
            if action.dest == "noise_scale" and action.option_strings != ["--noise-scale"]:
                continue
            text = re.sub(r";\s*default:?[^()]*\)", ")", action.help)  # "(finer ...; default 1)"
            text = re.sub(r"\s*\(default:?[^()]*\)", "", text).rstrip()  # "(default: mlp)"
            action.help = f"{text} ({texts[action.dest]})"


def validate_sweep_args(args: argparse.Namespace) -> tuple[list[int], TrainConfig]:
    """Every check of the sweep's flags that needs no TensorFlow: the batch sizes and the
    TrainConfig every point is derived from (at the first batch and scaling rule)."""
    batches = parse_batch_sizes(args.batch_sizes)
    require(args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}")
    changes = {"global_batch_size": batches[0], "scaling": args.scaling[0]}
    if args.epochs is None and args.steps is None:
        changes["epochs"] = DEFAULT_EPOCHS
    if args.warmup_epochs is None and args.warmup_steps is None:
        # Recorded in config.json (warmup_epochs, warmup_cap) and per point as warmup_steps.
        changes.update(warmup_epochs=DEFAULT_WARMUP_EPOCHS, warmup_cap=DEFAULT_WARMUP_CAP)
    base = config_from_args(args, **changes)
    try:
        check_sweep(base, batches, args.scaling, args.seeds)
    except ParameterError as e:
        raise e.for_flags({"scalings": "--scaling"}) from None
    return batches, base


def sweep_flags(args: argparse.Namespace, base: TrainConfig) -> dict:
    """The sweep's config.json flags, as before: the points' common ones (those the sweep has a
    flag for, its first batch and its warmup cap) and the sweep's own."""
    common = {k: v for k, v in base.as_flags().items()
              if hasattr(args, k) or k in ("global_batch_size", "warmup_cap")}
    return {**common, **record_of(args), "scaling": list(args.scaling),
            "batch_sizes": args.batch_sizes, "seeds": args.seeds,
            "stop_at_target": args.stop_at_target}


def sweep_command(args: argparse.Namespace) -> int:
    """`distbatch sweep`: the flags -> distbatch.measure.sweep.run_sweep (errors name the flags)."""
    batches, base = validate_sweep_args(args)
    from distbatch.measure.sweep import run_sweep  # the command's code (TensorFlow), when it runs
    try:
        run_sweep(base, batch_sizes=batches, scalings=args.scaling, seeds=args.seeds,
                  record=sweep_flags(args, base))
    except ParameterError as e:
        raise e.for_flags({**FLAG_NAMES, "scalings": "--scaling"}) from None
    return 0
