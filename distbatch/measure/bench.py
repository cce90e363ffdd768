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

import math
import os
import platform
import time
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

import distbatch
from distbatch import machine
from distbatch.backends import create_backend
from distbatch.errors import ParameterError, require
from distbatch.measure.scaling import (  # noqa: F401 (the bench's inputs and tables, importable from here)
    DEFAULT_PER_REPLICA_BATCH, LOGICAL_CPU_NOTE, SCALING_SCHEMA, SCHEMA, check_baseline_matches,
    efficiency_table, format_table, load_baseline, parse_input_shape, parse_replica_list,
    resolve_batch, scaling_efficiency)
from distbatch.models import build_model
from distbatch.shapes import parse_shape
from distbatch.training.plan import BatchPlan
from distbatch.training.step import make_train_step


def summarize(iteration_seconds: Sequence[float], samples_per_iter: int) -> dict:
    """Per-iteration rates r_i = samples_per_iter / t_i; mean, std (ddof=0), 1.96 std, median."""
    t = np.asarray(iteration_seconds, dtype=np.float64)
    require(t.size >= 1 and bool(np.all(t > 0)),
            f"iteration times must be a non-empty list of positive seconds, got {list(t)}")
    rates = samples_per_iter / t
    return {"mean": float(rates.mean()), "std": float(rates.std()),
            "ci95": float(1.96 * rates.std()), "median": float(np.median(rates)),
            "min": float(rates.min()), "max": float(rates.max()), "n": int(rates.size)}


# Bytes per input value while the random batch is made: drawn as float64, kept as float32.
INPUT_BYTES_PER_VALUE = 8 + 4


def check_inputs_fit(shape: Sequence[int], per_replica_batch: int, memory: int | None = None) -> None:
    """ParameterError unless one replica's batch of random inputs fits in this machine's memory
    (`memory` bytes; default its RAM), checked before allocating, as train checks synthetic data."""
    memory = machine.physical_memory() if memory is None else memory
    values = math.prod(int(d) for d in shape)
    need = per_replica_batch * values * INPUT_BYTES_PER_VALUE
    if memory and need > memory:
        raise ParameterError(
            f"{{input_shape}} {'x'.join(map(str, shape))} needs {per_replica_batch} examples x "
            f"{values:,} input values per replica = {need / 2**30:,.1f} GiB (drawn as float64, kept as "
            f"float32), more than this machine's {memory / 2**30:,.1f} GiB of memory; use a smaller "
            f"{{input_shape}} or batch", "input_shape")


# -- the measurement ---------------------------------------------------------------------
def _slowest_worker_times(backend, times: list[float]) -> list[float]:
    """Per iteration, the maximum over workers of this iteration's elapsed time.

    An all-gather built from the backend's all_reduce_sum: worker w writes its
    times into row w of a zero matrix; each of its L local replicas adds 1/L of it.
    """
    if backend.num_workers == 1:
        return list(times)
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


