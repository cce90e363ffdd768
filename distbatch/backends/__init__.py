"""Backends by name, and the `auto` choice.

This package is read without TensorFlow (the CLI's parsers take BACKENDS from it, the launcher
uses backends/cluster.py). `create_backend` (backends/create.py, every backend) and `Backend`
(backends/base.py, the interface, which uses TensorFlow and NumPy) load TensorFlow: they are
exported from here when first used (as distbatch/__init__.py exports the API).
"""
from __future__ import annotations

import importlib
import json
from typing import Mapping

from distbatch.backends.environment import (CollectiveOptions, launched_by_horovod_or_mpi,
                                            slurm_task_count)
from distbatch.choices import BACKENDS
from distbatch.errors import param_name


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


# name -> the module that defines it; it loads TensorFlow, so only when the name is used.
_LAZY = {"create_backend": "distbatch.backends.create", "Backend": "distbatch.backends.base"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distbatch.backends' has no attribute {name!r}")


__all__ = ["Backend", "BACKENDS", "CollectiveOptions", "choose_backend", "create_backend"]
