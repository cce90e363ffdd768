"""Out of device memory: how it is recognised and the one line the user gets.

A training step's failure, so the training package owns it; the training job
(distbatch.training.job), `distbatch probe-batch` (distbatch.measure.probe) and the sweep use
it (distbatch/measure/oom.py re-exports it).
"""
from __future__ import annotations

import sys

from distbatch.errors import UsageError, io_failure_message, param_name


class OutOfMemory(UsageError):
    """A training step ran out of device memory (the CLI prints one line, exit 2)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for TensorFlow's ResourceExhaustedError (device OOM) and Python's MemoryError.

    Not for a full disk: TensorFlow reports ENOSPC as ResourceExhaustedError too
    ("No space left on device"), which is an I/O error (errors.io_failure_message).
    """
    if isinstance(exc, (MemoryError, OutOfMemory)):
        return True
    if io_failure_message(exc) is not None:
        return False
    # Only a TensorFlow already loaded can have raised its error: this module does not load it
    # (the CLI's probe-batch parser imports it).
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.ResourceExhaustedError)


def oom_message(plan) -> str:
    """The one-line advice after an out-of-memory step at `plan` (a BatchPlan)."""
    b, R, K, B = (plan.per_replica_batch_size, plan.replicas, plan.accumulation_steps,
                  plan.global_batch_size)
    hint = (f"{param_name('accumulation_steps')} {2 * K} keeps global batch {B} at per-replica {b // 2}; "
            if b >= 2 else "")
    return (f"out of memory at per-replica batch {b} (global batch {B} = {b} per replica x {R} "
            f"replicas x {K} accumulation steps); use a smaller per-replica batch: {hint}"
            f"or more replicas; `distbatch probe-batch` finds the largest per-replica batch that fits")
