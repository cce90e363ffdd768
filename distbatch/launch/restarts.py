"""`distbatch launch ... --max-restarts N`: restart every worker from the newest checkpoint.

Like torchrun's --max-restarts: when any worker fails, the supervisor stops
all of them (distbatch.launch.supervisor); then, up to N times, every worker starts
again with ``--resume`` added to its `distbatch train` (or `sweep`) command, so
the job continues from the newest checkpoint in its ``--out``. One line per
restart names the failed rank, how it failed and the step it resumes from.

The pure parts (the resumed command, the output directory a command writes,
the newest checkpoint step, the restart line) are functions tested as exact
values; :func:`run_with_restarts` is the loop.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import IO

from distbatch.errors import UsageError

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
    from distbatch.training.checkpoints import candidates
    dirs = [os.path.join(out, "checkpoints")]
    points = os.path.join(out, "points")
    if os.path.isdir(points):
        dirs += sorted((os.path.join(points, p, "checkpoints") for p in os.listdir(points)),
                       key=lambda d: os.path.getmtime(d) if os.path.isdir(d) else 0, reverse=True)
    for d in dirs:
        for step, _ in candidates(d):
            if os.path.exists(os.path.join(d, f"state-{step}.json")):
                return step, d
    return None


def restart_line(attempt: int, max_restarts: int, who: str, how: str, workers: int,
                 checkpoint: tuple[int, str] | None) -> str:
    """The one line printed before restart `attempt` (1-based) of `max_restarts`.

    >>> restart_line(1, 2, "rank 1", "failed with signal 9 (SIGKILL)", 2, (24, "r/checkpoints"))
    'distbatch launch: restart 1/2: rank 1 failed with signal 9 (SIGKILL); restarting all 2 workers with --resume from step 24 (r/checkpoints)'
    """
    where = (f"from step {checkpoint[0]} ({checkpoint[1]})" if checkpoint else
             "from the start (no checkpoint yet)")
    return (f"distbatch launch: restart {attempt}/{max_restarts}: {who} {how}; restarting all "
            f"{workers} workers with --resume {where}")


def check_max_restarts(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--max-restarts must be an integer >= 0, got {value!r}")
    return value


def run_with_restarts(run_once: Callable[[list[str], list], int], command: Sequence[str], *,
                      max_restarts: int, workers: int, stderr: IO[str] | None = None) -> int:
    """Run `run_once(command, failures)` until it returns 0, the launcher itself was stopped
    (nothing appended to `failures`: Ctrl-C or SIGTERM on the launcher), or `max_restarts`
    restarts are used up; returns the last exit status. `failures` receives
    (who, how) of the worker that caused a failure."""
    stderr = stderr or sys.stderr
    cmd = list(command)
    for attempt in range(max_restarts + 1):
        failures: list = []
        code = run_once(cmd, failures)
        if code == 0 or not failures or attempt == max_restarts:
            if code != 0 and failures and max_restarts:
                stderr.write(f"distbatch launch: giving up after {max_restarts} restart(s)\n")
            return code
        out = out_dir(cmd)
        checkpoint = newest_checkpoint(out) if out else None
        who, how = failures[0]
        stderr.write(restart_line(attempt + 1, max_restarts, who, how, workers, checkpoint) + "\n")
        stderr.flush()
        cmd = resume_command(cmd)
    return code  # not reached
