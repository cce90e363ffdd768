"""SIGTERM and SIGINT end a distbatch process within seconds, also inside TensorFlow.

Three obstacles, measured on TF 2.21:

* Python runs a signal handler only between bytecodes of the main thread.
  While TensorFlow blocks in C++ holding the GIL (MultiWorkerMirroredStrategy
  start-up waiting for peers, for example), no Python code runs at all: not
  the handler, not any other Python thread.
* MultiWorkerMirroredStrategy installs its own C++ SIGTERM handler (its
  preemption notifier), which swallows SIGTERM.
* Ctrl-C becomes KeyboardInterrupt only when the main thread runs Python.

So:

1. Python handlers: SIGTERM raises :class:`Terminated`, SIGINT raises
   KeyboardInterrupt. When the main thread is in Python this is the normal
   path: cleanup runs and the CLI prints one line (exit 143 / 130).
2. ``signal.set_wakeup_fd``: CPython's C-level handler also writes the signal
   number into a pipe, with no GIL needed. A tiny watchdog process (no
   TensorFlow, a few MB) reads that pipe; if distbatch is still alive
   ``grace_seconds`` after the signal, it prints one line and SIGKILLs it.
   The watchdog exits by itself when distbatch does (the pipe closes).
3. :func:`reclaim` re-installs the handlers after TensorFlow replaced them.
4. Preemption (:mod:`distbatch.training.preemption`): while the training loop runs
   (:func:`arm_preemption`), SIGTERM only sets a flag that the loop reads at
   its next call boundary, where every worker saves and exits 75. The
   handler running at all proves Python is not stuck in C++, so it also
   tells the watchdog to HOLD for ``HOLD_SECONDS`` (reach the boundary,
   agree, save); after the save :func:`release_watchdog` restarts the normal
   ``grace_seconds`` for the exit. A process stuck in C++ never runs the
   handler, sends no hold, and is killed ``grace_seconds`` after the signal
   as before.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_SECONDS = 4.0
# Preemption: seconds the watchdog waits, once the Python handler ran, for the loop to reach
# its next call boundary and save (and again from the start of the save). Kubernetes and
# Slurm give 30 s between SIGTERM and SIGKILL by default.
HOLD_SECONDS = 30.0
HANDLED = (signal.SIGTERM, signal.SIGINT)
HOLD, RELEASE = b"H", b"R"  # control bytes for the watchdog (signal numbers are < 65)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like Ctrl-C (so `finally` blocks run), exit 128 + signum."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


# The watchdog, run as `python -I -S -c WATCHDOG fd pid grace hold`: stdlib only, starts in
# ~20 ms. Bytes on fd: signal numbers (CPython's wakeup fd), HOLD and RELEASE (this module).
WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal Ctrl-C reaches the whole group;
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only distbatch decides what it means
fd, pid, grace, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
names = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
got, deadline, allowed = None, None, grace
while deadline is None or time.monotonic() < deadline:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([fd], [], [], left)[0]:
        continue
    data = os.read(fd, 64)
    if not data:
        sys.exit(0)                            # distbatch exited (in time)
    for b in data:
        if got is None and b in names:
            got = b
        elif got is None:
            continue                           # nothing to watch before a signal
        elif b == ord("H"):
            allowed = hold                     # the handler ran: a preemption save is on its way
        elif b == ord("R"):
            allowed = grace                    # saved: now exit
        else:
            continue
        deadline = time.monotonic() + allowed
try:
    what = ("did not finish its preemption checkpoint" if allowed != grace else
            "TensorFlow did not return")
    os.write(2, ("distbatch: %s received but %s within %g s (blocked in "
                 "C++ code, e.g. waiting for another worker); killing process %d\n"
                 % (names[got], what, allowed, pid)).encode())
    os.kill(pid, signal.SIGKILL)
except OSError:
    pass
"""

_installed = False
_watchdog: subprocess.Popen | None = None  # kept referenced: it lives as long as this process
_wakeup_fd = -1            # write end of the watchdog's pipe
_armed = False             # SIGTERM sets _preempt_requested instead of raising
_preempt_requested = False


def install(grace_seconds: float = GRACE_SECONDS, hold_seconds: float = HOLD_SECONDS) -> bool:
    """Install the handlers and start the watchdog (main thread only; once). True if installed."""
    global _installed, _watchdog, _wakeup_fd
    if _installed or threading.current_thread() is not threading.main_thread():
        return _installed
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        _watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(read_fd), str(os.getpid()),
                          repr(float(grace_seconds)), repr(float(hold_seconds))],
                         pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError:
        os.close(write_fd)
        write_fd = -1  # no watchdog: the Python handlers still work whenever Python runs
    finally:
        os.close(read_fd)
    if write_fd >= 0:
        os.set_inheritable(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _wakeup_fd = write_fd
    _installed = True
    reclaim()
    return True


def reclaim() -> None:
    """Re-install distbatch's SIGTERM/SIGINT handlers after TensorFlow replaced them.

    Does nothing unless :func:`install` ran (the CLI does; a program using the
    Python API keeps its own handlers)."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm_preempt if _armed else _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _tell_watchdog(byte: bytes) -> None:
    if _wakeup_fd >= 0:
        try:
            os.write(_wakeup_fd, byte)
        except OSError:
            pass  # no watchdog (or its pipe is full): nothing to tell


def _on_sigterm_preempt(signum, frame):  # noqa: ARG001 - signal handler signature
    global _preempt_requested
    _preempt_requested = True
    _tell_watchdog(HOLD)


def arm_preemption() -> bool:
    """From now on SIGTERM asks the training loop to save and stop at its next call boundary
    (see distbatch.training.preemption) instead of unwinding at once. Only in a process that called
    :func:`install` (the CLI); True if armed. Undone by :func:`disarm_preemption`."""
    global _armed
    if not _installed or threading.current_thread() is not threading.main_thread():
        return False
    _armed = True
    reclaim()
    return True


def disarm_preemption() -> None:
    """SIGTERM unwinds again (exit 143). A SIGTERM that arrived while armed stays requested:
    the next armed loop (a sweep's next point) stops at its first boundary."""
    global _armed
    if _armed:
        _armed = False
        reclaim()


def preemption_requested() -> bool:
    """True once SIGTERM arrived while the loop was armed."""
    return _preempt_requested


def hold_watchdog() -> None:
    """A preemption save starts: the watchdog allows HOLD_SECONDS from now."""
    _tell_watchdog(HOLD)


def release_watchdog() -> None:
    """The preemption save is done: the watchdog allows grace_seconds from now for the exit."""
    _tell_watchdog(RELEASE)


def exit_now_if_installed(code: int) -> None:
    """After a signal, end the CLI process at once (``os._exit``), skipping interpreter finalization.

    TensorFlow's finalization took over 4 s on a loaded 2-core machine, long
    enough for the watchdog to SIGKILL a process that had already stopped
    cleanly. The unwinding that matters (``finally`` blocks, atomic writes) has
    run by the time this is called. Does nothing in a process that did not
    call :func:`install` (e.g. tests calling ``cli.main`` in-process).
    """
    if _installed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
