"""`distbatch recommend`: measure the gradient noise scale and the throughput,
then suggest a global batch size with its learning rate and warmup.

The measurements are short training jobs (distbatch.training.job) derived from
one TrainConfig; the model of the trade-off and the choice are
distbatch.measure.recommend.
"""
from __future__ import annotations

import argparse
import os
import sys

from distbatch.cli.train import add_train_args, config_from_args
from distbatch.errors import require
from distbatch.fileio import atomic_write_json
from distbatch.measure.recommend import format_report, recommend_batch, warmup_for
from distbatch.outdir import check_out_dir, claim_out_dir
from distbatch.training.config import TrainConfig

DEFAULT_BATCHES = "32,64,128,256,512"
RECOMMENDATION_NAME = "recommendation.json"
# Written by suggested_command itself (or meaningless for a new run), never copied from the flags.
_NOT_COPIED = {"global_batch_size", "max_global_batch_size", "batch_size_schedule", "epochs", "steps", "warmup", "warmup_epochs",
               "warmup_steps", "out", "resume", "overwrite", "help"}


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
        cmd += ["--epochs", f"{10.0 if epochs is None else epochs:g}"]
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


def add_recommend_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend", help="measure the gradient noise scale and throughput; suggest a global batch",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-batch-size", type=int, default=64,
                   help="global batch of the noise-scale run (default 64; a moderate batch)")
    p.add_argument("--noise-steps", type=int, default=300,
                   help="steps of the noise-scale run (default 300)")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                   help=f"global batches whose throughput is measured (default {DEFAULT_BATCHES})")
    p.add_argument("--throughput-steps", type=int, default=30,
                   help="steps per throughput run; the first (compiling) step is not timed (default 30)")
    add_train_args(p, sweep=True)
    p.set_defaults(func=run_recommend, out="runs/recommend")
    for action in p._actions:  # --epochs/--steps here describe the PLANNED run (warmup, command)
        if action.dest == "epochs":
            action.help = "planned length of the real run, for the suggested warmup (default 10)"
        elif action.dest == "steps":
            action.help = "planned length of the real run in steps (instead of --epochs)"


def _sub_config(base: TrainConfig, batch: int, steps: int, out: str, noise: bool) -> TrainConfig:
    """One short measuring run; checkpoint_every=steps: one checkpoint at the end, not at
    every evaluation."""
    return base.replace(global_batch_size=batch, steps=steps, epochs=None, noise_scale=noise,
                        out=out, progress=False, target_accuracy=None, early_stopping_metric=None,
                        resume=False, overwrite=True, checkpoint_every=steps)


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
    summary, code = train(_sub_config(base, args.noise_batch_size, args.noise_steps, noise_out, True),
                          backend=backend, data=data)
    if code == EXIT_DIVERGED:
        say("distbatch recommend: the noise-scale run diverged; lower --base-lr or add warmup")
        return EXIT_DIVERGED
    b_simple = summary.get("b_simple")
    say(f"distbatch recommend: B_simple = {b_simple if b_simple is None else round(b_simple, 2)} "
        f"(val accuracy {summary.get('val_accuracy')})")

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
    lr = scaled_learning_rate(args.base_lr, args.base_batch_size, rec.global_batch_size, args.scaling)
    warmup = warmup_for(rec.global_batch_size, args.base_batch_size, epochs=args.epochs,
                        steps=args.steps)
    command = suggested_command(args, rec.global_batch_size, warmup)
    result = {**rec.as_dict(), "peak_lr": lr, "scaling_rule": args.scaling,
              "base_lr": args.base_lr, "base_batch_size": args.base_batch_size, **warmup,
              "command": command,
              "noise_run": {"global_batch_size": args.noise_batch_size, "steps": args.noise_steps,
                            "b_simple_trajectory": summary.get("b_simple_trajectory"),
                            "val_accuracy": summary.get("val_accuracy")},
              "backend": backend.name, "replicas": backend.num_replicas, "dataset": args.dataset,
              "model": args.model}
    if chief:
        print(format_report(result))
        atomic_write_json(os.path.join(args.out, RECOMMENDATION_NAME), result)
    return 0
