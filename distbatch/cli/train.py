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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distbatch import __version__
from distbatch.backends import BACKENDS
from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_json, json_roundtrip
from distbatch.models import MODELS
from distbatch.outdir import check_out_dir, claim_out_dir

if TYPE_CHECKING:
    from distbatch.training.plan import BatchPlan

RUN_FILES = ("summary.json", "config.json", "model.keras")
RUN_OUTPUTS = RUN_FILES + ("tensorboard", "checkpoints")  # all --overwrite removes
MAX_EPOCHS = 1e6  # beyond this a run would not end (and inf/1e30 overflow the step count)
EXIT_DIVERGED = 3


def add_train_args(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Flags shared by `train` and `sweep` (the sweep sets the batch size per point)."""
    from distbatch.recipes.recipe_args import add_recipe_args
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
    g.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="number of classes (default: max label + 1, refused when most of those "
                        "classes never occur; give K to insist)")
    g.add_argument("--model", default="mlp", choices=MODELS, help="named model (default: mlp)")
    if not sweep:
        g.add_argument("--global-batch-size", type=global_batch_arg, default=None, metavar="N|auto",
                       help="examples per optimizer step, summed over all replicas "
                            "(required unless --batch-size-schedule gives it); auto: chosen "
                            "while training to maximise goodput (Pollux), up to "
                            "--max-global-batch-size, with --scaling adascale")
        g.add_argument("--max-global-batch-size", type=int, default=None, metavar="M",
                       help="largest batch --global-batch-size auto may choose")
        from distbatch.training.batch_schedule import add_batch_schedule_args
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
                   help="checkpoint every N steps (default 0: at evaluations, at most once a "
                        "minute, and at the end)")
    g.add_argument("--checkpoint-every-seconds", type=float, default=None, metavar="SECONDS",
                   help="also checkpoint when this many seconds passed since the last one (the "
                        "chief's clock, agreed by all workers at a step boundary); default 0 (off), "
                        "300 under `distbatch launch ... --max-restarts N`")
    g.add_argument("--steps-per-execution", type=steps_per_execution_arg, default="auto",
                   metavar="N|auto",
                   help="training steps run inside one tf.function call (default auto: enough "
                        "that a call takes ~0.2 s); evaluations and checkpoints land on the "
                        "same steps whatever N is")
    g.add_argument("--jit-compile", choices=("off", "on"), default="off",
                   help="XLA-compile the per-replica forward/backward pass (default off; "
                        "measured faster on one device, slower on mirrored and horovod: "
                        "docs/benchmarks.md)")
    g.add_argument("--cluster-timeout", type=float, default=None, metavar="SECONDS",
                   help="multiworker: seconds to wait for every worker of the cluster to start before "
                        "stopping with the addresses that never came (default: "
                        "$DISTBATCH_CLUSTER_TIMEOUT or 120)")
    add_comm_args(parser)
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint (or finished points) in --out")
    g.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    g.add_argument("--out", required=not sweep, default=None if not sweep else "runs/sweep",
                   help="output directory")
    add_recipe_args(parser)


def add_comm_args(parser: argparse.ArgumentParser) -> None:
    """Gradient communication: buckets, compression, MultiWorkerMirroredStrategy options
    (Horovod's fusion threshold and cycle time are `distbatch launch horovod` flags)."""
    from distbatch.training.step import GRAD_COMPRESSION
    g = parser.add_argument_group("communication (see docs/scaling.md)")
    g.add_argument("--bucket-mb", type=nonnegative_float_arg, default=0.0, metavar="MB",
                   help="all-reduce gradients in buckets of about MB megabytes, last layers first, "
                        "so communication can overlap the rest of backprop (default 0: one "
                        "all-reduce of all gradients; measured in docs/scaling.md)")
    g.add_argument("--grad-compression", choices=GRAD_COMPRESSION, default="none",
                   help="cast gradients to fp16/bf16 for the all-reduce only (halves the bytes; "
                        "the noise scale and AdaScale use uncompressed local norms; horovod: no bf16)")
    g.add_argument("--mwms-implementation", choices=("auto", "ring", "nccl"), default="auto",
                   help="multiworker collective implementation (default auto)")
    g.add_argument("--bytes-per-pack", type=int, default=0, metavar="BYTES",
                   help="multiworker: split all-reduces into packs of about BYTES (default 0: "
                        "TensorFlow's choice)")
    g.add_argument("--collective-timeout", type=float, default=None, metavar="SECONDS",
                   help="multiworker: fail a collective that takes longer than SECONDS "
                        "(default: wait forever)")


def collective_options(args: argparse.Namespace):
    """The MultiWorkerMirroredStrategy options the flags give (validated; UsageError)."""
    from distbatch.backends.strategy import CollectiveOptions
    return CollectiveOptions(implementation=getattr(args, "mwms_implementation", "auto"),
                             bytes_per_pack=getattr(args, "bytes_per_pack", 0),
                             timeout_seconds=getattr(args, "collective_timeout", None))


def nonnegative_float_arg(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def steps_per_execution_arg(text: str):
    """argparse type: a whole number >= 1 or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {text!r}")
    return value


def global_batch_arg(text: str):
    """argparse type: a whole number or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


def validate_adaptive(args: argparse.Namespace) -> None:
    """--global-batch-size auto: what it needs, checked before anything runs."""
    m = getattr(args, "max_global_batch_size", None)
    require(m is not None, "--global-batch-size auto needs --max-global-batch-size (the largest "
                           "batch it may choose)")
    require(m >= args.base_batch_size, f"--max-global-batch-size must be >= --base-batch-size "
                                       f"({args.base_batch_size}), got {m}")
    require(args.scaling == "adascale", f"--global-batch-size auto follows AdaScale's gain; add "
                                        f"--scaling adascale (got --scaling {args.scaling})")
    for flag, bad in (("--batch-size-schedule", getattr(args, "batch_size_schedule", None)),
                      ("--early-stopping-metric", args.early_stopping_metric),
                      ("--resume", args.resume)):
        require(not bad, f"--global-batch-size auto does not combine with {flag} yet")


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks, before TensorFlow starts."""
    if getattr(args, "global_batch_size", None) == "auto":
        validate_adaptive(args)
    elif getattr(args, "global_batch_size", None) is not None:
        require(args.global_batch_size >= 1,
                f"--global-batch-size must be a positive integer, got {args.global_batch_size}")
    if (hasattr(args, "batch_size_schedule") and args.global_batch_size is None
            and not args.batch_size_schedule):
        raise UsageError("--global-batch-size is required (or give --batch-size-schedule)")
    if getattr(args, "batch_size_schedule", None):
        from distbatch.training.batch_schedule import parse_batch_schedule
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
    for flag, seed in (("--seed", args.seed), ("--data-seed", args.data_seed)):
        require(0 <= seed < 2**32, f"{flag} must be an integer in [0, 2**32), got {seed}")
    for flag, size in (("--train-size", args.train_size), ("--val-size", args.val_size)):
        require(size is None or size >= 1, f"{flag} must be >= 1 examples, got {size}")
    require(math.isfinite(args.min_delta) and args.min_delta >= 0,
            f"--min-delta must be a finite number >= 0, got {args.min_delta}")
    from distbatch.recipes.recipe_args import validate_recipe_args
    validate_recipe_args(args)
    require(args.evals_per_epoch >= 1, f"--evals-per-epoch must be >= 1, got {args.evals_per_epoch}")
    require(args.early_stopping_patience >= 1,
            f"--early-stopping-patience must be >= 1, got {args.early_stopping_patience}")
    require(args.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    seconds = getattr(args, "checkpoint_every_seconds", None)
    require(seconds is None or (math.isfinite(seconds) and seconds >= 0),
            f"--checkpoint-every-seconds must be a finite number of seconds >= 0 (0: off), got {seconds}")
    collective_options(args)  # --bytes-per-pack, --collective-timeout: one-line errors
    require(args.target_accuracy is None or 0 < args.target_accuracy <= 1,
            f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    require(args.cpu_replicas is None or args.cpu_replicas >= 1,
            f"--cpu-replicas must be >= 1, got {args.cpu_replicas}")
    require(args.num_classes is None or args.num_classes >= 2,
            f"--num-classes must be >= 2, got {args.num_classes}")
    require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other")
    from distbatch.backends.cluster import resolve_cluster_timeout
    resolve_cluster_timeout(getattr(args, "cluster_timeout", None))


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


def load_data(args: argparse.Namespace):
    from distbatch.data.datasets import load_dataset
    extra = {} if args.num_classes is None else {"num_classes": args.num_classes}
    return load_dataset(args.dataset, seed=args.data_seed, train_size=args.train_size,
                        val_size=args.val_size, **extra)


@dataclass(frozen=True)
class RunPlan:
    plan: "BatchPlan"                 # the (first) global batch
    total_steps: int                  # AdaScale: the base batch's budget (an upper bound)
    batch_schedule: object = None     # batch_schedule.BatchSchedule
    recipe_args: object = None        # the flags the recipe is built from, if not the run's
    recipe_plan: "BatchPlan" = None   # the batch the lr schedule is written for
    adascale_scale: float | None = None
    candidates: list | None = None    # --global-batch-size auto


def plan_run(args: argparse.Namespace, backend, data, *, flag: str = "--global-batch-size"):
    """Every check that needs the backend and the data, before a model or a file exists:
    batch arithmetic, length, noise scale, model vs input shape, the recipe flags.

    Returns a RunPlan. A sweep calls it for every point before it writes anything.
    """
    from distbatch.models import check_model
    from distbatch.training.plan import BatchPlan
    from distbatch.recipes.recipe_args import build_recipe

    batch_schedule = recipe_args = None
    if getattr(args, "batch_size_schedule", None):
        from distbatch.training.batch_schedule import schedule_from_args, schedule_recipe_args
        batch_schedule = schedule_from_args(args, replicas=backend.num_replicas,
                                            num_train_examples=len(data.x_train))
        args.global_batch_size = batch_schedule.first_plan.global_batch_size
        recipe_args = schedule_recipe_args(args, batch_schedule)
    adaptive = args.global_batch_size == "auto"
    candidates = None
    if adaptive:  # the goodput-adaptive batch starts at the smallest candidate
        from distbatch.training.goodput import candidate_batches
        try:
            candidates = candidate_batches(args.base_batch_size, args.max_global_batch_size,
                                           units=backend.num_replicas * args.accumulation_steps,
                                           num_examples=len(data.x_train))
        except ValueError as e:
            raise UsageError(f"--global-batch-size auto: {e}") from None
    plan = BatchPlan.derive(global_batch_size=candidates[0] if adaptive else args.global_batch_size,
                            replicas=backend.num_replicas, accumulation_steps=args.accumulation_steps,
                            num_train_examples=len(data.x_train), flag=flag)
    total_steps = (batch_schedule.total_steps if batch_schedule else
                   plan.total_steps(epochs=args.epochs, steps=args.steps))
    recipe_plan = plan  # the batch the lr schedule is written for
    adascale_scale = None
    if args.scaling == "adascale":
        require(batch_schedule is None, "--scaling adascale adapts the lr to a fixed global batch; "
                                        "it does not combine with --batch-size-schedule")
        require(plan.global_batch_size >= args.base_batch_size,
                f"--scaling adascale needs --global-batch-size >= --base-batch-size "
                f"({args.base_batch_size}), got {plan.global_batch_size}")
        # The length is the BASE batch's; the run ends when tau reaches it (at most that many steps).
        recipe_plan = BatchPlan.derive(global_batch_size=args.base_batch_size, replicas=1,
                                       num_train_examples=len(data.x_train), flag="--base-batch-size")
        total_steps = recipe_plan.total_steps(epochs=args.epochs, steps=args.steps)
        adascale_scale = plan.global_batch_size / args.base_batch_size
    if args.noise_scale or (adascale_scale or 1) > 1:
        from distbatch.training.step import check_noise_scale, noise_splits_for
        check_noise_scale(plan, noise_splits_for(plan))
    check_model(args.model, data.input_shape)
    # Only to validate the recipe flags (e.g. --momentum 1.5); train builds the real
    # optimizer inside the backend's scope.
    check_args = recipe_args or args
    if adascale_scale is not None:  # AdaScale's schedule is the base batch's plain one
        check_args = argparse.Namespace(**{**vars(check_args), "scaling": "none"})
    build_recipe(check_args, global_batch_size=recipe_plan.global_batch_size,
                 steps_per_epoch=recipe_plan.steps_per_epoch, total_steps=total_steps)
    return RunPlan(plan, total_steps, batch_schedule, recipe_args, recipe_plan, adascale_scale,
                   candidates)


def train(args: argparse.Namespace, *, backend=None, data=None) -> tuple[dict, int]:
    """Run one training job from parsed flags; returns (summary, exit code).

    `backend` and `data` may be passed in (a sweep reuses them across points).
    """
    validate_args(args)
    check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite, holds=RUN_FILES)
    import keras

    from distbatch.backends import create_backend
    from distbatch.models import build_model
    from distbatch.training.preemption import checkpoint_seconds
    from distbatch.recipes.recipe_args import build_recipe
    from distbatch.training.trainer import LoopOptions, Trainer

    reason = "given"
    if backend is None:
        backend, reason = create_backend(args.backend, cpu_replicas=args.cpu_replicas,
                                         cluster_timeout=args.cluster_timeout,
                                         collective=collective_options(args))
    if data is None:
        data = load_data(args)
    rp = plan_run(args, backend, data)
    plan, total_steps, batch_schedule, recipe_args = rp.plan, rp.total_steps, rp.batch_schedule, rp.recipe_args
    recipe_plan, adascale_scale, candidates = rp.recipe_plan, rp.adascale_scale, rp.candidates
    adaptive = candidates is not None
    chief = backend.is_chief

    keras.utils.set_random_seed(args.seed)
    set_precision(args.mixed_precision)
    with backend.scope():
        model = build_model(args.model, data.input_shape, data.num_classes)
        adascale = None
        if adascale_scale is not None:
            from distbatch.recipes.adascale import AdaScaleState
            adascale = AdaScaleState(scale=adascale_scale, base_batch_size=args.base_batch_size,
                                     total_base_steps=total_steps, always_measure=adaptive)
        optimizer, schedule, recipe = build_recipe(
            recipe_args or args, global_batch_size=recipe_plan.global_batch_size,
            steps_per_epoch=recipe_plan.steps_per_epoch, total_steps=total_steps, adascale=adascale)
        if args.mixed_precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Slots must exist before the first distributed step (Keras 3 + MirroredStrategy).
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)

    config = run_config(args, backend=backend.name, backend_reason=reason,
                        replicas=backend.num_replicas, plan=plan.as_dict(),
                        total_steps=total_steps, recipe=recipe)
    if args.resume:  # refused here, before anything is written
        check_resume_matches(config, args.out)
        from distbatch.training.checkpoints import newest_intact
        newest_intact(os.path.join(args.out, "checkpoints"))
    if chief:
        claim_out_dir(args.out, "train", remove=RUN_OUTPUTS if args.overwrite else ())
        atomic_write_json(os.path.join(args.out, "config.json"), config)
        print(f"distbatch: {backend.describe()} ({reason}); global batch {plan.global_batch_size} = "
              f"{plan.per_replica_batch_size} per replica x {plan.replicas} replicas x "
              f"{plan.accumulation_steps} accumulation; {plan.steps_per_epoch} steps/epoch, "
              f"{total_steps} steps; peak lr {recipe['peak_lr']:.4g}, warmup {recipe['warmup_steps']} "
              f"steps", file=sys.stderr, flush=True)
        if adaptive:
            print(f"distbatch: global batch auto: chosen by goodput at each epoch among "
                  f"{candidates}; AdaScale lr; ends when tau reaches {total_steps} base-batch steps",
                  file=sys.stderr, flush=True)
        elif adascale is not None:
            print(f"distbatch: AdaScale at S = {adascale.scale:g} x base batch {args.base_batch_size}: "
                  f"lr = gain x schedule(tau); ends when tau reaches {total_steps} base-batch steps "
                  f"(between {math.ceil(total_steps / adascale.scale)} and {total_steps} steps)",
                  file=sys.stderr, flush=True)

    options = LoopOptions(
        total_steps=total_steps, seed=args.seed, evals_per_epoch=args.evals_per_epoch,
        noise_scale=args.noise_scale, target_accuracy=args.target_accuracy,
        early_stopping_metric=args.early_stopping_metric,
        early_stopping_patience=args.early_stopping_patience, min_delta=args.min_delta,
        checkpoint_dir=os.path.join(args.out, "checkpoints"), checkpoint_every=args.checkpoint_every,
        checkpoint_every_seconds=checkpoint_seconds(getattr(args, "checkpoint_every_seconds", None)),
        resume=args.resume,
        tensorboard_dir=getattr(args, "tensorboard_dir", None) or os.path.join(args.out, "tensorboard"),
        stop_at_target=getattr(args, "stop_at_target", False),
        steps_per_execution=getattr(args, "steps_per_execution", "auto"),
        jit_compile=getattr(args, "jit_compile", "off") == "on",
        bucket_mb=getattr(args, "bucket_mb", 0.0),
        grad_compression=getattr(args, "grad_compression", "none"),
        verbose=getattr(args, "progress", True))
    started = time.time()
    say = chief and getattr(args, "progress", True)  # a sweep's points stay quiet
    try:
        if adaptive:
            from distbatch.training.goodput import probe_step_seconds, run_adaptive

            def probe(batch: int) -> float:
                return probe_step_seconds(
                    backend, lambda: build_model(args.model, data.input_shape, data.num_classes),
                    lambda: keras.optimizers.SGD(0.01, momentum=0.9), data.input_shape,
                    data.num_classes, batch, accumulation_steps=args.accumulation_steps)

            result = run_adaptive(backend, model, optimizer, data, options, adascale=adascale,
                                  candidates=candidates, probe=probe,
                                  accumulation_steps=args.accumulation_steps,
                                  log=lambda m: print(m, file=sys.stderr, flush=True)
                                  if chief and options.verbose else None)
        elif batch_schedule is not None:
            from distbatch.training.batch_schedule import run_schedule
            result = run_schedule(backend, model, optimizer, batch_schedule, data, options,
                                  learning_rate_fn=lambda s: float(schedule(s)))
        else:
            result = Trainer(backend, model, optimizer, plan, data, options, adascale=adascale).run()
    except Exception as e:  # out of memory -> one line with the failing batch and what to try
        from distbatch.measure.probe import OutOfMemory, is_out_of_memory, oom_message
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(oom_message(plan)) from e
    write_rank_report(backend, result.metrics, model)

    summary = {
        "backend": backend.name, "replicas": plan.replicas, "workers": backend.num_workers,
        "global_batch_size": plan.global_batch_size,
        **({"adaptive_batch": True, "max_global_batch_size": args.max_global_batch_size,
            "candidate_batches": candidates} if adaptive else {}),
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


# Config keys a resumed run may change: where the outputs go and how much is printed
# or checkpointed. Every other key of config.json (flags and derived values such as the
# batch plan and the recipe) changes the result, so it must match.
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "progress", "verbose",
                               "tensorboard_dir", "checkpoint_every", "checkpoint_every_seconds",
                               "backend_reason", "machine",
                               "batch_sizes", "seeds"})


def run_config(args: argparse.Namespace, **derived) -> dict:
    """config.json of a run: every flag plus derived values, as it reads back from disk."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in ("func", "handler")}
    config.update(derived)
    return json_roundtrip(config)


def check_resume_matches(config: dict, out: str, *, may_change=RESUME_MAY_CHANGE) -> None:
    """--resume with another configuration than the run in `out` would silently train (or
    report) something else: refuse the first key that differs, naming both values.

    Keys only one side has (a flag older or newer than the run) are not compared.
    """
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    import json
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise UsageError(f"--resume: {path} is not a distbatch config ({e}); cannot tell which "
                         "run this is") from None
    diff = _first_difference({k: v for k, v in old.items() if k not in may_change}, config)
    if diff:
        key, was, now = diff
        raise UsageError(f"--resume: {key.replace('_', '-')} is {now!r} but the run in {out!r} "
                         f"used {was!r}; resume with the same flags or use another --out")


def _first_difference(old: dict, new: dict, prefix: str = ""):
    """(key, old value, new value) of the first differing common key; flags before nested."""
    for key in sorted(old.keys() & new.keys(), key=lambda k: (isinstance(old[k], dict), k)):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diff = _first_difference(a, b, f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


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
