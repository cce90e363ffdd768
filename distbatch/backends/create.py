"""Create a backend by name (`create_backend`; exported by distbatch.backends).

Its own module because it imports every backend, and so TensorFlow: the package itself
(BACKENDS, the `auto` rule) is read by the CLI's parsers and the launcher, which must not
load TensorFlow.
"""
from __future__ import annotations

import os
from typing import Mapping

import tensorflow as tf

from distbatch.backends import BACKENDS, choose_backend
from distbatch.backends.arrivals import resolve_timeout
from distbatch.backends.base import Backend
from distbatch.backends.environment import CollectiveOptions
from distbatch.backends.horovod import HorovodBackend
from distbatch.backends.single import SingleBackend
from distbatch.backends.strategy import MirroredBackend, MultiWorkerBackend
from distbatch.errors import ParameterError, UsageError


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
        return SingleBackend(), reason
    if name == "mirrored":
        return MirroredBackend(cpu_replicas=cpu_replicas), reason
    if name == "multiworker":
        return MultiWorkerBackend(env, cluster_timeout=cluster_timeout, collective=collective), reason
    return HorovodBackend(env, stall_timeout=stall_timeout), reason
