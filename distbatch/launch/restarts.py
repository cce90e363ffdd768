"""`distbatch launch ... --max-restarts N`: restart every worker from the newest checkpoint.

Like torchrun's --max-restarts: when any worker fails, the supervisor stops
all of them (distbatch.launch.supervisor); then, up to N times, every worker starts
again with ``--resume`` added to its `distbatch train` (or `sweep`) command, so
the job continues from the newest checkpoint in its ``--out``. One line per
restart names the failed rank, how it failed and the step it resumes from.

Restarts know when to stop:

* a deterministic failure is not restarted (unless ``--restart-deterministic``):
  exit 2 (bad input) and exit 3 (divergence) come back at once from the same
  checkpoint, since a resumed run repeats the same steps exactly;
* restarts back off: before restart k the launcher waits
  min(``--restart-backoff-max``, ``--restart-backoff`` x 2^(k-1)) seconds, so a
  crash loop does not hammer a shared filesystem or scheduler;
* with ``launch multiworker --min-workers M`` a worker that stays dead is dropped and the
  others continue on a new TF_CONFIG, or the job stops below M
  (:mod:`distbatch.launch.survivors`).

The pure parts (the resumed command, the output directory a command writes,
the newest checkpoint step, the restart line, the back-off delay) are functions
tested as exact values; :func:`run_with_restarts` is the loop.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from distbatch.errors import UsageError
from distbatch.outdir import checkpoint_candidates

RESUMABLE = ("train", "sweep")
SWEEP_DEFAULT_OUT = "runs/sweep"


def _subcommand(command: Sequence[str]) -> int | None:
    """Index of `train`/`sweep` right after a distbatch program (or `-m distbatch[.cli]`)."""
    for i, word in enumerate(command[:-1]):
        name = os.path.basename(word)
        if name == "distbatch" or (word in ("distbatch", "distbatch.cli") and i and command[i - 1] == "-m"):
            nxt = i + 1
            while nxt < len(command) and command[nxt].startswith("-"):
                nxt += 1  # global flags such as --verbose
            if nxt < len(command) and command[nxt] in RESUMABLE:
                return nxt
            return None
    return None


def check_resumable(command: Sequence[str]) -> None:
    """UsageError unless `command` is a `distbatch train` or `distbatch sweep` command."""
    if _subcommand(command) is None:
        raise UsageError("--max-restarts needs a `distbatch train ...` or `distbatch sweep ...` worker "
                         f"command (a restart adds --resume to it), got {' '.join(command)!r}")


def _flag_value(command: Sequence[str], flag: str, shortest: str) -> str | None:
    """The value of ``flag`` in ``command`` (the last one given) as argparse reads it: ``--flag V``,
    ``--flag=V``, or an abbreviation at least as long as ``shortest``."""
    found = None
    for i, word in enumerate(command):
        name, eq, value = word.partition("=")
        if name.startswith(shortest) and flag.startswith(name):
            if eq:
                found = value
            elif i + 1 < len(command):
                found = command[i + 1]
    return found


def check_restart_command(command: Sequence[str], max_restarts: int) -> None:
    """UsageError unless every restart of ``command`` can work: a `distbatch train`/`sweep`
    command (check_resumable) that accepts the --resume a restart adds. `train
    --global-batch-size auto` refuses --resume, so each restart after a failure would fail at
    once: refused here, before anything runs."""
    check_resumable(command)
    at = _subcommand(command)
    if command[at] == "train" and _flag_value(command[at + 1:], "--global-batch-size", "--gl") == "auto":
        raise UsageError(f"--max-restarts {max_restarts} restarts the workers with --resume, which "
                         "`train --global-batch-size auto` refuses; give --global-batch-size a number, "
                         "or leave out --max-restarts")


def resume_command(command: Sequence[str]) -> list[str]:
    """`command` with --resume (once) and without --overwrite (the two exclude each other).

    >>> resume_command(["distbatch", "train", "--out", "r", "--overwrite"])
    ['distbatch', 'train', '--out', 'r', '--resume']
    """
    check_resumable(command)
    cmd = [w for w in command if w != "--overwrite"]
    return cmd if "--resume" in cmd else cmd + ["--resume"]


def out_dir(command: Sequence[str]) -> str | None:
    """The --out a train/sweep command writes (the last one given; a sweep's default)."""
    found = None
    for i, word in enumerate(command):
        if word == "--out" and i + 1 < len(command):
            found = command[i + 1]
        elif word.startswith("--out="):
            found = word.partition("=")[2]
    if found is None and _subcommand(command) is not None and command[_subcommand(command)] == "sweep":
        return SWEEP_DEFAULT_OUT
    return found


def newest_checkpoint(out: str) -> tuple[int, str] | None:
    """(step, directory) of the newest complete-looking checkpoint under `out`: a `ckpt-N.index`
    with its `state-N.json` (written before it) in OUT/checkpoints, or in the most recently
    changed OUT/points/*/checkpoints of a sweep. No TensorFlow here; the restarted worker itself
    checks every tensor and falls back further if needed (distbatch/training/checkpoints.py)."""
    dirs = [os.path.join(out, "checkpoints")]
    points = os.path.join(out, "points")
    if os.path.isdir(points):
        dirs += sorted((os.path.join(points, p, "checkpoints") for p in os.listdir(points)),
                       key=lambda d: os.path.getmtime(d) if os.path.isdir(d) else 0, reverse=True)
    for d in dirs:
        for step, _ in checkpoint_candidates(d):
            if os.path.exists(os.path.join(d, f"state-{step}.json")):
                return step, d
    return None


def restart_line(attempt: int, max_restarts: int, who: str, how: str, workers: int,
                 checkpoint: tuple[int, str] | None, resume: bool = True) -> str:
    """The one line printed before restart `attempt` (1-based) of `max_restarts`.

    >>> restart_line(1, 2, "rank 1", "failed with signal 9 (SIGKILL)", 2, (24, "r/checkpoints"))
    'distbatch launch: restart 1/2: rank 1 failed with signal 9 (SIGKILL); restarting all 2 workers with --resume from step 24 (r/checkpoints)'
    """
    if not resume:
        return (f"distbatch launch: restart {attempt}/{max_restarts}: {who} {how}; restarting all "
                f"{workers} workers from the start, without --resume (the run wrote nothing yet)")
    where = (f"from step {checkpoint[0]} ({checkpoint[1]})" if checkpoint else
             "from the start (no checkpoint yet)")
    return (f"distbatch launch: restart {attempt}/{max_restarts}: {who} {how}; restarting all "
            f"{workers} workers with --resume {where}")


def check_max_restarts(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--max-restarts must be an integer >= 0, got {value!r}")
    return value


DEFAULT_BACKOFF = 1.0       # seconds before the first restart
DEFAULT_BACKOFF_MAX = 60.0  # the longest wait between two restarts
MAX_BACKOFF = 86400.0       # a day: anything longer is a typo, not a policy


def check_backoff(value: float, flag: str) -> float:
    """``value`` if it is a number of seconds in [0, MAX_BACKOFF], else UsageError naming ``flag``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and 0 <= value <= MAX_BACKOFF):
        raise UsageError(f"{flag} must be a number of seconds in [0, {MAX_BACKOFF:g}], got {value!r}")
    return float(value)


def backoff_delay(restart: int, base: float, cap: float) -> float:
    """Seconds to wait before restart ``restart`` (1-based): ``base`` doubled at each restart,
    at most ``cap``.

    >>> [backoff_delay(k, 1.0, 5.0) for k in (1, 2, 3, 4)]
    [1.0, 2.0, 4.0, 5.0]
    """
    return min(cap, base * 2.0 ** min(restart - 1, 64))  # the exponent's bound keeps it a float


def backoff_line(restart: int, max_restarts: int, delay: float, base: float, cap: float) -> str:
    """The line printed while waiting ``delay`` seconds before restart ``restart``.

    >>> backoff_line(2, 3, 2.0, 1.0, 60.0)
    'distbatch launch: waiting 2 s before restart 2/3 (--restart-backoff 1 s, doubled at each restart, at most --restart-backoff-max 60 s)'
    """
    return (f"distbatch launch: waiting {delay:g} s before restart {restart}/{max_restarts} "
            f"(--restart-backoff {base:g} s, doubled at each restart, at most --restart-backoff-max {cap:g} s)")


# Exit statuses that a restart from the same checkpoint repeats: the resumed run takes the
# same steps on the same data exactly (docs/reliability.md, "Recovery").
DETERMINISTIC = {2: "bad input", 3: "the run diverged"}


def not_restarting_line(who: str, how: str, code: int) -> str:
    """The one line when a deterministic failure ends the job instead of a restart.

    >>> not_restarting_line("rank 1", "failed with exit code 3", 3)
    'distbatch launch: not restarting: rank 1 failed with exit code 3 (the run diverged), which a restart from the checkpoint would repeat; exiting with status 3 (--restart-deterministic restarts anyway)'
    """
    return (f"distbatch launch: not restarting: {who} {how} ({DETERMINISTIC[code]}), which a restart "
            f"from the checkpoint would repeat; exiting with status {code} (--restart-deterministic "
            "restarts anyway)")


class _StoppedWaiting(Exception):
    """SIGTERM or Ctrl-C on the launcher while it waited to restart."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(name)
        self.code, self.name = code, name


def _sleep(seconds: float) -> None:
    """time.sleep that SIGTERM and Ctrl-C end with _StoppedWaiting (no worker runs to stop)."""
    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _StoppedWaiting(128 + signal.SIGTERM, "SIGTERM")

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        raise _StoppedWaiting(130, "Ctrl-C") from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_with_restarts(run_once: Callable[[list[str], list], int], command: Sequence[str], *,
                      max_restarts: int, workers: int, stderr: IO[str] | None = None,
                      backoff: float = 0.0, backoff_max: float = 0.0,
                      restart_deterministic: bool = False,
                      sleep: Callable[[float], None] | None = None, world=None) -> int:
    """Run `run_once(command, failures)` until it returns 0, the launcher itself was stopped
    (nothing appended to `failures`: Ctrl-C or SIGTERM on the launcher), a deterministic
    failure (exit 2 or 3, :data:`DETERMINISTIC`) ended it and `restart_deterministic` is off,
    or `max_restarts` restarts are used up; returns the last exit status. `failures`
    receives (who, how) of the worker that caused a failure, the same worker the job's exit
    status comes from. Before restart k it waits backoff_delay(k, backoff, backoff_max)
    seconds (`sleep`, replaceable by a fake clock in tests), with one line saying so.

    `world` (:class:`distbatch.launch.survivors.Survivors`, multiworker ``--min-workers``):
    told of every start, failure and the end; a worker that stayed dead is dropped (the
    restart line says so and `run_once` starts fewer workers) or, below --min-workers, ends
    the job with one line."""
    stderr = stderr or sys.stderr
    sleep = sleep or _sleep  # looked up per call: tests replace the module's _sleep

    def say(line: str) -> None:
        stderr.write(line + "\n")
        stderr.flush()

    cmd = list(command)
    code = 0
    try:
        for attempt in range(max_restarts + 1):
            failures: list = []
            if world is not None:
                world.started(cmd)
            code = run_once(cmd, failures)
            if code == 0 or not failures:
                return code
            who, how = failures[0]
            if max_restarts and code in DETERMINISTIC and not restart_deterministic:
                say(not_restarting_line(who, how, code))
                return code
            change = world.failed(who, how, code) if world is not None else None
            if change is not None and change.stop:
                say(change.line)
                return code
            if attempt == max_restarts:
                if max_restarts:
                    say(f"distbatch launch: giving up after {max_restarts} restart(s)")
                return code
            delay = backoff_delay(attempt + 1, backoff, backoff_max)
            if delay > 0:
                say(backoff_line(attempt + 1, max_restarts, delay, backoff, backoff_max))
                try:
                    sleep(delay)
                except _StoppedWaiting as e:
                    say(f"distbatch launch: {e.name} while waiting to restart; not restarting")
                    code = e.code
                    return code
            out = out_dir(cmd)
            checkpoint = newest_checkpoint(out) if out else None
            # --resume refuses a directory that does not exist or is empty (a typo would otherwise
            # start over silently): an attempt that died before writing anything starts again fresh.
            resume = out is None or (os.path.isdir(out) and bool(os.listdir(out)))
            if change is not None:
                say(world.shrink_line(attempt + 1, max_restarts, change, checkpoint, resume))
            else:
                say(restart_line(attempt + 1, max_restarts, who, how,
                                 world.size if world is not None else workers, checkpoint, resume))
            if resume:
                cmd = resume_command(cmd)
        return code  # not reached
    finally:
        if world is not None:
            for line in world.ended(code):
                say(line)
