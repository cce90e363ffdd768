"""`distbatch launch multiworker --max-restarts K --min-workers M`: go on without a worker that
stays dead.

A restart (:mod:`distbatch.launch.restarts`) starts every worker again from the newest
checkpoint. A worker whose host is gone fails again at once, at every restart, until the
restarts are used up. With ``--min-workers M`` the launcher tells such a worker apart and
continues on the others.

The rule (:meth:`Survivors.failed`). Each failed attempt is charged to the worker that caused
it: the rank the supervisor names (a rank killed by a signal or stopped before a peer that
then failed in its collective; :func:`distbatch.launch.supervisor.root_cause`). A worker
*stayed dead* when it caused ``--dead-after D`` (default 2) failed attempts in a row and the
job wrote no new checkpoint between the first and the last of them. A failure after which the
newest checkpoint in ``--out`` is newer than the attempt started from (the job made progress)
starts every count again, and so does a failure caused by another worker. With D = 2: a worker
failed, every worker was restarted from the checkpoint, and the same worker failed again
before the job saved a new one (for instance at once, because its host is gone). A worker that
fails to start (its process exits before training) counts like any other failure.

Then, while at least M workers remain, the dead worker is dropped and the survivors restart
with a new TF_CONFIG of fewer workers (ranks renumbered in the order of their original worker
indices, ports chosen again) and ``--resume``: `distbatch train` continues the run from its
newest checkpoint with the same global batch, split across fewer workers
(distbatch/training/job.py). One line says so. Below M the launcher stops with one line naming
the worker. A dropped worker is not tried again, and the job does not grow back.

Record (:meth:`Survivors.record`): ``OUT/world_sizes.json``, one entry per start of the job:
its time, number of workers (and their original indices), the step it started from, the
failure that caused it, the workers dropped, when it was training, how it ended, and the steps
and seconds the failure before it lost:

* ``steps_lost``: steps taken after the checkpoint the start resumed from and thrown away: the
  last step the previous start printed (its ``step N/M`` lines, one per evaluation) minus this
  start's step, 0 when the previous start never trained; ``null`` when not known (the trainer
  prints no line per step).
* ``seconds_lost``: wall time without kept progress: from the later of the checkpoint's write
  and the moment the previous training start began training, to the moment this start was
  training again (its ``resumed from ... at step S`` line; ``distbatch: compiling the train
  step`` for a start with no checkpoint to resume), ``null`` for a start that never trained.
  Their sum over a job is the time the restarts cost, start-up of the new processes included.

Written only into an ``--out`` that distbatch owns (its ``.distbatch-run`` marker) and only
once this job has trained there, so a refused or mistyped ``--out`` is never touched.
"""
from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distbatch.errors import UsageError
from distbatch.fileio import atomic_write_json
from distbatch.launch import restarts
from distbatch.outdir import owned

DEFAULT_DEAD_AFTER = 2
RECORD = "world_sizes.json"

# The chief's lines that say the run is training, and the step it reached
# (distbatch/training/trainer.py, distbatch/training/job.py, the progress line).
RESUMED = re.compile(r"resumed from \S+ at step (\d+)\s*$")
COMPILING = "distbatch: compiling the train step"
STEP = re.compile(r"\bstep (\d+)/\d+\b")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_min_workers(min_workers: int | None, *, workers: int | None, max_restarts: int,
                      dead_after: int | None, command: Sequence[str]) -> None:
    """UsageError (one line) unless --min-workers / --dead-after can work for this job."""
    if min_workers is None:
        if dead_after is not None:
            raise UsageError(f"--dead-after {dead_after} applies only with --min-workers M (it says when "
                             "a worker stayed dead and the job continues without it)")
        return
    if not _whole(min_workers) or min_workers < 1:
        raise UsageError(f"--min-workers must be an integer >= 1, got {min_workers!r}")
    if dead_after is not None and (not _whole(dead_after) or dead_after < 1):
        raise UsageError(f"--dead-after must be an integer >= 1, got {dead_after!r}")
    if not max_restarts:
        raise UsageError(f"--min-workers {min_workers} continues on the surviving workers at a restart; "
                         "it needs --max-restarts K (K >= 1)")
    if workers is None:
        raise UsageError(f"--min-workers {min_workers} needs --workers N (a local job)")
    if min_workers > workers:
        raise UsageError(f"--min-workers {min_workers} is more than --workers {workers}; expected "
                         f"1..{workers} (the fewest workers the job may continue on)")
    at = restarts._subcommand(command)
    if min_workers < workers and at is not None and command[at] == "sweep":
        raise UsageError(f"--min-workers {min_workers} (below --workers {workers}) continues a "
                         "`distbatch train` run on fewer workers; a `distbatch sweep` is restarted on "
                         "all its workers only: leave out --min-workers")


def rank_label(rank: int, worker: int) -> str:
    """How the supervisor names a rank: ``rank 1``, or ``rank 0 (worker 1)`` once ranks and the
    original worker indices differ."""
    return f"rank {rank}" if rank == worker else f"rank {rank} (worker {worker})"


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _workers(n: int) -> str:
    return "no worker" if n == 0 else f"{n} worker" if n == 1 else f"{n} workers"


@dataclass(frozen=True)
class Decision:
    """What a failure changed: a worker stayed dead (``worker``), and either the job continues
    without it (``stop`` False) or stops (``stop`` True, ``line`` to print)."""

    worker: int
    reason: str
    stop: bool
    line: str = ""


def _step(checkpoint: tuple[int, str] | None) -> int:
    return checkpoint[0] if checkpoint else -1


class Survivors:
    """The workers of a job that may shrink, the dead-worker rule and the job's record.

    Used by :func:`distbatch.launch.restarts.run_with_restarts` (``world=``): ``started`` before
    each attempt, ``failed`` after a failed one, ``shrink_line`` for a restart that drops a
    worker, ``ended`` at the end. ``on_line`` sees the workers' output lines (the supervisor's
    pump threads). ``checkpoint`` (``out -> (step, dir) | None``) and ``clock`` are replaceable
    in tests.
    """

    def __init__(self, workers: int, min_workers: int, dead_after: int | None = None, *,
                 checkpoint: Callable[[str], tuple[int, str] | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.alive = list(range(workers))
        self.min_workers = min_workers
        self.dead_after = DEFAULT_DEAD_AFTER if dead_after is None else dead_after
        self.strikes: dict[int, int] = {}
        self.starts: list[dict] = []
        self.out: str | None = None
        self._checkpoint = checkpoint or restarts.newest_checkpoint
        self._clock = clock
        self._at_start: tuple[int, str] | None = None
        self._next: dict = {}        # what the next start records about why it happened
        self._saved_to: str | None = None
        # on_line runs in the supervisor's pump threads; one may outlive its attempt briefly
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the workers
    @property
    def size(self) -> int:
        return len(self.alive)

    def labels(self) -> list[str]:
        """The supervisor's name of each rank of the next start, in rank order."""
        return [rank_label(r, w) for r, w in enumerate(self.alive)]

    def worker_of(self, who: str) -> int | None:
        """The original worker index of the rank the supervisor named ``who``, else None."""
        for r, w in enumerate(self.alive):
            if who == rank_label(r, w):
                return w
        return None

    # ------------------------------------------------------------------ the attempts
    def _newest(self) -> tuple[int, str] | None:
        out = self.out
        if not out or not os.path.isdir(out):
            return None
        return self._checkpoint(out)

    def started(self, cmd: Sequence[str]) -> None:
        """An attempt of ``cmd`` starts now, on ``self.alive``."""
        self.out = restarts.out_dir(cmd)
        self._at_start = self._newest()
        resumed = "--resume" in cmd
        entry = {"started": self._clock(), "workers": self.size, "worker_ids": list(self.alive),
                 "from_step": self._at_start[0] if (resumed and self._at_start) else 0,
                 "resumed": resumed, **self._next}
        entry["_checkpoint_time"] = self._written(self._at_start) if resumed else None
        self._next = {}
        with self._lock:
            self.starts.append(entry)
        self._account()
        self.save()

    def on_line(self, line: str) -> None:
        """A worker's output line: notes when the current start trains and the step it reached."""
        with self._lock:
            if not self.starts:
                return
            entry, text = self.starts[-1], line.rstrip()
            # Training from the `resumed from` line (a resumed start compiles first, then
            # restores), else from the compile line (a fresh start, or a resume that found no
            # checkpoint).
            if RESUMED.search(text) and not entry.get("_resumed_line"):
                entry["trained_at"], entry["_resumed_line"] = self._clock(), True
            elif COMPILING in text and entry.get("trained_at") is None:
                entry["trained_at"] = self._clock()
            m = STEP.search(text)
            if m:
                entry["last_step"] = max(int(m.group(1)), entry.get("last_step") or 0)

    def failed(self, who: str, how: str, code: int) -> Decision | None:
        """Charge the failure of the current attempt to the worker that caused it; a Decision
        when that worker stayed dead (:data:`dead_after` failures in a row, no new checkpoint
        between them), None otherwise."""
        self._end(code, f"{who} {how}")
        self._next = {"after": f"{who} {how}"}
        if _step(self._newest()) > _step(self._at_start):
            self.strikes.clear()  # the job made progress: every count starts again
        worker = self.worker_of(who)
        if worker is None:  # not a rank we can name: nobody is charged
            self.strikes.clear()
            return None
        self.strikes = {worker: self.strikes.get(worker, 0) + 1}  # in a row: the others start again
        n = self.strikes[worker]
        if n < self.dead_after:
            return None
        reason = (f"worker {worker} stayed dead (failed {_times(n)} in a row with no new checkpoint in "
                  f"between; the last time: {who} {how})")
        remain = self.size - 1
        if remain < self.min_workers:
            self.save()
            return Decision(worker, reason, stop=True, line=(
                f"distbatch launch: not restarting: {reason}; {_workers(remain)} would remain, fewer "
                f"than --min-workers {self.min_workers}; exiting with status {code}"))
        self.alive.remove(worker)
        self.strikes.clear()
        self._next["dropped"] = [worker]
        self.save()
        return Decision(worker, reason, stop=False)

    def shrink_line(self, attempt: int, max_restarts: int, decision: Decision,
                    checkpoint: tuple[int, str] | None, resume: bool) -> str:
        """The one line of a restart that drops a worker (instead of restarts.restart_line)."""
        if not resume:
            how = "from the start, without --resume (the run wrote nothing yet)"
        elif checkpoint:
            how = f"with --resume from step {checkpoint[0]} ({checkpoint[1]})"
        else:
            how = "with --resume from the start (no checkpoint yet)"
        return (f"distbatch launch: restart {attempt}/{max_restarts}: {decision.reason}; continuing on "
                f"{_workers(self.size)} (--min-workers {self.min_workers}) {how}")

    def ended(self, code: int) -> list[str]:
        """The job ended with ``code``: the record's last entry, and the summary line when the
        job was restarted."""
        if self.starts and "exit" not in self.starts[-1]:
            self._end(code, None)
        self.save()
        restarted = self.starts[1:]
        if not restarted:
            return []
        sizes = " -> ".join(str(e["workers"]) for e in self.starts)
        seconds = sum(e["seconds_lost"] for e in restarted if e.get("seconds_lost") is not None)
        steps = [e["steps_lost"] for e in restarted if e.get("steps_lost") is not None]
        unknown = len(restarted) - len(steps)
        line = (f"distbatch launch: world sizes {sizes} over {len(self.starts)} starts; the "
                f"{len(restarted)} restart(s) ")
        if any(e.get("trained_at") is not None for e in restarted):
            line += f"lost {seconds:.1f} s and {sum(steps)} step(s)"
            if unknown:
                line += f" (steps not known for {unknown})"
        else:
            line += "never got back to training"
        if self._saved_to:
            line += f"; recorded in {self._saved_to}"
        return [line]

    # ------------------------------------------------------------------ the record
    def _end(self, code: int, failure: str | None) -> None:
        with self._lock:
            entry = self.starts[-1]
            entry["ended"] = self._clock()
            entry["exit"] = code
            if failure:
                entry["failure"] = failure
            self._account()

    @staticmethod
    def _written(checkpoint: tuple[int, str] | None) -> float | None:
        if not checkpoint:
            return None
        try:
            return os.path.getmtime(os.path.join(checkpoint[1], f"ckpt-{checkpoint[0]}.index"))
        except OSError:
            return None

    def _account(self) -> None:
        """steps_lost and seconds_lost of every restart whose numbers are known now."""
        with self._lock:
            self._account_locked()

    def _account_locked(self) -> None:
        trained_before: float | None = None
        for k, entry in enumerate(self.starts):
            if k and "steps_lost" not in entry:
                prev = self.starts[k - 1]
                if prev.get("trained_at") is None:
                    entry["steps_lost"] = 0  # the previous start took no step
                elif (prev.get("last_step") or -1) > entry["from_step"]:
                    entry["steps_lost"] = prev["last_step"] - entry["from_step"]
                elif "exit" in prev:
                    entry["steps_lost"] = None
            if k and entry.get("trained_at") is not None and entry.get("seconds_lost") is None:
                since = max((t for t in (entry["_checkpoint_time"], trained_before) if t is not None),
                            default=self.starts[0]["started"])
                entry["seconds_lost"] = max(0.0, entry["trained_at"] - since)
            if entry.get("trained_at") is not None:
                trained_before = entry["trained_at"]

    def record(self) -> list[dict]:
        """The entries of OUT/world_sizes.json (times rounded to ms, private keys left out)."""
        rows = []
        with self._lock:
            entries = [dict(entry) for entry in self.starts]
        for entry in entries:
            row = {k: v for k, v in entry.items() if not k.startswith("_")}
            for k in ("started", "trained_at", "ended", "seconds_lost"):
                if isinstance(row.get(k), float) and math.isfinite(row[k]):
                    row[k] = round(row[k], 3)
            rows.append(row)
        return rows

    def save(self) -> None:
        """Write OUT/world_sizes.json when --out is distbatch's and this job trained there."""
        out = self.out
        if not out or not any(e.get("trained_at") is not None for e in self.starts):
            return
        if not (os.path.isdir(out) and owned(out)):
            return
        path = os.path.join(out, RECORD)
        try:
            atomic_write_json(path, self.record())
            self._saved_to = path
        except OSError as e:  # the record is a report: the job goes on without it
            print(f"distbatch launch: could not write {path} ({e.strerror or e})", file=sys.stderr,
                  flush=True)
