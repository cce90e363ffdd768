"""`distbatch train`: its flags, and the one place they become a TrainConfig.

The flags are parsed and turned into a frozen TrainConfig (with its Recipe)
here, once; the job itself is distbatch.training.job.train, which the sweep and
recommend run too. Errors name the FLAG: the library names its parameters
(ParameterError) and this module writes them as flags.
"""
from __future__ import annotations

import argparse
import dataclasses

from distbatch.backends.environment import CollectiveOptions
from distbatch.choices import BACKENDS, GRAD_COMPRESSION, MODELS
from distbatch.cli.flags import flag_error
from distbatch.cli.recipe_flags import add_recipe_args
from distbatch.errors import ParameterError
from distbatch.recipes.recipe import RECIPE_FIELDS, Recipe
from distbatch.training.config import TrainConfig


def add_train_args(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Flags shared by `train` and `sweep` (the sweep sets the batch size per point)."""
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
        g.add_argument("--global-batch-size", type=global_batch_arg, default=None, metavar="N|auto|ramp",
                       help="examples per optimizer step, summed over all replicas "
                            "(required unless --batch-size-schedule gives it); auto: chosen "
                            "while training to maximise goodput (Pollux), up to "
                            "--max-global-batch-size, with --scaling adascale; ramp: from "
                            "--base-batch-size, raised at epoch ends to the largest base x 2^k "
                            "<= --max-global-batch-size not above 2 x the measured noise scale "
                            "B_simple, the lr by --scaling at each batch (docs/batch_ramp.md)")
        g.add_argument("--max-global-batch-size", type=int, default=None, metavar="M",
                       help="largest batch --global-batch-size auto or ramp may choose")
        g.add_argument(
            "--batch-size-schedule", default=None, metavar="E0:B0,E1:B1,...",
            help="raise the global batch at whole epochs instead of decaying the lr "
                 "(Smith et al. 2017), e.g. '0:64,10:128,20:256'; the first batch replaces "
                 "--global-batch-size; the lr stays at its peak after warmup")
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
    g.add_argument("--deterministic", action="store_true",
                   help="TensorFlow's op determinism on top of the seeds: two runs on the same "
                        "backend and hardware end bit-identical (ops without a deterministic "
                        "kernel then fail)")
    g.add_argument("--sync-batchnorm", action="store_true",
                   help="BatchNormalization with the moments of the GLOBAL batch on every backend "
                        "(default: each replica's own slice; docs/correctness.md)")
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
    if not sweep:
        g.add_argument("--elastic-commit-every", type=int, default=None, metavar="STEPS",
                       help="Horovod Elastic (`distbatch launch horovod --min-np/--max-np/"
                            "--host-discovery-script`): commit (checkpoint) every STEPS steps; a lost "
                            "worker costs at most that many steps (default: the checkpoint cadence "
                            "when one is given, else every 60 s; docs/elastic.md)")
    g.add_argument("--steps-per-execution", type=steps_per_execution_arg, default="auto",
                   metavar="N|auto",
                   help="training steps run inside one tf.function call (default auto: enough "
                        "that a call takes ~1 s); evaluations and checkpoints land on the "
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
    g = parser.add_argument_group("communication (see docs/scaling.md)")
    g.add_argument("--bucket-mb", type=bucket_mb_arg, default="auto", metavar="MB",
                   help="all-reduce gradients in buckets of about MB megabytes, last layers first, "
                        "so communication can overlap the rest of backprop; 0: one all-reduce of "
                        "all gradients (default auto: one all-reduce per gradient tensor on "
                        "horovod, which fuses them itself; one all-reduce elsewhere; measured in "
                        "docs/scaling.md)")
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
    g.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="horovod: end the job with a line naming the ranks that did not arrive "
                        "when a rank waits longer than SECONDS for the others (default: 300 s "
                        "until the first steps are timed, then max(60 s, 20 x the median call); "
                        "also $DISTBATCH_STALL_TIMEOUT)")


def nonnegative_float_arg(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def bucket_mb_arg(text: str):
    """argparse type: 'auto' or a finite number >= 0."""
    if text == "auto":
        return text
    try:
        return nonnegative_float_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or 'auto', got {text!r}") from None


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
    """argparse type: a whole number, 'auto' or 'ramp'."""
    if text in ("auto", "ramp"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, 'auto' or 'ramp', got {text!r}") from None


def collective_options(args):
    """The MultiWorkerMirroredStrategy options the flags give (validated; UsageError)."""
    return CollectiveOptions(implementation=getattr(args, "mwms_implementation", "auto"),
                             bytes_per_pack=getattr(args, "bytes_per_pack", 0),
                             timeout_seconds=getattr(args, "collective_timeout", None))


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "recipe")



def config_from_args(args: argparse.Namespace, **changes) -> TrainConfig:
    """The TrainConfig (and Recipe) the parsed flags describe, with ``changes`` applied
    (fields of either); every check that needs no TensorFlow, errors naming the flags."""
    values = {name: getattr(args, name) for name in TRAIN_FIELDS if hasattr(args, name)}
    recipe = {name: getattr(args, name) for name in RECIPE_FIELDS if hasattr(args, name)}
    for name in list(changes):
        (recipe if name in RECIPE_FIELDS else values)[name] = changes.pop(name)
    try:
        return TrainConfig(recipe=Recipe(**recipe), **values)
    except ParameterError as e:
        raise flag_error(e) from None


def validate_args(args: argparse.Namespace) -> TrainConfig:
    """Cheap checks, before TensorFlow starts: the run's TrainConfig."""
    return config_from_args(args)


def record_of(args: argparse.Namespace) -> dict:
    """The parser's own entries config.json has always recorded next to the flags."""
    return {k: getattr(args, k) for k in ("command", "verbose") if hasattr(args, k)}


def train(args: argparse.Namespace | TrainConfig, *, backend=None, data=None) -> tuple[dict, int]:
    """`distbatch train`: the flags (or a TrainConfig) -> distbatch.training.job.train,
    errors naming the flags; returns (summary, exit code)."""
    from distbatch.training import job
    config = args if isinstance(args, TrainConfig) else config_from_args(args)
    record = {} if isinstance(args, TrainConfig) else record_of(args)
    try:
        return job.train(config, backend=backend, data=data, record=record)
    except ParameterError as e:
        raise flag_error(e) from None
