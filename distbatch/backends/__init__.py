"""Backends by name, and the `auto` choice."""
from __future__ import annotations

import json
import os
from typing import Mapping

from distbatch.backends.arrivals import resolve_timeout
from distbatch.backends.base import Backend
from distbatch.backends.horovod import launched_by_horovod_or_mpi
from distbatch.backends.strategy import CollectiveOptions, slurm_task_count
from distbatch.errors import ParameterError, UsageError, param_name

BACKENDS = ("auto", "single", "mirrored", "multiworker", "horovod")


def choose_backend(env: Mapping[str, str], num_gpus: int, cpu_replicas: int | None = None
                   ) -> tuple[str, str]:
    """The `auto` rule, as a pure function: returns (backend name, reason)."""
    if launched_by_horovod_or_mpi(env):
        return "horovod", "launched by horovodrun/mpirun"
    raw = env.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
            n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
            unsupported = set(cluster) - {"worker", "chief"}
        except (ValueError, AttributeError, TypeError, RecursionError):
            n, unsupported = 2, set()  # let the multiworker backend report the malformed TF_CONFIG
        if unsupported:  # e.g. a "ps" job: the multiworker backend refuses it with one line
            return "multiworker", f"TF_CONFIG names job(s) {', '.join(sorted(map(str, unsupported)))}"
        if n > 1:
            return "multiworker", f"TF_CONFIG names {n} workers"
    if slurm_task_count(env) > 1:
        return "multiworker", f"Slurm job with {slurm_task_count(env)} tasks"
    if cpu_replicas:
        return "mirrored", f"{param_name('cpu_replicas')} {cpu_replicas}"
    if num_gpus > 1:
        return "mirrored", f"{num_gpus} local GPUs"
    return "single", f"{num_gpus} GPU(s), no launcher"


def create_backend(name: str = "auto", *, cpu_replicas: int | None = None,
                   env: Mapping[str, str] | None = None,
                   cluster_timeout: float | None = None,
                   collective: CollectiveOptions | None = None,
                   stall_timeout: float | None = None) -> tuple[Backend, str]:
    """Create the backend; returns (backend, reason for the choice).

    ``cluster_timeout``: seconds a multiworker job waits for all its workers
    (None: $DISTBATCH_CLUSTER_TIMEOUT or 120 s; see distbatch/backends/cluster.py).
    ``collective``: MultiWorkerMirroredStrategy's communication options (multiworker only).
    ``stall_timeout``: Horovod: seconds a rank waits for the others before the job ends with a
    line naming the ranks that did not arrive (None: $DISTBATCH_STALL_TIMEOUT or derived from
    the measured call time; distbatch/backends/arrivals.py).
    """
    env = os.environ if env is None else env
    resolve_timeout(stall_timeout, env={})  # a bad value is an error on every backend
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    reason = "requested"
    if name == "auto":
        import tensorflow as tf
        name, reason = choose_backend(env, len(tf.config.list_physical_devices("GPU")),
                                      cpu_replicas)
    if cpu_replicas is not None and name != "mirrored":
        raise ParameterError(f"{{cpu_replicas}} {cpu_replicas} only applies to {{backend}} mirrored, "
                             f"not {name}", "cpu_replicas", "backend")
    if collective is not None and not collective.is_default and name != "multiworker":
        raise ParameterError(f"{{mwms_implementation}}/{{bytes_per_pack}}/{{collective_timeout}} apply "
                             f"to {{backend}} multiworker, not {name} (Horovod: `distbatch launch "
                             f"horovod {{fusion_threshold_mb}}/{{cycle_time_ms}}`)",
                             "mwms_implementation", "bytes_per_pack", "collective_timeout", "backend",
                             "fusion_threshold_mb", "cycle_time_ms")
    if name == "single":
        from distbatch.backends.single import SingleBackend
        return SingleBackend(), reason
    if name == "mirrored":
        from distbatch.backends.strategy import MirroredBackend
        return MirroredBackend(cpu_replicas=cpu_replicas), reason
    if name == "multiworker":
        from distbatch.backends.strategy import MultiWorkerBackend
        return MultiWorkerBackend(env, cluster_timeout=cluster_timeout, collective=collective), reason
    from distbatch.backends.horovod import HorovodBackend
    return HorovodBackend(env, stall_timeout=stall_timeout), reason


__all__ = ["Backend", "BACKENDS", "CollectiveOptions", "choose_backend", "create_backend"]
