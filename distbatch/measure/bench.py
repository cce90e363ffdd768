"""Synthetic-data training throughput and scaling efficiency (`distbatch bench`:
distbatch/cli/bench.py).

Like Horovod's synthetic benchmark (tensorflow2_synthetic_benchmark.py), but
measured honestly:

- Each timed iteration is ``steps_per_iter`` steps of the REAL distbatch step
  (distbatch.training.step.make_train_step, forward + backward + all-reduce + update) on
  fixed random inputs of the model's shape, ended by fetching a result (so the
  device work is finished). One compiling step and ``warmup_iters`` warm-up
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

  A list of replica counts (``cpu_replicas_list`` "1,2") runs one subprocess per
  count (TensorFlow fixes the logical devices once per process); a ``baseline``
  file takes the JSON of an earlier 1-replica bench for a horovod/multiworker run.

Logical CPU replicas (``cpu_replicas``) split the SAME cores: they exercise the
distributed code paths, they do not add compute, so their efficiency on a CPU
says nothing about GPU scaling.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Sequence

from distbatch.errors import ParameterError, require, require_param
from distbatch.shapes import parse_shape

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
        counts = None
    problem = ("must be comma-separated integers" if counts is None else
               "must name at least one count" if not counts else
               "counts must be >= 1" if not all(c >= 1 for c in counts) else None)
    if problem:  # the flag's own text, parsed here for the CLI only (as parse_input_shape)
        raise ParameterError(f"{{cpu_replicas_list}} {problem}, got {text!r}",
                             "cpu_replicas_list").for_flags()
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
        raise ParameterError(f"give {{per_replica_batch_size}} ({per_replica}) or "
                             f"{{global_batch_size}} ({global_batch}), not both",
                             "per_replica_batch_size", "global_batch_size")
    if global_batch is not None:
        require_param(global_batch >= 1, f"{{global_batch_size}} must be >= 1, got {global_batch}",
                      "global_batch_size")
        require_param(global_batch % replicas == 0, f"{{global_batch_size}} {global_batch} is not "
                      f"divisible by the {replicas} replicas", "global_batch_size")
        return global_batch // replicas, global_batch
    b = DEFAULT_PER_REPLICA_BATCH if per_replica is None else per_replica
    require_param(b >= 1, f"{{per_replica_batch_size}} must be >= 1, got {b}", "per_replica_batch_size")
    return b, b * replicas


def load_baseline(path: str) -> dict:
    """A bench JSON written by `distbatch bench` (its ``json`` file; a single run, not a scaling
    table). Errors name the flag ``baseline`` (the CLI's only; see _baseline_error)."""
    try:
        with open(path, "rb") as f:  # decoded whole, so an error's offset is the file's
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise _baseline_error(f"{{baseline}} {path!r}: cannot read it ({e.strerror})", "baseline") from None
    except json.JSONDecodeError as e:
        raise _baseline_error(f"{{baseline}} {path!r} is not JSON ({e.msg} at char {e.pos})",
                              "baseline") from None
    except UnicodeDecodeError as e:  # a binary file (an .npz, a checkpoint) given by mistake
        raise _baseline_error(f"{{baseline}} {path!r} is not a text file (byte 0x{e.object[e.start]:02x} "
                              f"at offset {e.start} is not UTF-8); expected the JSON that `distbatch "
                              "bench {json}` writes", "baseline", "json") from None
    except RecursionError:
        raise _baseline_error(f"{{baseline}} {path!r} is not JSON (nested too deeply)", "baseline") from None
    ok = (isinstance(data, dict) and data.get("schema") == SCHEMA
          and isinstance(data.get("replicas"), int)
          and isinstance(data.get("samples_per_sec"), dict) and "mean" in data["samples_per_sec"])
    if not ok:
        raise _baseline_error(f"{{baseline}} {path!r} is not a `distbatch bench {{json}}` file of "
                              f"schema {SCHEMA}", "baseline", "json")
    return data


def _baseline_error(template: str, *params: str):
    """A baseline file is a flag of `distbatch bench` only: its errors are the CLI's lines (as
    parse_input_shape's), also where cli/bench.py's handler is called without the CLI."""
    return ParameterError(template, *params).for_flags()


# Bytes per input value while the random batch is made: drawn as float64, kept as float32.
INPUT_BYTES_PER_VALUE = 8 + 4


def check_inputs_fit(shape: Sequence[int], per_replica_batch: int, memory: int | None = None) -> None:
    """ParameterError unless one replica's batch of random inputs fits in this machine's memory
    (`memory` bytes; default its RAM), checked before allocating, as train checks synthetic data."""
    from distbatch.data.datasets import physical_memory
    memory = physical_memory() if memory is None else memory
    values = math.prod(int(d) for d in shape)
    need = per_replica_batch * values * INPUT_BYTES_PER_VALUE
    if memory and need > memory:
        raise ParameterError(
            f"{{input_shape}} {'x'.join(map(str, shape))} needs {per_replica_batch} examples x "
            f"{values:,} input values per replica = {need / 2**30:,.1f} GiB (drawn as float64, kept as "
            f"float32), more than this machine's {memory / 2**30:,.1f} GiB of memory; use a smaller "
            f"{{input_shape}} or batch", "input_shape")


def check_baseline_matches(result: dict, baseline: dict) -> None:
    """Efficiency compares like with like: same model, input shape and per-replica batch."""
    for key in ("model", "input_shape", "num_classes", "per_replica_batch_size"):
        if result[key] != baseline[key]:
            raise ParameterError(f"{{baseline}} was measured with {key} {baseline[key]!r}, this "
                                 f"run uses {result[key]!r}; efficiency needs the same workload",
                                 "baseline")


def replica_run_command(argv: Sequence[str], count: int, json_path: str) -> list[str]:
    """The child command of a list of replica counts (cpu_replicas_list): this bench at one
    logical-CPU replica count. It builds the CLI's own argv, so it belongs with the CLI
    (distbatch/cli/bench.py): the flags here wait for that move (tests/test_house.py, PENDING)."""
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
        out = backend.run(lambda: backend.all_reduce_sum([tf.identity(t)], name="distbatch_times"))
        return backend.local_value(out[0])

    return [float(v) for v in gather(tf.constant(mine)).numpy().max(axis=0)]


def measure(*, model: str = "mlp", input_shape: Sequence[int] | str = (40,), num_classes: int = 10,
            backend: str = "auto", cpu_replicas: int | None = None,
            per_replica_batch_size: int | None = None, global_batch_size: int | None = None,
            seed: int = 0, iters: int = 10, steps_per_iter: int = 10, warmup_iters: int = 2,
            quiet: bool = False) -> dict:
    """Run the benchmark in this process; returns the result dict (identical on every worker).

    The batch: ``per_replica_batch_size`` (weak scaling) or ``global_batch_size`` (strong
    scaling), default DEFAULT_PER_REPLICA_BATCH per replica.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import distbatch
    from distbatch.backends import create_backend
    from distbatch.models import build_model
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import make_train_step

    shape = parse_shape(input_shape)
    backend, reason = create_backend(backend, cpu_replicas=cpu_replicas)
    R = backend.num_replicas
    b, B = resolve_batch(per_replica_batch_size, global_batch_size, R)
    check_inputs_fit(shape, b)
    plan = BatchPlan.derive(global_batch_size=B, replicas=R, num_train_examples=B)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + backend.worker_index)
    x = rng.standard_normal((b, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=b).astype(np.int32)
    with backend.scope():
        net = build_model(model, shape, num_classes)
        optimizer = keras.optimizers.SGD(learning_rate=0.01)  # Horovod's synthetic benchmark
        optimizer.build(net.trainable_variables)
    backend.prepare(net, optimizer)
    step = make_train_step(backend, net, optimizer, plan)
    iterator = backend.iterator(
        lambda w, L: tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(tf.data.AUTOTUNE))

    chief = backend.is_chief
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with backend.waiting("bench: compile"):
        step(iterator)["loss_sum"].numpy()
    compile_s = time.perf_counter() - t0

    def iteration() -> float:
        t = time.perf_counter()
        with backend.waiting("bench: iteration"):
            for _ in range(steps_per_iter):
                out = step(iterator)
            out["loss_sum"].numpy()  # sync: the result exists only when the steps are done
        return time.perf_counter() - t

    for _ in range(warmup_iters):
        iteration()
    local = []
    for i in range(iters):
        local.append(iteration())
        if chief and not quiet:
            rate = B * steps_per_iter / local[-1]
            print(f"iter {i + 1}/{iters}: {rate:,.1f} samples/s (this worker's clock)",
                  flush=True)
    times = _slowest_worker_times(backend, local)
    agg = summarize(times, B * steps_per_iter)
    result = {
        "schema": SCHEMA, "backend": backend.name, "backend_reason": reason,
        "replicas": R, "workers": backend.num_workers,
        "logical_cpu_replicas": cpu_replicas is not None,
        "model": model, "input_shape": list(shape), "num_classes": num_classes,
        "per_replica_batch_size": b, "global_batch_size": B,
        "iters": iters, "steps_per_iter": steps_per_iter,
        "warmup_iters": warmup_iters, "compile_step_s": compile_s,
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


