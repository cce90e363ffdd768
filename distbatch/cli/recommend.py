"""`distbatch recommend`: measure the gradient noise scale and the throughput,
then suggest a global batch size with its learning rate and warmup.

The measurements are short training jobs (distbatch.training.job) derived from
one TrainConfig; the model of the trade-off and the choice are
distbatch.measure.recommend. The defaults (model, base lr and batch, decay, planned
length, warmup) are the default sweep's (distbatch.measure.sweep.SWEEP_DEFAULTS), so
recommend and `distbatch sweep` describe the same training.
"""
from __future__ import annotations

import argparse
import os
import sys

from distbatch.cli.train import add_train_args, config_from_args
from distbatch.errors import require
from distbatch.fileio import atomic_write_json
from distbatch.measure.recommend import format_report, recommend_batch, sweep_warmup_for
from distbatch.measure.sweep import DEFAULT_EPOCHS, SWEEP_DEFAULTS
from distbatch.outdir import check_out_dir, claim_out_dir
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
    p.set_defaults(func=run_recommend, out="runs/recommend", **shared)
    from distbatch.cli.sweep import show_defaults
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


def _sub_config(base: TrainConfig, batch: int, steps: int, out: str, noise: bool) -> TrainConfig:
    """One short measuring run; checkpoint_every=steps: one checkpoint at the end, not at
    every evaluation."""
    return base.replace(global_batch_size=batch, steps=steps, epochs=None, noise_scale=noise,
                        out=out, progress=False, target_accuracy=None, early_stopping_metric=None,
                        resume=False, overwrite=True, checkpoint_every=steps)


def _noise_config(base: TrainConfig, args: argparse.Namespace, out: str) -> TrainConfig:
    """The noise-scale run: the first --noise-steps of the planned run at the noise batch (its
    recipe, the sweep's warmup unless one is given, no decay yet: a 6-epoch cosine has barely
    moved after a few hundred steps, while squeezing it into them would anneal the weights and
    inflate B_simple), stopped when it reaches --target-accuracy."""
    changes = {}
    if base.recipe.warmup_epochs is None and base.recipe.warmup_steps is None:
        from distbatch.measure.sweep import DEFAULT_WARMUP_CAP, DEFAULT_WARMUP_EPOCHS
        changes.update(warmup_epochs=DEFAULT_WARMUP_EPOCHS, warmup_cap=DEFAULT_WARMUP_CAP)
    return _sub_config(base, args.noise_batch_size, args.noise_steps, out, True).replace(
        decay="constant", target_accuracy=base.target_accuracy,
        stop_at_target=base.target_accuracy is not None, **changes)


def validate_recommend_args(args: argparse.Namespace) -> tuple[list[int], TrainConfig]:
    """Every check of recommend's flags that needs no TensorFlow: the batch sizes and the
    TrainConfig its runs are derived from. ``args.epochs``/``args.steps`` stay the PLANNED
    run's (for the suggested warmup and command)."""
    from distbatch.cli.sweep import parse_batch_sizes
    batches = parse_batch_sizes(args.batch_sizes)
    require(args.noise_batch_size >= 2, f"--noise-batch-size must be >= 2, got {args.noise_batch_size}")
    require(args.noise_steps >= 10, f"--noise-steps must be >= 10, got {args.noise_steps}")
    require(args.throughput_steps >= 3, f"--throughput-steps must be >= 3, got {args.throughput_steps}")
    return batches, config_from_args(args, global_batch_size=args.noise_batch_size)


def run_recommend(args: argparse.Namespace) -> int:
    batches, base = validate_recommend_args(args)
    check_out_dir(args.out, resume=False, overwrite=args.overwrite,
                  holds=(RECOMMENDATION_NAME,))
    require(not args.resume, "--resume does not apply to recommend (its runs are short)")

    from distbatch.backends import create_backend
    from distbatch.training.plan import BatchPlan
    from distbatch.cli.train import train
    from distbatch.measure.oom import OutOfMemory
    from distbatch.recipes.schedules import scaled_learning_rate
    from distbatch.training.job import EXIT_DIVERGED, load_data

    backend, _ = create_backend(base.backend, cpu_replicas=base.cpu_replicas,
                                cluster_timeout=base.cluster_timeout,
                                stall_timeout=base.stall_timeout)
    data = load_data(base)
    units = backend.num_replicas * args.accumulation_steps
    from distbatch.data.inputs import num_train_examples
    n_train = num_train_examples(data, backend.num_workers)
    for flag, b in [("--noise-batch-size", args.noise_batch_size)] + [("--batch-sizes", b) for b in batches]:
        BatchPlan.derive(global_batch_size=b, replicas=backend.num_replicas,
                         accumulation_steps=args.accumulation_steps,
                         num_train_examples=n_train, flag=flag)
    if units == 1:
        require(args.noise_batch_size % 2 == 0,
                f"--noise-batch-size must be even on one replica (it is split in two), "
                f"got {args.noise_batch_size}")
    chief = backend.is_chief
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if chief else (lambda msg: None)

    if chief:  # its runs go in sub-directories, each replacing only its own files
        claim_out_dir(args.out, "recommend")
    say(f"distbatch recommend: {backend.describe()}; noise scale over {args.noise_steps} steps "
        f"at global batch {args.noise_batch_size}")
    noise_out = os.path.join(args.out, "noise")
    summary, code = train(_noise_config(base, args, noise_out), backend=backend, data=data)
    if code == EXIT_DIVERGED:
        say("distbatch recommend: the noise-scale run diverged; lower --base-lr or add warmup")
        return EXIT_DIVERGED
    from distbatch.measure.results import value_at_step
    reached = summary.get("steps_to_target")
    at_target = None if reached is None else value_at_step(summary.get("b_simple_trajectory"), reached)
    b_simple = at_target if at_target is not None else summary.get("b_simple")
    where = (f"at {100 * base.target_accuracy:g}% validation accuracy, step {reached}"
             if at_target is not None else f"at the end, val accuracy {summary.get('val_accuracy')}")
    say(f"distbatch recommend: B_simple = {b_simple if b_simple is None else round(b_simple, 2)} "
        f"({where})")

    throughputs: dict[int, float | None] = {}
    for b in batches:
        try:
            s, c = train(_sub_config(base, b, args.throughput_steps,
                                   os.path.join(args.out, "throughput", f"bs{b}"), False),
                         backend=backend, data=data)
            throughputs[b] = s.get("samples_per_sec") if c == 0 else None
        except OutOfMemory:
            throughputs[b] = None
        say(f"distbatch recommend: global batch {b}: "
            + (f"{throughputs[b]:,.0f} samples/s" if throughputs[b] else "did not run"))

    rec = recommend_batch(b_simple, throughputs, replicas=units)
    lr = (args.base_lr if args.scaling == "adascale" else  # AdaScale: x its gain while training
          scaled_learning_rate(args.base_lr, args.base_batch_size, rec.global_batch_size, args.scaling))
    warmup = suggested_warmup(args, rec.global_batch_size, n_train)
    command = suggested_command(args, rec.global_batch_size, warmup)
    result = {**rec.as_dict(), "peak_lr": lr, "scaling_rule": args.scaling,
              "base_lr": args.base_lr, "base_batch_size": args.base_batch_size, **warmup,
              "command": command,
              "noise_run": {"global_batch_size": args.noise_batch_size, "steps": args.noise_steps,
                            "steps_to_target": reached, "b_simple_at_target": at_target,
                            "b_simple_end": summary.get("b_simple"),
                            "target_accuracy": base.target_accuracy,
                            "b_simple_trajectory": summary.get("b_simple_trajectory"),
                            "val_accuracy": summary.get("val_accuracy")},
              "backend": backend.name, "replicas": backend.num_replicas, "dataset": args.dataset,
              "model": args.model}
    if chief:
        print(format_report(result))
        atomic_write_json(os.path.join(args.out, RECOMMENDATION_NAME), result)
    return 0
