"""Bounded waits in Horovod's collectives, and the ranks that did not arrive.

Horovod waits for every rank forever: a rank that never submits a collective (it is busy
elsewhere, frozen, or submitted a differently named one) leaves the others blocked inside
TensorFlow with nothing printed (measured: 4 and 20 minutes, until killed). distbatch bounds
every wait it starts:

* each blocking call (a train-step call, an evaluation, a broadcast, a flag) runs inside
  ``Arrivals.waiting(label)``, which records "this rank waits at <label> since t";
* a daemon thread exchanges every rank's status every ``interval`` seconds through one tiny
  Horovod allgather (a separate collective: Horovod negotiates it while the stalled one
  waits, and a rank busy outside any collective still answers from its thread);
* a wait longer than the bound while another rank is NOT waiting at the same label (or
  has not answered for longer than the bound) ends the process with ONE line naming the
  ranks that did not arrive, and what each is doing instead.

While every rank waits at the same label they are all inside the same call (a long
compile, a long evaluation): that is work, not a stall, and is only ended when the user set
the bound explicitly. The bound: ``timeout`` when given (``stall_timeout`` (the
CLI's flag of that name) / $DISTBATCH_STALL_TIMEOUT); otherwise STARTUP_SECONDS until two waits
completed, then max(FLOOR_SECONDS, MULTIPLIER x the median completed wait). It is the time
the other ranks may spend alone (the chief's checkpoints, callbacks and logs) before the
waiting ones give up.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from distbatch.errors import ParameterError, UsageError
from distbatch.exit_records import record_exit_code

FLOOR_SECONDS = 60.0
STARTUP_SECONDS = 300.0
MULTIPLIER = 20.0
INTERVAL_SECONDS = 2.0
LABEL_CHARS = 48
TIMEOUT_ENV = "DISTBATCH_STALL_TIMEOUT"
EXIT_STALLED = 5


@dataclass(frozen=True)
class Status:
    """One rank's state at an exchange: waiting at `label` for `age` s, or outside any
    distbatch collective for `age` s after `label` (the last wait it finished, "" if none)."""
    inside: bool
    age: float
    label: str

    def encode(self):
        """One int64 row: inside, age in ms, label length, label code points."""
        codes = [min(ord(c), 0x10FFFF) for c in self.label[:LABEL_CHARS]]
        row = np.zeros(3 + LABEL_CHARS, np.int64)
        row[0], row[1], row[2] = int(self.inside), int(self.age * 1000), len(codes)
        row[3:3 + len(codes)] = codes
        return row

    @staticmethod
    def decode(row) -> "Status":
        row = [int(v) for v in row]
        return Status(bool(row[0]), row[1] / 1000.0, "".join(map(chr, row[3:3 + row[2]])))

    def describe(self) -> str:
        if self.inside:
            return f"waiting at '{self.label}' for {self.age:.0f} s"
        after = f" since finishing '{self.label}'" if self.label else " (none entered yet)"
        return f"outside distbatch's collectives for {self.age:.0f} s{after}"


def resolve_timeout(value: float | None, env: Mapping[str, str] | None = None) -> float | None:
    """The configured bound in seconds (`value`, else $DISTBATCH_STALL_TIMEOUT), or None for
    the derived default."""
    env = os.environ if env is None else env
    from_env = value is None and bool(env.get(TIMEOUT_ENV))
    raw = env[TIMEOUT_ENV] if from_env else value
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = float("nan")
    if seconds > 0 and seconds != float("inf"):
        return seconds
    if from_env:
        raise UsageError(f"${TIMEOUT_ENV} must be a finite number > 0 of seconds, got {raw!r}")
    raise ParameterError(f"{{stall_timeout}} must be a finite number > 0 of seconds, got {raw!r}",
                         "stall_timeout")


def derived_bound(completed: list[float], timeout: float | None) -> float:
    """The wait bound: `timeout`, else STARTUP_SECONDS until two waits completed, then
    max(FLOOR_SECONDS, MULTIPLIER x the median completed wait after the first)."""
    if timeout is not None:
        return timeout
    if len(completed) < 2:
        return STARTUP_SECONDS
    return max(FLOOR_SECONDS, MULTIPLIER * statistics.median(completed[1:]))


def stall_message(rank: int, size: int, label: str, waited: float, bound: float,
                  board: dict | None, board_age: float | None, configured: bool) -> str:
    """The one line for a wait over its bound. `board`: {rank: Status} of the newest exchange,
    `board_age`: seconds since it completed (None: no exchange ever completed)."""
    how = ("" if configured else
           f"; if a rank legitimately works alone that long, raise the bound (stall_timeout, "
           f"or ${TIMEOUT_ENV})")
    head = (f"horovod: rank {rank} waited {waited:.0f} s at '{label}' (bound {bound:.0f} s) "
            f"for the other ranks")
    others = [r for r in range(size) if r != rank]
    who = (f"rank {others[0]}" if len(others) == 1 else
           f"one or more of ranks {', '.join(map(str, others))}")
    if board is None:
        return (f"{head}: {who} did not arrive: no rank answered distbatch's status exchange "
                f"yet, so {who} has not reached distbatch (still in its own code before "
                f"fit/train), or is frozen or gone{how}")
    if board_age is None or board_age > bound:
        last = ", ".join(f"rank {r} {s.describe()}" for r, s in sorted(board.items()) if r != rank)
        return (f"{head}: no status from the other ranks for {board_age:.0f} s, so {who} is "
                f"frozen or gone (last known: {last}){how}")
    missing = [(r, s) for r, s in sorted(board.items())
               if r != rank and not (s.inside and s.label == label)]
    if not missing:  # every rank waits at the same label (only checked with a set bound)
        return f"{head}: every rank is waiting at it, and it did not complete{how}"
    names = ", ".join(str(r) for r, _ in missing)
    detail = "; ".join(f"rank {r} is {s.describe()}" for r, s in missing)
    return f"{head}: rank(s) {names} did not arrive ({detail}){how}"


class Arrivals:
    """This rank's waits and everyone's statuses; see the module docstring.

    exchange(row) -> rows: an allgather of one int64 row per rank (rank order), blocking
    (NumPy arrays).
    on_stall(message): what happens at the bound (default: print and end the process).
    """

    def __init__(self, exchange: Callable, rank: int, size: int, *,
                 timeout: float | None = None, interval: float = INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 on_stall: Callable[[str], None] | None = None) -> None:
        self.exchange, self.rank, self.size = exchange, rank, size
        self.timeout, self.interval, self.clock = timeout, interval, clock
        self.on_stall = on_stall or _end_process
        self._lock = threading.Lock()
        self._label, self._inside, self._since = "", False, clock()
        self._completed: list[float] = []
        self._board: dict | None = None
        self._board_time: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- this rank ---------------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, label: str):
        with self._lock:
            self._label, self._inside, self._since = label, True, self.clock()
        try:
            yield
        finally:
            with self._lock:
                now = self.clock()
                self._completed.append(now - self._since)
                del self._completed[:-50]
                self._inside, self._since = False, now

    def status(self) -> Status:
        with self._lock:
            return Status(self._inside, self.clock() - self._since, self._label)

    def bound(self) -> float:
        with self._lock:
            return derived_bound(list(self._completed), self.timeout)

    # -- the exchange and the check ------------------------------------------------------
    def exchange_once(self) -> None:
        rows = np.asarray(self.exchange(self.status().encode())).reshape(self.size, -1)
        board = {r: Status.decode(row) for r, row in enumerate(rows)}
        with self._lock:
            self._board, self._board_time = board, self.clock()

    def check(self) -> str | None:
        """The stall line when this rank's current wait is over its bound, else None."""
        with self._lock:
            if not self._inside:
                return None
            now = self.clock()
            waited = now - self._since
            bound = derived_bound(list(self._completed), self.timeout)
            if waited <= bound:
                return None
            board = self._board
            board_age = None if self._board_time is None else now - self._board_time
            label = self._label
        if (self.timeout is None and board is not None and board_age <= bound
                and all(s.inside and s.label == label for s in board.values())):
            return None  # all inside the same call: work, not a stall
        return stall_message(self.rank, self.size, label, waited, bound, board, board_age,
                             self.timeout is not None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._exchange_loop, daemon=True,
                                            name="distbatch-arrivals")
            self._thread.start()
            threading.Thread(target=self._check_loop, daemon=True,
                             name="distbatch-arrivals-check").start()

    def stop(self) -> None:
        self._stop.set()

    def _exchange_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.exchange_once()
            except Exception:  # Horovod shut down (the job ends): stop exchanging quietly
                return
            self._stop.wait(self.interval)

    def _check_loop(self) -> None:
        # A thread of its own: the exchange blocks while a rank is frozen or gone.
        while not self._stop.wait(min(1.0, self.interval)):
            message = self.check()
            if message is not None:
                self.on_stall(message)
                return


def _end_process(message: str) -> None:
    """Print the line and end this rank: the blocked collective cannot be interrupted from
    Python. The launcher (horovodrun, mpirun) then ends the others."""
    print(f"distbatch: error: {message}", file=sys.stderr, flush=True)
    try:
        record_exit_code(EXIT_STALLED)
    finally:
        sys.stdout.flush()
        os._exit(EXIT_STALLED)
