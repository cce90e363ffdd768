"""Horovod backend: horovod.tensorflow core collectives only.

horovod.keras / horovod.tensorflow.keras are NOT used: under Keras 3 their
DistributedOptimizer runs but silently skips gradient averaging, and their
callbacks fail (see docs/backends.md). distbatch calls the collectives itself:
hvd.grouped_allreduce for gradients and metrics, hvd.broadcast for the initial state.
One process per replica; each pins one GPU by local rank.

Every collective is named by its POSITION in the program (the caller's name, or the
variable's index), never by a Keras name: Horovod matches tensors across ranks by name, and
Keras's auto-names differ between ranks that built different numbers of layers before (a
rank-0-only baseline model), which left every rank waiting forever in the initial broadcast.
Before that broadcast the ranks compare their models by position (backends/model_check.py),
and every blocking call runs under a bound that names the ranks that did not arrive
(backends/arrivals.py).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import tensorflow as tf

from distbatch.backends import model_check
from distbatch.backends.arrivals import Arrivals, resolve_timeout
from distbatch.backends.base import PER_TENSOR_BUCKET_MB, Backend
from distbatch.backends.environment import LAUNCHER_MARKERS, launched_by_horovod_or_mpi  # noqa: F401
from distbatch.errors import ParameterError, UsageError


def pin_gpu(local_rank: int, config) -> str | None:
    """Give this process one GPU, chosen by local rank, with memory growth.

    `config` is tf.config (injectable for tests). Returns the GPU's name, or
    None on a machine without GPUs. Memory growth is set on every GPU before
    any is initialised, as TF requires.
    """
    gpus = config.list_physical_devices("GPU")
    if not gpus:
        return None
    for gpu in gpus:
        config.experimental.set_memory_growth(gpu, True)
    chosen = gpus[local_rank % len(gpus)]
    config.set_visible_devices(chosen, "GPU")
    return chosen.name


_ARRIVALS: list = []


def _process_arrivals(hvd, timeout: float | None) -> Arrivals:
    """One status exchange per process, whatever the number of backends a script creates (a
    second exchange thread would submit the same collective name while the first one's is
    in flight, which Horovod refuses). A later backend's bound replaces the earlier one."""
    if not _ARRIVALS:
        gather = tf.function(lambda t: hvd.allgather(t, name="distbatch_status"))
        arrivals = Arrivals(lambda row: gather(row.reshape(1, -1)).numpy(), hvd.rank(), hvd.size())
        if hvd.size() > 1:
            arrivals.start()
        _ARRIVALS.append(arrivals)
    _ARRIVALS[0].timeout = timeout
    return _ARRIVALS[0]


class HorovodBackend(Backend):
    name = "horovod"
    # Horovod 0.28.1's TensorFlow all-reduce takes uint8/int8/int32/int64/float16/32/64:
    # no bfloat16.
    grad_compressions = ("none", "fp16")
    # bucket_mb "auto": one all-reduce per gradient tensor, as Horovod's DistributedGradientTape
    # issues them. Each is enqueued the moment backprop produces it; the background thread
    # fuses what is ready in one cycle and reduces the last layers' gradients while the earlier
    # ones are still being computed or queued. Measured against one grouped all-reduce (2
    # workers, mlp-wide, 6 repeats): +5% at 1 Gbit/s, +7% at 3 Gbit/s, +3% on an unlimited
    # link (docs/scaling.md; benchmarks/results/scale_out/2026-11-27_per_tensor_allreduce).
    auto_bucket_mb = PER_TENSOR_BUCKET_MB

    def __init__(self, env: Mapping[str, str] | None = None, *,
                 stall_timeout: float | None = None) -> None:
        env = os.environ if env is None else env
        timeout = resolve_timeout(stall_timeout, env)
        try:  # optional: installed by scripts/bootstrap.sh, needed only on this backend
            import horovod.tensorflow as hvd
        except ImportError as e:
            raise ParameterError(f"{{backend}} horovod: Horovod is not installed ({e}); "
                                 "run `bash scripts/bootstrap.sh setup`", "backend")
        if not launched_by_horovod_or_mpi(env):
            raise ParameterError("{backend} horovod: not launched by horovodrun or mpirun "
                                 "(no HOROVOD_RANK/OMPI_COMM_WORLD_RANK in the environment); use "
                                 "`distbatch launch horovod -np N -- distbatch train ...`", "backend")
        hvd.init()
        self.hvd = hvd
        self.gpu = pin_gpu(hvd.local_rank(), tf.config)
        self.num_replicas = hvd.size()
        self.num_workers = hvd.size()
        self.worker_index = hvd.rank()
        self._names: dict = {}
        # Eager Horovod ops ignore name= (every eager allgather is "HorovodAllgather"), so
        # the collectives that may run beside another one are graphs with their own names.
        self._sig_gather = tf.function(lambda n, sig: (hvd.allgather(n, name="distbatch_sig_n"),
                                                       hvd.allgather(sig, name="distbatch_sig")))
        self.arrivals = _process_arrivals(hvd, timeout)

    def waiting(self, label: str):
        return self.arrivals.waiting(label)

    def distribute(self, make_dataset):
        return make_dataset(self.worker_index, 1)

    def run(self, fn, args=()):
        return fn(*args)

    def replica_index(self):
        return self.worker_index

    def all_reduce_sum(self, values, name: str | None = None):
        if name is None:  # callers name their all-reduces; else the order of the calls does
            name = f"distbatch_allreduce_{self._names.setdefault('count', 0)}"
            self._names["count"] += 1
        return self.hvd.grouped_allreduce(list(values), op=self.hvd.Sum, name=name)

    def prepare(self, model, optimizer) -> None:
        if self.num_workers > 1:
            # Same model everywhere, compared by position (one allgather of each rank's list).
            mine = np.frombuffer(model_check.encode(model_check.signature(model, optimizer)), np.uint8)
            with self.waiting("model check"):
                sizes, joined = self._sig_gather(np.array([mine.size], np.int64), mine)
            joined = joined.numpy().tobytes()
            bounds = np.concatenate([[0], np.cumsum(sizes.numpy())])
            problem = model_check.first_mismatch(
                [json.loads(joined[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
            if problem:
                raise UsageError(problem)
        # Keras 3 variables are not tf.Variables: broadcast their .value, named by position.
        variables = [v.value for v in model.variables] + [v.value for v in optimizer.variables]

        @tf.function
        def broadcast(values):
            return [self.hvd.broadcast(t, root_rank=0, name=f"distbatch_init_{i}")
                    for i, t in enumerate(values)]

        with self.waiting("initial broadcast"):
            for var, value in zip(variables, broadcast([v.read_value() for v in variables])):
                var.assign(value)

    def broadcast_from_chief(self, arrays: list) -> list:
        # Horovod's own broadcast (eager): the base class's all-reduce inside a tf.function
        # fails here, as grouped_allreduce names its op after captured eager tensors' .name.
        with self.waiting("broadcast from rank 0"):
            return [np.asarray(self.hvd.broadcast(np.asarray(a), root_rank=0,
                                                  name=f"distbatch_broadcast_{i}"))
                    for i, a in enumerate(arrays)]

    def sync_flag(self, flag: bool) -> bool:
        with self.waiting("flag"):
            total = self.hvd.allreduce(tf.constant(1.0 if flag else 0.0), op=self.hvd.Sum,
                                       name="distbatch_flag")
            return bool(total.numpy() > 0)

    def shutdown(self) -> None:
        self.arrivals.stop()
        _ARRIVALS.clear()
        self.hvd.shutdown()
