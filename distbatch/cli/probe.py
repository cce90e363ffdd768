"""`distbatch probe-batch`: the largest per-replica batch that fits in device memory
(the search and the memory model: distbatch.measure.probe, imported when the command runs:
it loads TensorFlow, and this parser is built for every `distbatch --help`)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from distbatch.choices import BACKENDS, MODELS
from distbatch.errors import ParameterError, require
from distbatch.measure.batch_search import DEFAULT_MAX_BATCH
from distbatch.shapes import parse_shape as _parse_shape


def add_probe_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "probe-batch", help="find the largest per-replica batch that fits in device memory",
        description="Doubling then binary search over the per-replica batch, one real training "
                    "step per try, catching out-of-memory errors (like Lightning's batch-size finder).")
    p.add_argument("--model", default="mlp", choices=MODELS, help="named model (default: mlp)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-shape", default=None, metavar="D[,D...]",
                     help="shape of one example, e.g. 40 or 32,32,3 (default: the dataset's)")
    src.add_argument("--dataset", default=None, help="take input shape and classes from this dataset")
    p.add_argument("--num-classes", type=int, default=10, help="classes with --input-shape (default 10)")
    p.add_argument("--optimizer", default="momentum", help="optimizer whose slots count (default momentum)")
    p.add_argument("--start-batch", type=int, default=1, help="first per-replica batch tried (default 1)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest per-replica batch tried (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--memory-limit-mb", type=float, default=None,
                   help="simulate a device with this much memory: tries whose estimated step "
                        "memory exceeds it count as out of memory without running")
    p.add_argument("--accumulation-steps", type=int, default=1,
                   help="report the global batch with this gradient accumulation (default 1)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--cpu-replicas", type=int, default=None, metavar="N")
    p.add_argument("--mixed-precision", choices=("off", "float16", "bfloat16"), default="off")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=probe_main)


def parse_shape(text: str) -> tuple[int, ...]:
    """--input-shape: '40', '32x32x3' or '32,32,3' (distbatch.shapes.parse_shape)."""
    try:
        return _parse_shape(text)
    except ParameterError as e:
        raise e.for_flags() from None


def validate_probe_args(args: argparse.Namespace) -> None:
    """Every check of probe-batch's flags that needs no TensorFlow."""
    require(args.accumulation_steps >= 1,
            f"--accumulation-steps must be >= 1, got {args.accumulation_steps}")
    require(args.memory_limit_mb is None or (math.isfinite(args.memory_limit_mb) and args.memory_limit_mb > 0),
            f"--memory-limit-mb must be a finite number > 0, got {args.memory_limit_mb}")
    require(args.num_classes >= 2, f"--num-classes must be >= 2, got {args.num_classes}")
    require(args.cpu_replicas is None or args.cpu_replicas >= 1,
            f"--cpu-replicas must be >= 1, got {args.cpu_replicas}")
    for flag, v in (("--start-batch", args.start_batch), ("--max-batch", args.max_batch)):
        require(v >= 1, f"{flag} must be an integer >= 1, got {v}")
    require(args.start_batch <= args.max_batch,
            f"--start-batch {args.start_batch} is larger than --max-batch {args.max_batch}")
    if not args.dataset:
        parse_shape(args.input_shape or "40")


def probe_main(args: argparse.Namespace) -> int:
    validate_probe_args(args)
    from distbatch.measure.probe import dataset_shape, probe  # the command's code (TensorFlow)
    if args.dataset:
        shape, classes = dataset_shape(args.dataset)
    else:
        shape, classes = parse_shape(args.input_shape or "40"), args.num_classes
    result = probe(model_name=args.model, input_shape=shape, num_classes=classes,
                   backend_name=args.backend, cpu_replicas=args.cpu_replicas,
                   accumulation_steps=args.accumulation_steps, start=args.start_batch,
                   max_batch=args.max_batch, memory_limit_mb=args.memory_limit_mb,
                   optimizer_name=args.optimizer, mixed_precision=args.mixed_precision,
                   log=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        limit = "the --max-batch cap" if r["capped"] else "memory"
        print(f"largest per-replica batch: {r['per_replica_batch']} (limited by {limit}; "
              f"{r['tries']} tries)")
        print(f"global batch it allows: {r['global_batch']} = {r['per_replica_batch']} per replica x "
              f"{r['replicas']} replicas x {r['accumulation_steps']} accumulation steps")
        if r.get("estimated_mb") is not None:
            print(f"estimated step memory at that batch: {r['estimated_mb']:.1f} MB per replica")
    return 0
