"""`distbatch recommend`'s measuring runs: the noise-scale run and one throughput run per
batch, then the recommendation, its report and recommendation.json.

The command's flags and pure parts are distbatch/cli/recommend.py (read without
TensorFlow to build the CLI's help); this module loads TensorFlow and is imported when the
command runs.
"""
from __future__ import annotations

import argparse
import os
import sys

from distbatch.backends import create_backend
from distbatch.cli.recommend import (RECOMMENDATION_NAME, suggested_command, suggested_warmup,
                                     validate_recommend_args)
from distbatch.cli.train import train
from distbatch.data.inputs import num_train_examples
from distbatch.errors import require
from distbatch.fileio import atomic_write_json
from distbatch.measure.oom import OutOfMemory
from distbatch.measure.recommend import format_report, recommend_batch
from distbatch.measure.results import value_at_step
from distbatch.measure.sweep_points import DEFAULT_WARMUP_CAP, DEFAULT_WARMUP_EPOCHS
from distbatch.outdir import check_out_dir, claim_out_dir
from distbatch.recipes.schedules import scaled_learning_rate
from distbatch.training.config import TrainConfig
from distbatch.training.job import EXIT_DIVERGED, load_data
from distbatch.training.plan import BatchPlan


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
        changes.update(warmup_epochs=DEFAULT_WARMUP_EPOCHS, warmup_cap=DEFAULT_WARMUP_CAP)
    return _sub_config(base, args.noise_batch_size, args.noise_steps, out, True).replace(
        decay="constant", target_accuracy=base.target_accuracy,
        stop_at_target=base.target_accuracy is not None, **changes)


def run_recommend(args: argparse.Namespace) -> int:
    batches, base = validate_recommend_args(args)
    check_out_dir(args.out, resume=False, overwrite=args.overwrite,
                  holds=(RECOMMENDATION_NAME,))
    require(not args.resume, "--resume does not apply to recommend (its runs are short)")

    backend, _ = create_backend(base.backend, cpu_replicas=base.cpu_replicas,
                                cluster_timeout=base.cluster_timeout,
                                stall_timeout=base.stall_timeout)
    data = load_data(base)
    units = backend.num_replicas * args.accumulation_steps
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
