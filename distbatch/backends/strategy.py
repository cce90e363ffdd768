"""tf.distribute backends: MirroredStrategy (one node) and MultiWorkerMirroredStrategy.

Both feed data with distribute_datasets_from_function: distbatch shards the
data itself (by worker, then by local replica), so tf.distribute's auto-shard
policy does not apply and every replica sees exactly the slice of the global
batch that the single-device run would give it.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

import tensorflow as tf
from tensorflow.python.eager import context

from distbatch import interrupts
from distbatch.backends.base import Backend
from distbatch.backends.cluster import rendezvous, resolve_cluster_timeout
from distbatch.backends.environment import (  # noqa: F401 (importable from here too)
    MULTIWORKER_JOBS, MWMS_IMPLEMENTATIONS, CollectiveOptions, check_worker_address, parse_tf_config,
    slurm_task_count)
from distbatch.data import inputs
from distbatch.errors import ParameterError, UsageError

try:  # TensorFlow's private multi-device iterator (StrategyBackend.iterator)
    from tensorflow.python.data.ops import multi_device_iterator_ops as _mdi
except ImportError:  # another TensorFlow: iterators are built as they are
    _mdi = None


def disable_keras_gradient_reduction(optimizer) -> None:
    """Stop a Keras 3 optimizer from all-reducing gradients itself.

    Under a tf.distribute strategy, Keras 3's TF optimizer SUMs gradients
    across replicas inside apply_gradients. distbatch reduces them itself, once,
    in the shared step (so the same code serves Horovod, and the gradient noise
    scale can see both the per-replica and the reduced gradient); a second sum
    would multiply the gradient by the replica count. Equivalence tests against
    a single-device run catch any change of this Keras internal.
    """
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None:
            continue
        if not hasattr(opt, "_all_reduce_sum_gradients"):
            raise RuntimeError(
                f"{type(opt).__name__} has no _all_reduce_sum_gradients: this Keras version "
                "changed how it reduces gradients; distbatch needs an update")
        opt._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)


class StrategyBackend(Backend):
    """Shared code of the tf.distribute strategies."""

    def __init__(self, strategy, *, num_workers: int = 1, worker_index: int = 0) -> None:
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        self.num_workers = num_workers
        self.worker_index = worker_index

    def scope(self):
        return self.strategy.scope()

    def distribute(self, make_dataset):
        def dataset_fn(ctx: tf.distribute.InputContext):
            return make_dataset(ctx.input_pipeline_id, self.local_replicas)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def iterator(self, make_dataset):
        """iter(self.distribute(make_dataset)), with every dataset inside the iterator free of
        tf.data's autotuning thread (distbatch.data.inputs.without_autotune_thread; `make_dataset`
        applies it to its own).

        Under MirroredStrategy the iterator is a multi-device iterator whose per-device datasets
        (tf.data's _create_device_dataset: a generator + prefetch to the device) carry default
        options, so each runs a model thread of its own, and destroying the iterator waits out
        its sleep: 5 of 14 deletions of a 2-device iterator after 8-12 s of use waited 2.3-8.5 s,
        0 of 10 with this (docs/benchmarks.md, run 5). The per-device datasets get the option
        while the iterator is made; nothing else is changed (no tf.data API reaches them)."""
        create = getattr(_mdi, "_create_device_dataset", None)
        if create is None:  # another TensorFlow: build the iterator as it is
            return iter(self.distribute(make_dataset))

        def create_without_autotune(*args, **kwargs):
            return inputs.without_autotune_thread(create(*args, **kwargs))

        _mdi._create_device_dataset = create_without_autotune
        try:
            return iter(self.distribute(make_dataset))
        finally:
            _mdi._create_device_dataset = create

    def run(self, fn, args=()):
        return self.strategy.run(fn, args=tuple(args))

    def all_reduce_sum(self, values, name=None):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(values))

    def replica_index(self):
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def local_value(self, value):
        return self.strategy.experimental_local_results(value)[0]

    def prepare(self, model, optimizer) -> None:
        disable_keras_gradient_reduction(optimizer)


def logical_cpu_devices(n: int) -> list[str]:
    """Split the CPU into n logical devices (testing and demos only: no speed-up)."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError:
        pass  # already initialised (e.g. a second run in the same process); use what exists
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < n:
        raise ParameterError(
            f"{{cpu_replicas}} {n} needs {n} logical CPU devices, but TensorFlow had already "
            f"started with {len(devices)} (any Keras, tf.data or TensorFlow call starts it); "
            f"create the backend first, at the top of the program: backend, _ = "
            f"distbatch.create_backend(\"mirrored\", cpu_replicas={n}), then fit(..., "
            f"backend=backend)", "cpu_replicas")
    return devices[:n]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_WARNED: set = set()


def warn_if_more_than_cores(n: int) -> None:
    """One warning line (once per process and n) when n logical CPU replicas (split by
    logical_cpu_devices) outnumber the cores: they only share the cores, so a step takes
    ever longer (64 replicas on 2 cores: 179 s for 2 steps), which looks like a hang.
    Called once the run's checks passed: a refused command prints its error line only."""
    cores = available_cores()
    if n > cores and n not in _WARNED:
        _WARNED.add(n)
        print(f"distbatch: warning: {n} logical CPU replicas on {cores} CPU core(s): logical CPU "
              f"replicas are for tests and demos, share the cores and run slowly (64 of them took "
              f"179 s for 2 steps on 2 cores); expected at most {cores}", file=sys.stderr, flush=True)


def tensorflow_started() -> bool:
    """True once TensorFlow's runtime is up: after that, logical devices and collective ops
    can no longer be configured."""
    return getattr(context.context(), "_context_handle", None) is not None


class MirroredBackend(StrategyBackend):
    name = "mirrored"

    def __init__(self, *, cpu_replicas: int | None = None) -> None:
        if cpu_replicas is not None:
            if cpu_replicas < 1:
                raise ParameterError(f"{{cpu_replicas}} must be >= 1, got {cpu_replicas}", "cpu_replicas")
            devices = logical_cpu_devices(cpu_replicas)
            strategy = tf.distribute.MirroredStrategy(
                devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
        else:
            gpus = tf.config.list_physical_devices("GPU")
            for g in gpus:
                tf.config.experimental.set_memory_growth(g, True)
            # NCCL all-reduce is MirroredStrategy's default on GPUs.
            strategy = tf.distribute.MirroredStrategy()
        super().__init__(strategy)


class MultiWorkerBackend(StrategyBackend):
    name = "multiworker"

    def __init__(self, env: Mapping[str, str] | None = None, *,
                 cluster_timeout: float | None = None,
                 collective: CollectiveOptions | None = None) -> None:
        env = os.environ if env is None else env
        timeout = resolve_cluster_timeout(cluster_timeout, env)
        if "TF_CONFIG" not in env and slurm_task_count(env) > 1:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
            workers = resolver.cluster_spec().as_dict().get("worker", [])
            index = resolver.task_id
        else:
            info = parse_tf_config(env.get("TF_CONFIG"))
            workers, index = info["workers"], info["index"]
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        num_workers = len(workers)
        # After TF_CONFIG's own checks; else TensorFlow's "Collective ops must be configured
        # at program startup" traceback, on every worker.
        if tensorflow_started():
            raise UsageError(
                "backend multiworker must be created before TensorFlow starts (any Keras, tf.data "
                "or TensorFlow call starts it, e.g. building the input pipeline); create it first, "
                "at the top of the program: backend, _ = distbatch.create_backend(\"multiworker\"), "
                "then fit(..., backend=backend)")
        # TensorFlow waits for missing peers in C++ holding the GIL, forever and silently:
        # meet them first, where a deadline and signals work (distbatch/backends/cluster.py).
        rendezvous(workers, index, timeout)
        gpus = tf.config.list_physical_devices("GPU")
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        options = (collective or CollectiveOptions()).to_tf(tf)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options)
        interrupts.reclaim()  # the strategy installed TF's own SIGTERM handler, which swallows it
        super().__init__(strategy, num_workers=num_workers, worker_index=index)

    def sync_flag(self, flag: bool) -> bool:
        value = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(lambda: tf.constant(1.0 if flag else 0.0)), axis=None)
        return bool(value.numpy() > 0)
