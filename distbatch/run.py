"""`distbatch train`: flags -> backend, data, batch plan, recipe, model -> Trainer -> files.

Order matters: everything a user can get wrong is checked before TensorFlow
does real work and before anything is written, so a bad flag costs seconds
and leaves no half-written output directory.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time

from distbatch import __version__
from distbatch.backends import BACKENDS
from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_json
from distbatch.models import MODELS

RUN_FILES = ("summary.json", "config.json", "model.keras")
MAX_EPOCHS = 1e6  # beyond this a run would not end (and inf/1e30 overflow the step count)
EXIT_DIVERGED = 3


def add_train_args(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Flags shared by `train` and `sweep` (the sweep sets the batch size per point)."""
    from distbatch.recipe_args import add_recipe_args
    g = parser.add_argument_group("run")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (default): horovod under horovodrun/mpirun, multiworker with "
                        "TF_CONFIG or Slurm, mirrored with several GPUs, else single")
    g.add_argument("--cpu-replicas", type=int, default=None, metavar="N",
                   help="mirrored on a machine without GPUs: split the CPU into N logical devices "
                        "(for testing and demos; no speed-up)")
    g.add_argument("--dataset", default="mnist1d",
                   help="mnist1d (default, generated offline), digits, synthetic[:HxWxC], mnist, "
                        "fashion_mnist, cifar10, cifar100, or a path (.npz, image dir, .tfrecord)")
    g.add_argument("--train-size", type=int, default=None, help="use this many training examples")
    g.add_argument("--val-size", type=int, default=None, help="use this many validation examples")
    g.add_argument("--model", default="mlp", choices=MODELS, help="named model (default: mlp)")
    if not sweep:
        g.add_argument("--global-batch-size", type=int, default=None,
                       help="examples per optimizer step, summed over all replicas "
                            "(required unless --batch-size-schedule gives it)")
        from distbatch.batch_schedule import add_batch_schedule_args
        add_batch_schedule_args(g)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="training length in epochs")
    length.add_argument("--steps", type=int, default=None, help="training length in steps")
    g.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the dataset generation/split (default 0)")
    g.add_argument("--accumulation-steps", type=int, default=1,
                   help="gradient accumulation: global = per_replica x replicas x K")
    g.add_argument("--mixed-precision", choices=("off", "float16", "bfloat16"), default="off",
                   help="keras.mixed_precision policy; float16 uses dynamic loss scaling")
    g.add_argument("--noise-scale", action="store_true",
                   help="estimate the gradient noise scale B_simple (McCandlish et al. 2018)")
    g.add_argument("--target-accuracy", type=float, default=None,
                   help="record steps/time until validation accuracy first reaches this")
    g.add_argument("--evals-per-epoch", type=int, default=1,
                   help="validation passes per epoch (finer steps-to-target; default 1)")
    g.add_argument("--early-stopping-metric", choices=("val_loss", "val_accuracy"), default=None)
    g.add_argument("--early-stopping-patience", type=int, default=5,
                   help="evaluations without improvement before stopping (default 5)")
    g.add_argument("--min-delta", type=float, default=0.0, help="minimum improvement (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="checkpoint every N steps (default 0: at every evaluation)")
    g.add_argument("--cluster-timeout", type=float, default=None, metavar="SECONDS",
                   help="multiworker: seconds to wait for every worker of the cluster to start before "
                        "stopping with the addresses that never came (default: "
                        "$DISTBATCH_CLUSTER_TIMEOUT or 120)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint (or finished points) in --out")
    g.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    g.add_argument("--out", required=not sweep, default=None if not sweep else "runs/sweep",
                   help="output directory")
    add_recipe_args(parser)


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks, before TensorFlow starts."""
    if getattr(args, "global_batch_size", None) is not None:
        require(args.global_batch_size >= 1,
                f"--global-batch-size must be a positive integer, got {args.global_batch_size}")
    if (hasattr(args, "batch_size_schedule") and args.global_batch_size is None
            and not args.batch_size_schedule):
        raise UsageError("--global-batch-size is required (or give --batch-size-schedule)")
    if getattr(args, "batch_size_schedule", None):
        from distbatch.batch_schedule import parse_batch_schedule
        last = parse_batch_schedule(args.batch_size_schedule)[-1][0]
        require(args.steps is None, f"--batch-size-schedule needs the length in --epochs (the "
                                    f"batch changes at epochs), got --steps {args.steps}")
        if args.epochs is not None:
            require(last < args.epochs, f"--batch-size-schedule point at epoch {last} is not "
                                        f"before the end of training (--epochs {args.epochs:g})")
    if args.epochs is None and args.steps is None:
        args.epochs = 10.0
    require(args.epochs is None or args.epochs > 0, f"--epochs must be > 0, got {args.epochs}")
    require(args.epochs is None or args.epochs <= MAX_EPOCHS,  # also inf; nan failed above
            f"--epochs must be at most {MAX_EPOCHS:g}, got {args.epochs}")
    require(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    require(args.accumulation_steps >= 1,
            f"--accumulation-steps must be >= 1, got {args.accumulation_steps}")
    require(args.base_lr > 0, f"--base-lr must be > 0, got {args.base_lr}")
    require(args.base_batch_size >= 1, f"--base-batch-size must be >= 1, got {args.base_batch_size}")
    for flag, seed in (("--seed", args.seed), ("--data-seed", args.data_seed)):
        require(0 <= seed < 2**32, f"{flag} must be an integer in [0, 2**32), got {seed}")
    for flag, size in (("--train-size", args.train_size), ("--val-size", args.val_size)):
        require(size is None or size >= 1, f"{flag} must be >= 1 examples, got {size}")
    require(math.isfinite(args.min_delta) and args.min_delta >= 0,
            f"--min-delta must be a finite number >= 0, got {args.min_delta}")
    from distbatch.recipe_args import validate_recipe_args
    validate_recipe_args(args)
    require(args.evals_per_epoch >= 1, f"--evals-per-epoch must be >= 1, got {args.evals_per_epoch}")
    require(args.early_stopping_patience >= 1,
            f"--early-stopping-patience must be >= 1, got {args.early_stopping_patience}")
    require(args.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    require(args.target_accuracy is None or 0 < args.target_accuracy <= 1,
            f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    require(args.cpu_replicas is None or args.cpu_replicas >= 1,
            f"--cpu-replicas must be >= 1, got {args.cpu_replicas}")
    require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other")
    from distbatch.cluster import resolve_cluster_timeout
    resolve_cluster_timeout(getattr(args, "cluster_timeout", None))


def check_out_dir(out: str, *, resume: bool, overwrite: bool, markers=RUN_FILES) -> None:
    """Refuse an output directory that holds another run, unless --resume/--overwrite."""
    if not os.path.exists(out):
        return
    require(os.path.isdir(out), f"--out {out!r} exists and is not a directory")
    found = [m for m in markers if os.path.exists(os.path.join(out, m))]
    if found and not (resume or overwrite):
        raise UsageError(f"--out {out!r} already holds a run ({', '.join(found)}); "
                         "pass --resume to continue it or --overwrite to replace it")


def machine_info(backend) -> dict:
    import tensorflow as tf
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "gpus": len(tf.config.list_physical_devices("GPU")),
            "tensorflow": tf.__version__, "distbatch": __version__,
            "backend": backend.describe()}


def set_precision(policy: str) -> None:
    import keras
    keras.mixed_precision.set_dtype_policy(
        {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[policy])


def train(args: argparse.Namespace, *, backend=None, data=None) -> tuple[dict, int]:
    """Run one training job from parsed flags; returns (summary, exit code).

    `backend` and `data` may be passed in (a sweep reuses them across points).
    """
    validate_args(args)
    check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    import keras

    from distbatch.backends import create_backend
    from distbatch.data import load_dataset
    from distbatch.models import build_model
    from distbatch.plan import BatchPlan
    from distbatch.recipe_args import build_recipe
    from distbatch.trainer import LoopOptions, Trainer

    reason = "given"
    if backend is None:
        backend, reason = create_backend(args.backend, cpu_replicas=args.cpu_replicas,
                                         cluster_timeout=args.cluster_timeout)
    if data is None:
        data = load_dataset(args.dataset, seed=args.data_seed, train_size=args.train_size,
                            val_size=args.val_size)
    batch_schedule = recipe_args = None
    if getattr(args, "batch_size_schedule", None):
        from distbatch.batch_schedule import schedule_from_args, schedule_recipe_args
        batch_schedule = schedule_from_args(args, replicas=backend.num_replicas,
                                            num_train_examples=len(data.x_train))
        args.global_batch_size = batch_schedule.first_plan.global_batch_size
        recipe_args = schedule_recipe_args(args, batch_schedule)
    plan = BatchPlan.derive(global_batch_size=args.global_batch_size, replicas=backend.num_replicas,
                            accumulation_steps=args.accumulation_steps,
                            num_train_examples=len(data.x_train))
    total_steps = (batch_schedule.total_steps if batch_schedule else
                   plan.total_steps(epochs=args.epochs, steps=args.steps))
    chief = backend.is_chief
    if args.noise_scale:  # checked here so a bad combination writes nothing
        from distbatch.step import check_noise_scale, noise_splits_for
        check_noise_scale(plan, noise_splits_for(plan))

    keras.utils.set_random_seed(args.seed)
    set_precision(args.mixed_precision)
    with backend.scope():
        model = build_model(args.model, data.input_shape, data.num_classes)
        optimizer, schedule, recipe = build_recipe(
            recipe_args or args, global_batch_size=plan.global_batch_size,
            steps_per_epoch=plan.steps_per_epoch, total_steps=total_steps)
        if args.mixed_precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Slots must exist before the first distributed step (Keras 3 + MirroredStrategy).
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)

    if args.resume:
        check_resume_matches(args, backend)
    if args.overwrite and chief:
        for name in RUN_FILES + ("tensorboard", "checkpoints"):
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    if chief:
        os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in sorted(vars(args).items()) if k != "func"}
    config.update(backend=backend.name, backend_reason=reason, replicas=backend.num_replicas,
                  plan=plan.as_dict(), total_steps=total_steps, recipe=recipe)
    if chief:
        atomic_write_json(os.path.join(args.out, "config.json"), config)
        print(f"distbatch: {backend.describe()} ({reason}); global batch {plan.global_batch_size} = "
              f"{plan.per_replica_batch_size} per replica x {plan.replicas} replicas x "
              f"{plan.accumulation_steps} accumulation; {plan.steps_per_epoch} steps/epoch, "
              f"{total_steps} steps; peak lr {recipe['peak_lr']:.4g}, warmup {recipe['warmup_steps']} "
              f"steps", file=sys.stderr, flush=True)

    options = LoopOptions(
        total_steps=total_steps, seed=args.seed, evals_per_epoch=args.evals_per_epoch,
        noise_scale=args.noise_scale, target_accuracy=args.target_accuracy,
        early_stopping_metric=args.early_stopping_metric,
        early_stopping_patience=args.early_stopping_patience, min_delta=args.min_delta,
        checkpoint_dir=os.path.join(args.out, "checkpoints"), checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        tensorboard_dir=getattr(args, "tensorboard_dir", None) or os.path.join(args.out, "tensorboard"),
        stop_at_target=getattr(args, "stop_at_target", False),
        noise_every=getattr(args, "noise_every", 8),
        verbose=getattr(args, "progress", True))
    started = time.time()
    say = chief and getattr(args, "progress", True)  # a sweep's points stay quiet
    if say:  # TensorFlow traces and compiles the step first: many seconds of silence otherwise
        print("distbatch: compiling the train step (the first step takes longer)...",
              file=sys.stderr, flush=True)
    try:
        if batch_schedule is not None:
            from distbatch.batch_schedule import run_schedule
            result = run_schedule(backend, model, optimizer, batch_schedule, data, options,
                                  learning_rate_fn=lambda s: float(schedule(s)))
        else:
            result = Trainer(backend, model, optimizer, plan, data, options,
                             learning_rate_fn=lambda s: float(schedule(s))).run()
    except Exception as e:  # out of memory -> one line with the failing batch and what to try
        from distbatch.probe import OutOfMemory, is_out_of_memory, oom_message
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(oom_message(plan)) from e
    write_rank_report(backend, result.metrics, model)

    summary = {
        "backend": backend.name, "replicas": plan.replicas, "workers": backend.num_workers,
        "global_batch_size": plan.global_batch_size,
        "per_replica_batch_size": plan.per_replica_batch_size,
        "accumulation_steps": plan.accumulation_steps, "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": total_steps, "seed": args.seed, "dataset": args.dataset, "model": args.model,
        "mixed_precision": args.mixed_precision,
        "distbatch_version": __version__, "tensorflow_version": _tf_version(),
        **recipe, **result.metrics,
        "generalization_gap": _gap(result.metrics),
        "target_accuracy": args.target_accuracy, "history": result.history, "started": started,
        "machine": machine_info(backend),
        **({"batch_size_schedule": batch_schedule.as_dict()} if batch_schedule else {}),
    }
    _save_model(model, args.out, backend)
    if chief:
        atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    if summary["diverged"]:
        if chief:
            print(f"distbatch: training diverged (loss not finite) at step {summary['diverged_step']}; "
                  f"lower --base-lr or add warmup. Summary in {args.out}/summary.json", file=sys.stderr)
        return summary, EXIT_DIVERGED
    if say:
        print(f"distbatch: done; wrote {output_listing(args.out)}", file=sys.stderr, flush=True)
    return summary, 0


def output_listing(out: str) -> str:
    """'OUT/ (summary.json, config.json, model.keras, checkpoints/, tensorboard/)': what is there."""
    names = [n for n in RUN_FILES if os.path.isfile(os.path.join(out, n))]
    names += [f"{n}/" for n in ("checkpoints", "tensorboard") if os.path.isdir(os.path.join(out, n))]
    return f"{os.path.join(out, '')} ({', '.join(names)})"


def write_rank_report(backend, metrics: dict, model) -> None:
    """If $DISTBATCH_RANK_REPORT names a directory, EVERY rank writes rank<i>.json (its own
    step count and early-stopping decision) and rank<i>.npz (its final weights) there.

    For tests and debugging of multi-process runs, where only the chief writes
    summary.json and model.keras: it shows whether all ranks ended identical.
    """
    directory = os.environ.get("DISTBATCH_RANK_REPORT")
    if not directory:
        return
    import numpy as np
    os.makedirs(directory, exist_ok=True)
    keys = ("steps", "best_step", "stopped_early", "restored_value", "val_loss", "diverged")
    atomic_write_json(os.path.join(directory, f"rank{backend.worker_index}.json"),
                      {"rank": backend.worker_index, **{k: metrics.get(k) for k in keys}})
    np.savez(os.path.join(directory, f"rank{backend.worker_index}.npz"), *model.get_weights())


# Flags that must not change when a run is resumed: they change the data order, the model,
# the batch arithmetic or the learning-rate schedule that the checkpoint belongs to.
RESUME_KEYS = ("dataset", "data_seed", "train_size", "val_size", "model", "global_batch_size",
               "accumulation_steps", "seed", "epochs", "steps", "optimizer", "base_lr",
               "base_batch_size", "scaling", "warmup", "warmup_epochs", "warmup_steps", "decay",
               "momentum", "weight_decay", "mixed_precision", "replicas")


def check_resume_matches(args: argparse.Namespace, backend) -> None:
    """--resume with other flags than the checkpointed run would silently train something else."""
    path = os.path.join(args.out, "config.json")
    if not os.path.exists(path):
        return
    import json
    with open(path) as f:
        old = json.load(f)
    new = {**vars(args), "replicas": backend.num_replicas}
    for key in RESUME_KEYS:
        if key in old and old[key] != new.get(key):
            raise UsageError(f"--resume: {key.replace('_', '-')} is {new.get(key)!r} but the run in "
                             f"{args.out!r} used {old[key]!r}; resume with the same flags or use "
                             "another --out")


def _gap(m: dict):
    if m.get("train_accuracy") is None or m.get("val_accuracy") is None:
        return None
    return m["train_accuracy"] - m["val_accuracy"]


def _tf_version() -> str:
    import tensorflow as tf
    return tf.__version__


def _save_model(model, out: str, backend) -> None:
    """Chief writes out/model.keras; other multiworker workers save to a temp dir (TF needs all)."""
    if backend.is_chief:
        tmp = os.path.join(out, ".model.keras.tmp.keras")
        model.save(tmp)
        os.replace(tmp, os.path.join(out, "model.keras"))
    elif backend.name == "multiworker":
        d = tempfile.mkdtemp(prefix=f"distbatch-w{backend.worker_index}-")
        model.save(os.path.join(d, "model.keras"))
        shutil.rmtree(d, ignore_errors=True)
