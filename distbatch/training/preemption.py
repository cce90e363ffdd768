"""Decisions every worker must take at the same step: save now (by time), stop now (preempted).

A cluster preempts a job by sending SIGTERM (Slurm, Kubernetes), usually to
one process first, then SIGKILL some 30 s later. TensorFlow's
PreemptionCheckpointHandler answers by having every worker save at the same
step and exit; distbatch does the same with its own pieces:

1. While the training loop runs, SIGTERM only sets a flag
   (:func:`distbatch.interrupts.arm_preemption`).
2. At every call boundary (a call runs ~1 s of steps) the Trainer asks
   :class:`CallBoundary` whether to save and whether to stop. With several
   workers the answer is agreed with ``backend.sync_flag`` (an all-reduced
   OR): a SIGTERM to ANY worker stops ALL of them at the same step, and the
   time-based checkpoint cadence follows the chief's clock.
3. Every worker saves the checkpoint of that step, waits for the others (a
   barrier, so the chief's files are complete before anyone exits) and exits
   with :data:`EXIT_PREEMPTED`. A resumed run (``resume``, or a launcher
   restart) continues from there exactly.

Exit status 75 (EX_TEMPFAIL in sysexits.h, "temporary failure, try again")
means "stopped on SIGTERM after saving a checkpoint at a step boundary";
143 (128 + SIGTERM) stays "stopped by SIGTERM without a new checkpoint"
(before training started, or through the hang watchdog).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

from distbatch.errors import param_name

EXIT_PREEMPTED = 75
# Set in every worker's environment by `distbatch launch` when it restarts workers (its
# max_restarts > 0): the default of a run's checkpoint_every_seconds (a restart repeats at most
# this much training).
CHECKPOINT_SECONDS_ENV = "DISTBATCH_CHECKPOINT_EVERY_SECONDS"
LAUNCH_CHECKPOINT_SECONDS = 300.0


class Preempted(Exception):
    """Every worker saved a checkpoint at `step` after a SIGTERM; the command exits 75."""

    def __init__(self, step: int, checkpoint_dir: str | None) -> None:
        super().__init__(f"step {step}")
        self.step, self.checkpoint_dir = step, checkpoint_dir

    def message(self) -> str:
        where = f" in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        return (f"preempted by SIGTERM: every worker saved a checkpoint at step {self.step}{where}; "
                f"continue with {param_name('resume')}")


def checkpoint_seconds(flag: float | None, env: dict | None = None) -> float:
    """checkpoint_every_seconds as given (`flag`), else the launcher's default from the
    environment, else 0 (off). A bad environment value counts as off: the user did not give it."""
    if flag is not None:
        return float(flag)
    raw = (os.environ if env is None else env).get(CHECKPOINT_SECONDS_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def time_due(now: float, last_save: float, every_seconds: float) -> bool:
    """True when a time-based checkpoint is due: `every_seconds` > 0 have passed since the last."""
    return every_seconds > 0 and now - last_save >= every_seconds


# With several workers, the save/stop decision costs one all-reduce; it is taken about this
# often (in calls, the same count on every worker: see CallBoundary.every_calls).
SYNC_SECONDS = 1.0


def sync_every_calls(call_seconds: float) -> int:
    """Calls between two save/stop decisions, for calls of `call_seconds` (the chief's)."""
    if not call_seconds > 0:
        return 1
    return int(min(1000, max(1, round(SYNC_SECONDS / call_seconds))))


class CallBoundary:
    """At call boundaries: (save now, stop after saving), the same on every worker.

    With several workers and something that can ask for a save (a SIGTERM being
    watched, or a time cadence) the decision is one all-reduce, taken at every
    `every_calls`-th call (counted alike on every worker; the trainer sets it once
    from the chief's call time, so that a decision costs one collective about every
    SYNC_SECONDS instead of one per call; with the trainer's re-timing fixed at the same
    time, per-call collectives had cost Horovod runs on a 1 Gbit/s link 7%, docs/scaling.md);
    a single worker decides at every call, for free.
    `requested()` says whether SIGTERM arrived here; `clock` is injectable for tests.
    """

    def __init__(self, backend, every_seconds: float, requested: Callable[[], bool] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend, self.every, self.requested, self.clock = backend, every_seconds, requested, clock
        self.sync = backend.num_workers > 1 and (every_seconds > 0 or requested is not None)
        self.last = clock()
        self.every_calls, self.calls = 1, 0

    def decide(self) -> tuple[bool, bool]:
        self.calls += 1
        if self.sync and self.calls % self.every_calls:
            return False, False  # not a decision call, on any worker
        stop = bool(self.requested and self.requested())
        # Only the chief's clock counts: workers started at different moments.
        due = self.backend.is_chief and time_due(self.clock(), self.last, self.every)
        if not self.sync:
            return stop or due, stop
        save = self.backend.sync_flag(stop or due)
        return save, (self.backend.sync_flag(stop) if save else False)

    def saved(self) -> None:
        self.last = self.clock()


def chief_ints(backend, *values: int) -> tuple[int, ...]:
    """The chief's whole numbers on every worker, in ONE collective (Backend.broadcast_from_chief).

    Used once per run, after the first timed call: each worker timed its own calls, but
    steps_per_execution="auto" and the decision cadence above need the same call boundaries
    everywhere. It was 2 x 16 one-bit all-reduces: on 2 Horovod workers at 1 Gbit/s the step
    after them took 379 ms, 351 ms with this one (Horovod timelines of 2026-11-27, docs/scaling.md).
    """
    values = [int(v) for v in values]  # one int64 array to broadcast_from_chief
    if backend.num_workers == 1:
        return tuple(values)
    return tuple(int(v) for v in backend.broadcast_from_chief([values])[0])
