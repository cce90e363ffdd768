"""`distbatch recommend`: measure the gradient noise scale and the throughput,
then suggest a global batch size with its learning rate and warmup.

The measurements are short training jobs (distbatch.training.job) derived from
one TrainConfig; the model of the trade-off and the choice are
distbatch.measure.recommend. The defaults (model, base lr and batch, decay, planned
length, warmup) are the default sweep's (distbatch.measure.sweep_points.SWEEP_DEFAULTS), so
recommend and `distbatch sweep` describe the same training.

This module is the command's flags and its pure parts (no TensorFlow: it is imported to
build the CLI's help); the measuring runs are distbatch/cli/recommend_run.py, imported when
the command runs.
"""
from __future__ import annotations

import argparse

from distbatch.cli.sweep import parse_batch_sizes, show_defaults
from distbatch.cli.train import add_train_args, config_from_args
from distbatch.errors import require
from distbatch.measure.recommend import sweep_warmup_for
from distbatch.measure.sweep_points import DEFAULT_EPOCHS, SWEEP_DEFAULTS
from distbatch.training.config import TrainConfig

DEFAULT_BATCHES = "32,64,128,256,512"
RECOMMENDATION_NAME = "recommendation.json"
# Written by suggested_command itself (or meaningless for a new run), never copied from the flags.
_NOT_COPIED = {"global_batch_size", "max_global_batch_size", "batch_size_schedule", "epochs", "steps", "warmup", "warmup_epochs",
               "warmup_steps", "out", "resume", "overwrite", "help",
               "elastic_commit_every"}  # an elastic job's setting, not the recommended run's


def _fmt(value) -> str:
    """A flag value as a user would type it: 20.0 -> '20', 0.05 -> '0.05'."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def suggested_command(args: argparse.Namespace, batch: int, warmup: dict) -> list[str]:
    """The complete `distbatch train` command line for the recommended batch (a pure function).

    Complete means it runs as pasted: the measured run's dataset, its sizes and seeds, the
    backend and every other `train` flag whose value differs from train's default are
    carried over (enumerated from train's own parser, so new flags are covered), plus
    the recommended batch, warmup, the planned length, and an --out directory.
    """
    train_parser = argparse.ArgumentParser(add_help=False)
    add_train_args(train_parser)
    cmd = ["distbatch", "train", "--dataset", str(args.dataset), "--model", str(args.model),
           "--global-batch-size", str(batch), "--optimizer", str(args.optimizer),
           "--base-lr", f"{args.base_lr:g}", "--base-batch-size", str(args.base_batch_size),
           "--scaling", str(args.scaling), "--warmup", warmup["warmup"]]
    if "warmup_epochs" in warmup:
        cmd += ["--warmup-epochs", f"{warmup['warmup_epochs']:g}"]
    if "warmup_steps" in warmup:
        cmd += ["--warmup-steps", str(warmup["warmup_steps"])]
    if getattr(args, "steps", None) is not None:
        cmd += ["--steps", str(args.steps)]
    else:
        epochs = getattr(args, "epochs", None)
        cmd += ["--epochs", f"{DEFAULT_EPOCHS if epochs is None else epochs:g}"]
    written = {"dataset", "model", "optimizer", "base_lr", "base_batch_size", "scaling"}
    for action in train_parser._actions:
        dest = action.dest
        if dest in _NOT_COPIED or dest in written or not action.option_strings or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value == action.default or value is None:
            continue
        written.add(dest)
        if action.nargs == 0:  # store_true / store_false: the flag itself says it
            cmd.append(action.option_strings[-1])
        else:
            cmd += [action.option_strings[-1], _fmt(value)]
    return cmd + ["--out", f"runs/train-bs{batch}"]


def suggested_warmup(args: argparse.Namespace, batch: int, num_train_examples: int) -> dict:
    """The warmup of the suggested run: the user's --warmup-epochs/--warmup-steps when given
    (and the lr is scaled up), else the default sweep's (measure.recommend.sweep_warmup_for)."""
    scaled_up = batch > args.base_batch_size and args.scaling != "adascale"
    if scaled_up and getattr(args, "warmup_epochs", None) is not None:
        return {"warmup": "gradual", "warmup_epochs": args.warmup_epochs}
    if scaled_up and getattr(args, "warmup_steps", None) is not None:
        return {"warmup": "gradual", "warmup_steps": args.warmup_steps}
    return sweep_warmup_for(batch, args.base_batch_size, epochs=args.epochs, steps=args.steps,
                            steps_per_epoch=max(1, num_train_examples // batch), scaling=args.scaling)


def add_recommend_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend", help="measure the gradient noise scale and throughput; suggest a global batch",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-batch-size", type=int, default=64,
                   help="global batch of the noise-scale run (default 64; a moderate batch)")
    p.add_argument("--noise-steps", type=int, default=600,
                   help="at most this many steps of the noise-scale run: the planned run's recipe "
                        "at constant lr after its warmup, stopped at --target-accuracy, where "
                        "B_simple is read as the sweep reads it (default 600)")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                   help=f"global batches whose throughput is measured (default {DEFAULT_BATCHES})")
    p.add_argument("--throughput-steps", type=int, default=30,
                   help="steps per throughput run; the first (compiling) step is not timed (default 30)")
    add_train_args(p, sweep=True)
    # The sweep's workload: the advice and the sweep's report are about the same training.
    shared = {k: SWEEP_DEFAULTS[k] for k in ("model", "base_lr", "base_batch_size", "decay",
                                             "target_accuracy")}
    p.set_defaults(func=recommend_command, out="runs/recommend", **shared)
    show_defaults(p, {"model": f"default: {shared['model']}, the sweep's",
                      "target_accuracy": f"default: {shared['target_accuracy']:g}, the sweep's; "
                                         "where the noise run reads B_simple",
                      "out": "default: runs/recommend"})
    for action in p._actions:  # --epochs/--steps here describe the PLANNED run (warmup, command)
        if action.dest == "epochs":
            action.help = (f"planned length of the real run, for the suggested warmup and command "
                           f"(default {DEFAULT_EPOCHS:g}, the sweep's)")
        elif action.dest == "steps":
            action.help = "planned length of the real run in steps (instead of --epochs)"
        elif action.dest in ("warmup_epochs", "warmup_steps"):
            action.help = (f"warmup of the suggested run in {action.dest.split('_')[1]} (default: "
                           "the sweep's, 1 epoch capped at 1/6 of the run, when the lr is scaled up)")


def validate_recommend_args(args: argparse.Namespace) -> tuple[list[int], TrainConfig]:
    """Every check of recommend's flags that needs no TensorFlow: the batch sizes and the
    TrainConfig its runs are derived from. ``args.epochs``/``args.steps`` stay the PLANNED
    run's (for the suggested warmup and command)."""
    batches = parse_batch_sizes(args.batch_sizes)
    require(args.noise_batch_size >= 2, f"--noise-batch-size must be >= 2, got {args.noise_batch_size}")
    require(args.noise_steps >= 10, f"--noise-steps must be >= 10, got {args.noise_steps}")
    require(args.throughput_steps >= 3, f"--throughput-steps must be >= 3, got {args.throughput_steps}")
    return batches, config_from_args(args, global_batch_size=args.noise_batch_size)


def recommend_command(args: argparse.Namespace) -> int:
    """`distbatch recommend`: the measuring runs (distbatch.cli.recommend_run)."""
    from distbatch.cli.recommend_run import run_recommend  # the command's code (TensorFlow), when it runs
    return run_recommend(args)
