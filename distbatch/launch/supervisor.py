"""Run local worker processes as one job: prefixed output, fail fast, nothing left behind.

One worker failing must end the job, not leave the others blocked forever in
a collective that will never complete (the classic distributed-training
hang). So the supervisor:

1. starts every worker in its own session (``start_new_session=True``), so a
   worker and everything it spawns form one process group that ``killpg``
   reaches, and a Ctrl-C in the terminal reaches only the launcher;
2. copies each worker's stdout/stderr line by line with a ``[rank i] ``
   prefix (a single wrapped child such as horovodrun keeps its own
   ``[1,0]<stdout>:`` prefixes; it gets none);
3. polls the workers; at the first non-zero exit or signal it prints one line
   naming the rank that caused it and its code or signal (a rank killed by a
   signal or stopped with SIGSTOP, rather than a peer whose collective then
   failed: :func:`root_cause`), sends SIGTERM to every other
   group, waits ``grace_seconds``, then SIGKILLs what is left. The job ends
   within about ``grace_seconds`` + a second of the failure;
4. treats Ctrl-C (SIGINT) and SIGTERM on the launcher the same way, except
   that after SIGTERM it waits up to ``PREEMPT_WAIT_SECONDS`` (not
   ``grace_seconds``) before SIGKILL: distbatch workers answer SIGTERM by
   saving a checkpoint at the next step boundary (distbatch/training/preemption.py).

Exit code: 0 when all workers exit 0; the failed worker's code, or
128 + signal number when it was killed by a signal (the shell's convention);
130 after Ctrl-C; after SIGTERM on the launcher 75 when every worker saved a
checkpoint and exited 75, else 143.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from distbatch.launch.horovodrun_output import LauncherTracebackFilter

PREFIX_FORMAT = "[rank {rank}] "
EXIT_PREEMPTED = 75          # distbatch.training.preemption.EXIT_PREEMPTED (no TensorFlow import here)
PREEMPT_WAIT_SECONDS = 35.0  # a worker's watchdog allows 30 s for its preemption save


@dataclass(frozen=True)
class WorkerSpec:
    """One process to run: argv, environment overrides and removals, output prefix ('' for none),
    and its name in messages."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""
    label: str = ""
    unset_env: Sequence[str] = ()


class _Stop(Exception):
    """Raised inside the poll loop when the launcher receives SIGTERM."""


def _label(spec: WorkerSpec, index: int) -> str:
    return spec.label or f"rank {index}"


def describe_exit(returncode: int) -> str:
    """'exit code 3' or 'signal 9 (SIGKILL)' for a Popen returncode."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"signal {-returncode} ({name})"
    if returncode == EXIT_PREEMPTED:
        return f"exit code {returncode} (saved a checkpoint after SIGTERM)"
    if 128 < returncode < 128 + 65:  # the shell's convention, also distbatch's after SIGTERM/SIGINT
        try:
            return f"exit code {returncode} ({signal.Signals(returncode - 128).name})"
        except ValueError:
            pass
    return f"exit code {returncode}"


def shell_exit_code(returncode: int) -> int:
    """Map a Popen returncode to a shell exit status: negative (signal) -> 128 + signal."""
    return 128 - returncode if returncode < 0 else returncode


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` ('R', 'S', 'T' = stopped, ...), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def root_cause(codes: Sequence[int | None], states: Sequence[str | None], failed: int) -> tuple[int, str]:
    """Which rank most likely caused the failure first seen at rank ``failed``, and how it failed.

    When one worker is killed or stopped, its peers fail too, with a
    collective error; the one the poll sees first need not be the cause. A
    rank killed by a signal, or stopped (SIGSTOP/SIGTSTP: state T), is the
    cause rather than a rank that exited with an error code.
    """
    # Killed outright (negative), or exited 128 + N after handling signal N (distbatch does).
    killed = [r for r, c in enumerate(codes) if c is not None and (c < 0 or 128 < c < 128 + 65)]
    if killed:
        return killed[0], f"failed with {describe_exit(codes[killed[0]])}"
    stopped = [r for r, (c, st) in enumerate(zip(codes, states)) if c is None and st in ("T", "t")]
    if stopped:
        return stopped[0], "was stopped (SIGSTOP or SIGTSTP)"
    return failed, f"failed with {describe_exit(codes[failed])}"


def _pump(pipe: IO[bytes], stream: IO[str], prefix: str, lock: threading.Lock,
          on_line: Callable[[str], None] | None = None,
          line_filter: LauncherTracebackFilter | None = None) -> None:
    """Copy lines from a child's pipe to ``stream`` with ``prefix``, until EOF; ``on_line`` sees
    every line, ``line_filter`` decides which are shown."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if not line.endswith("\n"):
                line += "\n"
            with lock:
                for shown in (line_filter.feed(line) if line_filter is not None else [line]):
                    stream.write(prefix + shown)
                stream.flush()
                if on_line is not None:
                    on_line(line)
        if line_filter is not None:
            with lock:
                for shown in line_filter.flush():
                    stream.write(prefix + shown)
                stream.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group led by ``proc`` (its session), ignoring a gone group."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every worker's group, wait up to ``grace_seconds``, then SIGKILL the rest.

    Groups of workers that already exited are signalled too, so grandchildren
    they left running (data loaders, helper daemons) go with them.
    """
    for p in procs:
        _signal_group(p, signal.SIGTERM)
        _signal_group(p, signal.SIGCONT)  # a stopped worker acts on SIGTERM only once continued
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def run_workers(specs: Sequence[WorkerSpec], *, grace_seconds: float = 5.0,
                poll_interval: float = 0.05, stdout: IO[str] | None = None,
                stderr: IO[str] | None = None, name: str = "distbatch launch",
                unbuffered: bool = True, failures: list | None = None,
                on_line: Callable[[str], None] | None = None,
                stop_wait_seconds: float | None = None,
                line_filter: Callable[[], LauncherTracebackFilter] | None = None) -> int:
    """Run ``specs`` concurrently and return the job's exit code (see module docstring).

    ``failures`` (a list) receives ``(who, how)`` of the worker that caused a failure, e.g.
    ``("rank 1", "failed with signal 9 (SIGKILL)")``; nothing when all succeeded or the
    launcher itself was stopped. ``on_line`` sees every output line. ``stop_wait_seconds``:
    how long to wait after forwarding the launcher's SIGTERM (default
    max(grace_seconds, PREEMPT_WAIT_SECONDS)). ``line_filter``: makes one filter per output
    pipe (:class:`LauncherTracebackFilter`).

    Each worker's environment is ``os.environ`` updated with ``spec.env``.
    With ``unbuffered`` it also gets ``PYTHONUNBUFFERED=1`` (unless set), so
    Python workers' lines arrive as they are printed rather than when a pipe
    buffer fills; the prefixing here reassembles lines, so that is safe.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def note(msg: str) -> None:
        with lock:
            stderr.write(f"{name}: {msg}\n")
            stderr.flush()

    def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _Stop()

    # Signal handlers can only be installed from the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    code = 0
    stopped = False
    try:
        for rank, spec in enumerate(specs):
            env = {**({"PYTHONUNBUFFERED": "1"} if unbuffered else {}), **os.environ, **spec.env}
            for var in spec.unset_env:
                env.pop(var, None)
            try:
                p = subprocess.Popen(list(spec.argv), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
            except OSError as e:
                note(f"{_label(spec, rank)} could not start {spec.argv[0]!r}: {e.strerror}"
                     + ("; stopping the others" if procs else ""))
                return 127
            procs.append(p)
            for pipe, stream in ((p.stdout, stdout), (p.stderr, stderr)):
                t = threading.Thread(target=_pump, args=(pipe, stream, spec.prefix, lock, on_line,
                                                         line_filter() if line_filter else None),
                                     daemon=True)
                t.start()
                pumps.append(t)
        while True:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                states = [process_state(p.pid) if c is None else None for p, c in zip(procs, codes)]
                cause, how = root_cause(codes, states, failed)
                others = sum(c is None for c in codes)
                msg = f"{_label(specs[cause], cause)} {how}"
                if cause != failed:
                    msg += (f"; {_label(specs[failed], failed)} then failed with "
                            f"{describe_exit(codes[failed])}")
                note(msg + (f"; stopping the other {others} worker(s)" if others else ""))
                code = shell_exit_code(codes[cause] if codes[cause] is not None else codes[failed])
                if failures is not None:
                    failures.append((_label(specs[cause], cause), how))
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        note("interrupted; stopping all workers")
        code = 130
    except _Stop:
        note("received SIGTERM; stopping all workers (distbatch workers save a checkpoint first)")
        code = 128 + signal.SIGTERM
        stopped = True
    finally:
        # Cleanup must not be cut short by a second Ctrl-C or SIGTERM, or
        # workers would be left running.
        shielded = {}
        if in_main:
            shielded = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            shielded[signal.SIGTERM] = previous if previous is not None else signal.SIG_DFL
        try:
            wait = grace_seconds
            if stopped:
                wait = stop_wait_seconds if stop_wait_seconds is not None else max(
                    grace_seconds, PREEMPT_WAIT_SECONDS)
            stop_all(procs, wait)
            for t in pumps:
                t.join(timeout=2.0)
            if stopped and procs and all(p.returncode == EXIT_PREEMPTED for p in procs):
                code = EXIT_PREEMPTED
        finally:
            for s, handler in shielded.items():
                signal.signal(s, handler)
    return code


def run_single(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               unset_env: Sequence[str] = (), grace_seconds: float = 10.0, **kwargs) -> int:
    """Run one child (horovodrun, mpirun) under supervision and forward its exit code.

    No prefix is added: horovodrun and mpirun label ranks themselves. The
    longer default grace lets them shut their own ranks down on SIGTERM.
    PYTHONUNBUFFERED is not added (callers can also remove it with
    ``unset_env``): mpirun tags each write separately, and an unbuffered
    print() writes the text and the newline separately, which shreds lines.
    """
    spec = WorkerSpec(argv=list(argv), env=dict(env or {}), prefix="", label=os.path.basename(argv[0]),
                      unset_env=tuple(unset_env))
    kwargs.setdefault("unbuffered", False)
    return run_workers([spec], grace_seconds=grace_seconds, **kwargs)


# Horovodrun (Gloo) reports ANY failed rank as its own exit status 1, with a
# traceback, so a diverged run (each rank exits 3) looked like a crash. The
# launcher therefore hands the ranks a directory in $DISTBATCH_EXIT_DIR; each
# distbatch rank records its status there as it exits (cli.main), and the
# launcher returns the status of the rank that failed first.
# record_exit_code, EXIT_DIR_ENV and RANK_ENVS live in distbatch/exit_records.py (a leaf module the
# workers' backends and the launcher both import); importable from here too.
from distbatch.exit_records import EXIT_DIR_ENV, RANK_ENVS, record_exit_code  # noqa: E402,F401


def recorded_exits(directory: str) -> dict[int, tuple[float, int]]:
    """{rank: (time, exit status)} from record_exit_code's files (unreadable ones skipped)."""
    rows: dict[int, tuple[float, int]] = {}
    for name in os.listdir(directory):
        try:
            with open(os.path.join(directory, name)) as f:
                row = json.load(f)
            rows[int(row["rank"])] = (float(row["time"]), int(row["code"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def first_failed_rank(directory: str) -> tuple[int, int] | None:
    """(rank, exit status) of the rank that exited non-zero first, from record_exit_code's files."""
    failed = sorted((t, rank, code) for rank, (t, code) in recorded_exits(directory).items() if code != 0)
    return (failed[0][1], failed[0][2]) if failed else None


def failed_first(reported: Sequence[tuple[int, int]],
                 recorded: Mapping[int, tuple[float, int]]) -> tuple[int, int] | None:
    """(rank, shell exit status) of the rank whose failure ended the job: ONE answer, used both
    for the exit status and for the restart line, so an attempt is described one way only.

    ``reported``: (rank, status) from the launcher's own lines, in the order it printed them;
    ``recorded``: the ranks' own records (:func:`recorded_exits`). The first rank the launcher
    reported wins when it recorded nothing (killed by a signal before its exit code ran: the
    cause, its peers failed after it); otherwise the earliest recorded failure (exact times,
    where the launcher's order is only the order it noticed the exits in).
    """
    if reported and reported[0][0] not in recorded:
        return reported[0]
    failed = sorted((t, rank, code) for rank, (t, code) in recorded.items() if code != 0)
    if failed:
        return failed[0][1], shell_exit_code(failed[0][2])
    return reported[0] if reported else None


# How horovodrun (Gloo) and Open MPI's mpirun name the rank that failed; the first such line
# is the rank that failed first (a rank killed by a signal records no status of its own).
_RANK_EXIT_LINES = (
    re.compile(r"Process (\d+) exit with status code (-?\d+)\."),                       # horovodrun
    re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)"),  # mpirun
)


def rank_exit_from_line(line: str) -> tuple[int, int] | None:
    """(rank, shell exit status) from a launcher's line reporting a failed rank, else None.

    >>> rank_exit_from_line("Process 1 exit with status code 137.")
    (1, 137)
    """
    for i, pattern in enumerate(_RANK_EXIT_LINES):
        m = pattern.search(line)
        if m:
            rank, value = int(m.group(1)), int(m.group(2))
            return rank, (128 + value if i == 1 else shell_exit_code(value))
    return None


def run_launcher(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 unset_env: Sequence[str] = (), grace_seconds: float = 10.0,
                 stderr: IO[str] | None = None, failures: list | None = None, **kwargs) -> int:
    """run_single for horovodrun/mpirun, returning the failed rank's own exit status.

    When the launcher fails, the rank that failed first (:func:`failed_first`: the ranks'
    recorded statuses, see :data:`EXIT_DIR_ENV`, and the launcher's own lines for a rank
    killed by a signal) gives the status returned (e.g. 3 for a diverged run), with one line
    naming it; otherwise the launcher's own status. ``failures`` receives ``("rank R", how)``
    of that same rank. The launcher's own traceback is not shown (LauncherTracebackFilter).
    """
    directory = tempfile.mkdtemp(prefix="distbatch-exit-")
    reported: list[tuple[int, int]] = []

    def watch(line: str) -> None:
        found = rank_exit_from_line(line)
        if found is not None:
            reported.append(found)

    try:
        mine: list = []
        kwargs.setdefault("line_filter", LauncherTracebackFilter)
        code = run_single(argv, env={**(env or {}), EXIT_DIR_ENV: directory}, unset_env=unset_env,
                          grace_seconds=grace_seconds, stderr=stderr, failures=mine, on_line=watch,
                          **kwargs)
        cause = failed_first(reported, recorded_exits(directory)) if code != 0 else None
        if failures is not None and mine:  # the launcher failed (not stopped by us)
            failures.append((f"rank {cause[0]}", f"failed with {describe_exit(cause[1])}")
                            if cause is not None else mine[0])
        # Stopped by us (Ctrl-C, SIGTERM: nothing in `mine`), the ranks' own statuses are the
        # echo of that stop, not a cause: the launcher's 130/143 stands.
        if mine and cause is not None and cause[1] != code:
            rank, rank_code = cause
            (stderr or sys.stderr).write(
                f"distbatch launch: rank {rank} exited first, with {describe_exit(rank_code)}; "
                f"exiting with that status ({os.path.basename(argv[0])} reported "
                f"{describe_exit(code)})\n")
            code = rank_code
        return code
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rank_specs(commands: Sequence[tuple[Mapping[str, str], Sequence[str]]]) -> list[WorkerSpec]:
    """WorkerSpecs prefixed ``[rank i] `` from (env overrides, argv) pairs, in rank order."""
    return [WorkerSpec(argv=list(argv), env=dict(env), prefix=PREFIX_FORMAT.format(rank=i), label=f"rank {i}")
            for i, (env, argv) in enumerate(commands)]
