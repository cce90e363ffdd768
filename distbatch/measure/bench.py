"""`distbatch bench`: synthetic-data training throughput and scaling efficiency.

Like Horovod's synthetic benchmark (tensorflow2_synthetic_benchmark.py), but
measured honestly:

- Each timed iteration is --steps-per-iter steps of the REAL distbatch step
  (distbatch.training.step.make_train_step, forward + backward + all-reduce + update) on
  fixed random inputs of the model's shape, ended by fetching a result (so the
  device work is finished). One compiling step and --warmup-iters warm-up
  iterations run first and are not timed.
- The AGGREGATE rate is measured across all replicas:

      aggregate_i = global_batch * steps_per_iter / elapsed_i

  where elapsed_i is the SLOWEST worker's time for iteration i (the per-worker
  times are exchanged with the backend's own all-reduce). Horovod instead
  prints rank 0's per-device rate times N, an extrapolation.
- Reported as mean +- 1.96 std over the timed iterations (Horovod's
  convention; std with ddof=0, so 1.96 std is a spread of the iterations,
  not a confidence interval of the mean). Per-replica = aggregate / N.
- Scaling efficiency (weak or strong, depending on which batch is held fixed):

      efficiency(N) = throughput(N) / ((N / n0) * throughput(n0)),   n0 = 1 usually

  `--cpu-replicas-list 1,2` runs one subprocess per replica count (TensorFlow
  fixes the logical devices once per process); `--baseline FILE` takes the JSON
  of an earlier 1-replica bench for a horovod/multiworker run.

Logical CPU replicas (--cpu-replicas) split the SAME cores: they exercise the
distributed code paths, they do not add compute, so their efficiency on a CPU
says nothing about GPU scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from distbatch.errors import ParameterError, UsageError, require
from distbatch.shapes import parse_shape
from distbatch.fileio import unwritable_reason

SCHEMA = "distbatch.bench/1"
SCALING_SCHEMA = "distbatch.bench-scaling/1"
DEFAULT_PER_REPLICA_BATCH = 64
LOGICAL_CPU_NOTE = ("logical CPU replicas share the same cores: they test the distributed "
                    "paths, not speed")


# -- pure helpers (tested as tables) -----------------------------------------------------
def parse_input_shape(text: str) -> tuple[int, ...]:
    """'32x32x3' or '32,32,3' -> (32, 32, 3); '40' -> (40,) (distbatch.shapes.parse_shape)."""
    try:
        return parse_shape(text)
    except ParameterError as e:
        raise e.for_flags() from None


def parse_replica_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique, each >= 1)."""
    try:
        counts = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--cpu-replicas-list must be comma-separated integers, got {text!r}") from None
    require(bool(counts), f"--cpu-replicas-list must name at least one count, got {text!r}")
    require(all(c >= 1 for c in counts), f"--cpu-replicas-list counts must be >= 1, got {text!r}")
    return sorted(set(counts))


def summarize(iteration_seconds: Sequence[float], samples_per_iter: int) -> dict:
    """Per-iteration rates r_i = samples_per_iter / t_i; mean, std (ddof=0), 1.96 std, median."""
    import numpy as np
    t = np.asarray(iteration_seconds, dtype=np.float64)
    require(t.size >= 1 and bool(np.all(t > 0)),
            f"iteration times must be a non-empty list of positive seconds, got {list(t)}")
    rates = samples_per_iter / t
    return {"mean": float(rates.mean()), "std": float(rates.std()),
            "ci95": float(1.96 * rates.std()), "median": float(np.median(rates)),
            "min": float(rates.min()), "max": float(rates.max()), "n": int(rates.size)}


def scaling_efficiency(throughput: float, replicas: int, base_throughput: float,
                       base_replicas: int = 1) -> float:
    """throughput(N) / ((N / n0) * throughput(n0)); 1.0 = perfect linear scaling."""
    require(replicas >= 1 and base_replicas >= 1,
            f"replica counts must be >= 1, got {replicas} and {base_replicas}")
    require(base_throughput > 0, f"baseline throughput must be > 0, got {base_throughput}")
    return float(throughput) / (replicas / base_replicas * float(base_throughput))


def efficiency_table(results: Sequence[dict]) -> list[dict]:
    """One row per bench result, efficiency against the smallest replica count."""
    require(bool(results), "no bench results to tabulate")
    ordered = sorted(results, key=lambda r: r["replicas"])
    base = ordered[0]
    rows = []
    for r in ordered:
        agg = r["samples_per_sec"]
        rows.append({"replicas": r["replicas"], "global_batch_size": r["global_batch_size"],
                     "per_replica_batch_size": r["per_replica_batch_size"],
                     "samples_per_sec": agg["mean"], "ci95": agg["ci95"],
                     "per_replica_samples_per_sec": agg["mean"] / r["replicas"],
                     "efficiency": scaling_efficiency(agg["mean"], r["replicas"],
                                                      base["samples_per_sec"]["mean"],
                                                      base["replicas"])})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'replicas':>8} {'global batch':>12} {'samples/s (mean +- 1.96 std)':>30} "
             f"{'per replica':>12} {'efficiency':>10}"]
    for r in rows:
        lines.append(f"{r['replicas']:>8} {r['global_batch_size']:>12} "
                     f"{r['samples_per_sec']:>16,.1f} +- {r['ci95']:<10,.1f} "
                     f"{r['per_replica_samples_per_sec']:>12,.1f} {r['efficiency']:>10.3f}")
    return "\n".join(lines)


def resolve_batch(per_replica: int | None, global_batch: int | None, replicas: int) -> tuple[int, int]:
    """(per_replica_batch, global_batch) from whichever one the user gave (default per-replica 64)."""
    if per_replica is not None and global_batch is not None:
        raise UsageError(f"give --per-replica-batch-size ({per_replica}) or --global-batch-size "
                         f"({global_batch}), not both")
    if global_batch is not None:
        require(global_batch >= 1, f"--global-batch-size must be >= 1, got {global_batch}")
        if global_batch % replicas:
            raise UsageError(f"--global-batch-size {global_batch} is not divisible by the "
                             f"{replicas} replicas")
        return global_batch // replicas, global_batch
    b = DEFAULT_PER_REPLICA_BATCH if per_replica is None else per_replica
    require(b >= 1, f"--per-replica-batch-size must be >= 1, got {b}")
    return b, b * replicas


def load_baseline(path: str) -> dict:
    """A bench JSON written by `distbatch bench --json` (single run, not a scaling table)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"--baseline {path!r}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--baseline {path!r} is not JSON ({e.msg} at char {e.pos})") from None
    ok = (isinstance(data, dict) and data.get("schema") == SCHEMA
          and isinstance(data.get("replicas"), int)
          and isinstance(data.get("samples_per_sec"), dict) and "mean" in data["samples_per_sec"])
    require(ok, f"--baseline {path!r} is not a `distbatch bench --json` file of schema {SCHEMA}")
    return data


def check_baseline_matches(result: dict, baseline: dict) -> None:
    """Efficiency compares like with like: same model, input shape and per-replica batch."""
    for key in ("model", "input_shape", "num_classes", "per_replica_batch_size"):
        if result[key] != baseline[key]:
            raise UsageError(f"--baseline was measured with {key} {baseline[key]!r}, this run "
                             f"uses {result[key]!r}; efficiency needs the same workload")


def replica_run_command(argv: Sequence[str], count: int, json_path: str) -> list[str]:
    """The child command of --cpu-replicas-list: this bench at one logical-CPU replica count."""
    return [sys.executable, "-m", "distbatch.cli", "bench", *argv, "--backend", "mirrored",
            "--cpu-replicas", str(count), "--json", json_path]


# -- the measurement ---------------------------------------------------------------------
def _slowest_worker_times(backend, times: list[float]) -> list[float]:
    """Per iteration, the maximum over workers of this iteration's elapsed time.

    An all-gather built from the backend's all_reduce_sum: worker w writes its
    times into row w of a zero matrix; each of its L local replicas adds 1/L of it.
    """
    if backend.num_workers == 1:
        return list(times)
    import numpy as np
    import tensorflow as tf
    W, n = backend.num_workers, len(times)
    mine = np.zeros((W, n), np.float64)
    mine[backend.worker_index] = np.asarray(times) / backend.local_replicas

    @tf.function
    def gather(t):  # t is an argument, not a captured eager tensor: Horovod names ops by it
        out = backend.run(lambda: backend.all_reduce_sum([tf.identity(t)]))
        return backend.local_value(out[0])

    return [float(v) for v in gather(tf.constant(mine)).numpy().max(axis=0)]


def measure(args: argparse.Namespace) -> dict:
    """Run the benchmark in this process; returns the result dict (identical on every worker)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import distbatch
    from distbatch.backends import create_backend
    from distbatch.models import build_model
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import make_train_step

    shape = parse_input_shape(args.input_shape)
    backend, reason = create_backend(args.backend, cpu_replicas=args.cpu_replicas)
    R = backend.num_replicas
    b, B = resolve_batch(args.per_replica_batch_size, args.global_batch_size, R)
    plan = BatchPlan.derive(global_batch_size=B, replicas=R, num_train_examples=B)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed + backend.worker_index)
    x = rng.standard_normal((b, *shape)).astype(np.float32)
    y = rng.integers(0, args.num_classes, size=b).astype(np.int32)
    with backend.scope():
        model = build_model(args.model, shape, args.num_classes)
        optimizer = keras.optimizers.SGD(learning_rate=0.01)  # Horovod's synthetic benchmark
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    step = make_train_step(backend, model, optimizer, plan)
    iterator = iter(backend.distribute(
        lambda w, L: tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(tf.data.AUTOTUNE)))

    chief = backend.is_chief
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    step(iterator)["loss_sum"].numpy()
    compile_s = time.perf_counter() - t0

    def iteration() -> float:
        t = time.perf_counter()
        for _ in range(args.steps_per_iter):
            out = step(iterator)
        out["loss_sum"].numpy()  # sync: the result exists only when the steps are done
        return time.perf_counter() - t

    for _ in range(args.warmup_iters):
        iteration()
    local = []
    for i in range(args.iters):
        local.append(iteration())
        if chief and not args.quiet:
            rate = B * args.steps_per_iter / local[-1]
            print(f"iter {i + 1}/{args.iters}: {rate:,.1f} samples/s (this worker's clock)",
                  flush=True)
    times = _slowest_worker_times(backend, local)
    agg = summarize(times, B * args.steps_per_iter)
    result = {
        "schema": SCHEMA, "backend": backend.name, "backend_reason": reason,
        "replicas": R, "workers": backend.num_workers,
        "logical_cpu_replicas": args.cpu_replicas is not None,
        "model": args.model, "input_shape": list(shape), "num_classes": args.num_classes,
        "per_replica_batch_size": b, "global_batch_size": B,
        "iters": args.iters, "steps_per_iter": args.steps_per_iter,
        "warmup_iters": args.warmup_iters, "compile_step_s": compile_s,
        "iteration_seconds": times,
        "samples_per_sec": agg,
        "per_replica_samples_per_sec": {"mean": agg["mean"] / R, "ci95": agg["ci95"] / R},
        "scaling_efficiency": None, "baseline": None,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "distbatch": distbatch.__version__,
    }
    backend.shutdown()
    result["_chief"] = chief
    return result


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
        from distbatch.fileio import atomic_write_json
        atomic_write_json(path, obj)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no TensorFlow, so bad input fails in a second."""
    parse_input_shape(args.input_shape)
    require(args.num_classes >= 2, f"--num-classes must be >= 2, got {args.num_classes}")
    require(args.iters >= 1, f"--iters must be >= 1, got {args.iters}")
    require(args.steps_per_iter >= 1, f"--steps-per-iter must be >= 1, got {args.steps_per_iter}")
    require(args.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    require(0 <= args.seed < 2**32, f"--seed must be an integer in [0, 2**32), got {args.seed}")
    resolve_batch(args.per_replica_batch_size, args.global_batch_size, 1)
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
    result = measure(args)
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
    p.add_argument("--backend", default="auto",
                   choices=("auto", "single", "mirrored", "multiworker", "horovod"))
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
