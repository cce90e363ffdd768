"""The backend interface: what the shared train step needs from a runtime.

One training step (distbatch.training.step) runs unchanged on every backend. A backend
only says how many replicas there are, how a per-worker dataset is fed to
them, how a function runs on each replica, and how tensors are summed across
replicas. Implementations stay small: single.py, strategy.py (mirrored and
multiworker), horovod.py.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf


# A bucket cap below any tensor's size: every gradient tensor is a bucket of its own.
PER_TENSOR_BUCKET_MB = 1e-6


class Backend(abc.ABC):
    """A data-parallel runtime. Subclasses set name, num_replicas, num_workers, worker_index."""

    name: str = "?"
    num_replicas: int = 1
    num_workers: int = 1
    worker_index: int = 0
    # What `--bucket-mb auto` means here (distbatch.training.step.resolve_bucket_mb): 0 = the
    # gradients in ONE all-reduce; PER_TENSOR_BUCKET_MB = one all-reduce per gradient tensor.
    auto_bucket_mb: float = 0.0

    @property
    def local_replicas(self) -> int:
        """Replicas driven by this process (GPUs of this worker, or 1 per Horovod rank)."""
        return self.num_replicas // self.num_workers

    @property
    def is_chief(self) -> bool:
        """Only the chief prints, writes files, TensorBoard and checkpoints."""
        return self.worker_index == 0

    def scope(self) -> contextlib.AbstractContextManager:
        """Context in which model and optimizer variables are created."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def distribute(self, make_dataset: Callable[[int, int], Any]) -> Any:
        """Feed a per-worker dataset to the local replicas.

        make_dataset(worker_index, local_replicas) returns a tf.data.Dataset whose
        consecutive elements go to local replicas 0..L-1, step after step.
        """

    def iterator(self, make_dataset: Callable[[int, int], Any]) -> Any:
        """An iterator over distribute(make_dataset): what every loop of distbatch reads."""
        return iter(self.distribute(make_dataset))

    @abc.abstractmethod
    def run(self, fn: Callable, args: Sequence = ()) -> Any:
        """Run fn on every local replica (replica context)."""

    @abc.abstractmethod
    def all_reduce_sum(self, values: list, name: str | None = None) -> list:
        """Sum tensors across ALL replicas (called in replica context). `name` identifies
        the call the same way on every rank (Horovod matches collectives by name)."""

    def waiting(self, label: str) -> contextlib.AbstractContextManager:
        """Context of a call that blocks until every worker arrives; `label` names it in the
        error when a worker does not arrive in time (Horovod: backends/arrivals.py)."""
        return contextlib.nullcontext()

    def replica_index(self):
        """This replica's index among all replicas, 0..num_replicas-1 (in replica context;
        a tensor or an int)."""
        return 0

    def local_value(self, value: Any) -> Any:
        """One replica's copy of a value that all_reduce_sum made identical everywhere."""
        return value

    def prepare(self, model, optimizer) -> None:
        """Make initial weights and optimizer slots identical on every replica.

        Called once after the model and optimizer are built inside scope().
        """

    def sync_flag(self, flag: bool) -> bool:
        """True if flag is true on ANY worker (for early stop / divergence decisions)."""
        return flag

    def broadcast_from_chief(self, arrays: list) -> list:
        """Every worker gets the chief's copy of `arrays` (NumPy), e.g. weights a Keras
        callback changed on the chief only. One all-reduce: the chief's local replicas each
        send their share, everyone else zeros."""
        if self.num_workers == 1:
            return list(arrays)
        L = self.local_replicas
        values = [tf.constant(np.asarray(a, np.float64) / L if self.is_chief
                              else np.zeros(np.shape(a))) for a in arrays]

        @tf.function
        def share():
            out = self.run(lambda: self.all_reduce_sum(values, name="distbatch_from_chief"))
            return [self.local_value(o) for o in out]

        return [np.asarray(o.numpy()).astype(np.asarray(a).dtype)
                if np.issubdtype(np.asarray(a).dtype, np.floating)
                else np.rint(o.numpy()).astype(np.asarray(a).dtype)
                for o, a in zip(share(), arrays)]

    def gather_from_workers(self, value: float) -> list[float]:
        """Every worker's `value` (a float64-exact number), in worker order, on every worker:
        one all-reduce of a vector where each worker fills its own entry."""
        if self.num_workers == 1:
            return [float(value)]
        mine = np.zeros(self.num_workers)
        mine[self.worker_index] = float(value) / self.local_replicas
        fn = self.__dict__.get("_gather_fn")
        if fn is None:  # traced once: the vector is an argument, not a captured constant
            @tf.function
            def fn(t):
                out = self.run(lambda: self.all_reduce_sum([tf.identity(t)], name="distbatch_gather"))
                return self.local_value(out[0])
            self._gather_fn = fn
        return [float(v) for v in fn(tf.constant(mine)).numpy()]

    def average_replica_state(self, variables: list) -> None:
        """Set every replica's copy of the float `variables` (Keras variables, e.g. a
        BatchNormalization layer's moving mean and variance) to their mean over all replicas.

        Each replica updates its own copy of such state from its own slice of the batch, so
        the copies drift apart: evaluated under the strategy each replica used its own, while
        the saved model holds replica 0's (measured: a BatchNorm model on mirrored logged
        val_loss 0.41413, the returned model evaluated to 0.41403 and its saved copy to
        0.41483). The moving statistics are exponential averages, linear in the batch
        statistics, so averaging the copies at each evaluation equals averaging them at every
        step: the moving mean becomes exactly one device's at the global batch."""
        if self.num_replicas == 1:
            return
        chosen = [v for v in variables if v.dtype in ("float16", "bfloat16", "float32", "float64")]
        if not chosen:
            return
        R = self.num_replicas
        cache = self.__dict__.setdefault("_replica_state_fns", {})
        key = tuple(id(v) for v in chosen)
        if key not in cache:  # traced once per variable list, not at every evaluation
            @tf.function
            def mean():
                def local():
                    return self.all_reduce_sum([tf.cast(v.value.read_value(), tf.float32) / R
                                                for v in chosen], name="distbatch_replica_state")
                return [self.local_value(o) for o in self.run(local)]
            cache.clear()
            cache[key] = mean
        for v, m in zip(chosen, cache[key]()):
            v.value.assign(tf.cast(m, v.dtype))

    def describe(self) -> str:
        return (f"{self.name}: {self.num_replicas} replica(s) on {self.num_workers} worker(s), "
                f"this is worker {self.worker_index}")

    def shutdown(self) -> None:
        """Release runtime resources at the end of a run."""
