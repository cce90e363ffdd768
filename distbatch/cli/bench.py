"""`distbatch bench`: its flags and output (the measurement: distbatch.measure.bench).

The parser and most checks use distbatch.measure.scaling only; the measurement module loads
TensorFlow and is imported when the command runs (`_measurement`), so `distbatch --help`
does not load it."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from distbatch.choices import BACKENDS
from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_json, unwritable_reason
from distbatch.measure.scaling import (DEFAULT_PER_REPLICA_BATCH, LOGICAL_CPU_NOTE, SCALING_SCHEMA,
                                       check_baseline_matches, efficiency_table, format_table,
                                       load_baseline, parse_input_shape, parse_replica_list,
                                       resolve_batch, scaling_efficiency)


def replica_run_command(argv: list[str], count: int, json_path: str) -> list[str]:
    """The child command of a list of replica counts (--cpu-replicas 1,2,4): this bench at one
    logical-CPU replica count, mirrored, writing its JSON to `json_path`."""
    return [sys.executable, "-m", "distbatch.cli", "bench", *argv, "--backend", "mirrored",
            "--cpu-replicas", str(count), "--json", json_path]


def _measurement():
    """distbatch.measure.bench, imported when the command runs (it loads TensorFlow)."""
    from distbatch.measure import bench
    return bench


def _print_result(r: dict) -> None:
    print(f"distbatch bench: {r['model']} input {'x'.join(map(str, r['input_shape']))}, "
          f"{r['num_classes']} classes, backend {r['backend']}, {r['replicas']} replica(s) on "
          f"{r['workers']} worker(s)")
    if r["logical_cpu_replicas"]:
        print(f"note: {LOGICAL_CPU_NOTE}")
    print(f"per-replica batch {r['per_replica_batch_size']}, global batch {r['global_batch_size']}; "
          f"{r['iters']} iters x {r['steps_per_iter']} steps after {r['warmup_iters']} warm-up "
          f"iters (compile step {r['compile_step_s']:.2f} s, not timed)")
    a, p = r["samples_per_sec"], r["per_replica_samples_per_sec"]
    print(f"aggregate:   {a['mean']:,.1f} +- {a['ci95']:,.1f} samples/s "
          f"(mean +- 1.96 std over {a['n']} iters, slowest worker's clock)")
    print(f"per replica: {p['mean']:,.1f} +- {p['ci95']:,.1f} samples/s (aggregate / {r['replicas']})")
    if r["scaling_efficiency"] is not None:
        print(f"scaling efficiency vs {r['baseline']['replicas']}-replica baseline "
              f"({r['baseline']['samples_per_sec']:,.1f} samples/s): {r['scaling_efficiency']:.3f}")
    la = r["load_average"]["before"]
    print(f"load average before: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {r['cpu_count']} CPUs")


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        atomic_write_json(path, obj)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no TensorFlow, so bad input fails in a second."""
    shape = parse_input_shape(args.input_shape)
    require(args.num_classes >= 2, f"--num-classes must be >= 2, got {args.num_classes}")
    require(args.iters >= 1, f"--iters must be >= 1, got {args.iters}")
    require(args.steps_per_iter >= 1, f"--steps-per-iter must be >= 1, got {args.steps_per_iter}")
    require(args.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    require(0 <= args.seed < 2**32, f"--seed must be an integer in [0, 2**32), got {args.seed}")
    per_replica, _ = resolve_batch(args.per_replica_batch_size, args.global_batch_size, 1)
    if args.global_batch_size is None:  # else the replica count (known only later) divides it
        _measurement().check_inputs_fit(shape, per_replica)
    if args.cpu_replicas is not None:
        require(args.cpu_replicas >= 1, f"--cpu-replicas must be >= 1, got {args.cpu_replicas}")
    if args.cpu_replicas_list is not None:
        counts = parse_replica_list(args.cpu_replicas_list)
        require(args.cpu_replicas is None, f"give --cpu-replicas ({args.cpu_replicas}) or "
                f"--cpu-replicas-list ({args.cpu_replicas_list}), not both")
        require(args.backend in ("auto", "mirrored"), f"--cpu-replicas-list runs --backend "
                f"mirrored on logical CPUs; got --backend {args.backend}")
        require(args.baseline is None, "--baseline applies to a single run, not to "
                f"--cpu-replicas-list {args.cpu_replicas_list}")
        if args.global_batch_size is not None:
            for c in counts:
                resolve_batch(None, args.global_batch_size, c)
    if args.baseline is not None:
        load_baseline(args.baseline)
    if args.json:  # checked before measuring, so a result is never measured and then lost
        check_json_path(args.json)


def check_json_path(path: str) -> None:
    """UsageError unless `path` can be written as a file (its directory exists and is writable)."""
    require(not os.path.isdir(path), f"--json {path!r} is a directory; expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    require(os.path.isdir(directory), f"--json {path!r}: {directory!r} is not an existing directory")
    reason = unwritable_reason(directory)
    require(reason is None, f"--json {path!r} is not writable ({reason}: {directory!r})")


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--model", args.model, "--input-shape", args.input_shape,
            "--num-classes", str(args.num_classes), "--iters", str(args.iters),
            "--steps-per-iter", str(args.steps_per_iter), "--warmup-iters", str(args.warmup_iters),
            "--seed", str(args.seed)]
    if args.global_batch_size is not None:
        argv += ["--global-batch-size", str(args.global_batch_size)]
    else:
        argv += ["--per-replica-batch-size",
                 str(args.per_replica_batch_size or DEFAULT_PER_REPLICA_BATCH)]
    return argv


def run_replica_list(args: argparse.Namespace) -> dict:
    counts = parse_replica_list(args.cpu_replicas_list)
    print(f"note: {LOGICAL_CPU_NOTE}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="distbatch-bench-") as tmp:
        for c in counts:
            path = os.path.join(tmp, f"bench-{c}.json")
            cmd = replica_run_command(_child_argv(args) + ["--quiet"], c, path)
            print(f"running {c} replica(s) ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                if proc.returncode == 2:  # the child's own one-line usage error
                    raise UsageError(f"bench at {c} replicas: {tail.removeprefix('distbatch: error: ')}")
                raise RuntimeError(f"bench at {c} replicas exited {proc.returncode}: {tail}")
            with open(path) as f:
                results.append(json.load(f))
    rows = efficiency_table(results)
    print(format_table(rows))
    return {"schema": SCALING_SCHEMA, "note": LOGICAL_CPU_NOTE, "table": rows, "runs": results}


def bench_command(args: argparse.Namespace) -> int:
    validate(args)
    if args.cpu_replicas_list is not None:
        _write_json(args.json, run_replica_list(args))
        return 0
    result = _measurement().measure(
        model=args.model, input_shape=args.input_shape, num_classes=args.num_classes,
        backend=args.backend, cpu_replicas=args.cpu_replicas,
        per_replica_batch_size=args.per_replica_batch_size,
        global_batch_size=args.global_batch_size, seed=args.seed, iters=args.iters,
        steps_per_iter=args.steps_per_iter, warmup_iters=args.warmup_iters, quiet=args.quiet)
    if not result.pop("_chief"):
        return 0
    if args.baseline is not None:
        base = load_baseline(args.baseline)
        check_baseline_matches(result, base)
        result["baseline"] = {"file": os.path.abspath(args.baseline), "replicas": base["replicas"],
                              "samples_per_sec": base["samples_per_sec"]["mean"]}
        result["scaling_efficiency"] = scaling_efficiency(
            result["samples_per_sec"]["mean"], result["replicas"],
            base["samples_per_sec"]["mean"], base["replicas"])
    if not args.quiet:
        _print_result(result)
    _write_json(args.json, result)
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="synthetic-data throughput (aggregate samples/s) and scaling efficiency",
        description="Time the distbatch train step on fixed random inputs: aggregate samples/s "
                    "measured across all replicas, mean +- 1.96 std over timed iterations after "
                    f"warm-up (compile excluded). Note: {LOGICAL_CPU_NOTE}.")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--cpu-replicas", type=int, default=None, metavar="N",
                   help="mirrored over N logical CPU devices (testing the distributed path, not speed)")
    p.add_argument("--cpu-replicas-list", default=None, metavar="N1,N2,...",
                   help="run once per logical-CPU replica count (one subprocess each) and print "
                        "the scaling-efficiency table")
    p.add_argument("--model", default="mlp", help="a distbatch model name (mlp, convnet, resnet, "
                                                  "ResNet50, ...)")
    p.add_argument("--input-shape", default="40", help="e.g. 40, 32x32x3 or 32,32,3 (default 40: MNIST-1D)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--per-replica-batch-size", type=int, default=None,
                   help=f"examples per replica per step (default {DEFAULT_PER_REPLICA_BATCH}); "
                        "held fixed across replica counts = weak scaling")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="examples per step over all replicas; held fixed = strong scaling")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--steps-per-iter", type=int, default=10, help="steps per timed iteration")
    p.add_argument("--warmup-iters", type=int, default=2,
                   help="untimed iterations after the compile step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="JSON of a 1-replica `distbatch bench --json` run; adds scaling efficiency")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON (chief)")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    p.set_defaults(func=bench_command)
    return p
