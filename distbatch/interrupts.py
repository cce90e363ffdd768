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
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_SECONDS = 4.0
HANDLED = (signal.SIGTERM, signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like Ctrl-C (so `finally` blocks run), exit 128 + signum."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


# The watchdog, run as `python -I -S -c WATCHDOG fd pid grace`: stdlib only, starts in ~20 ms.
WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal Ctrl-C reaches the whole group;
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only distbatch decides what it means
fd, pid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
names = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
got = None
while got is None:
    data = os.read(fd, 64)
    if not data:
        sys.exit(0)                            # distbatch exited
    got = next((b for b in data if b in names), None)
deadline = time.monotonic() + grace
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    if select.select([fd], [], [], left)[0] and not os.read(fd, 64):
        sys.exit(0)                            # distbatch exited in time
try:
    os.write(2, ("distbatch: %s received but TensorFlow did not return within %g s (blocked in "
                 "C++ code, e.g. waiting for another worker); killing process %d\n"
                 % (names[got], grace, pid)).encode())
    os.kill(pid, signal.SIGKILL)
except OSError:
    pass
"""

_installed = False
_watchdog: subprocess.Popen | None = None  # kept referenced: it lives as long as this process


def install(grace_seconds: float = GRACE_SECONDS) -> bool:
    """Install the handlers and start the watchdog (main thread only; once). True if installed."""
    global _installed, _watchdog
    if _installed or threading.current_thread() is not threading.main_thread():
        return _installed
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        _watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(read_fd), str(os.getpid()),
                          repr(float(grace_seconds))],
                         pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError:
        os.close(write_fd)
        write_fd = -1  # no watchdog: the Python handlers still work whenever Python runs
    finally:
        os.close(read_fd)
    if write_fd >= 0:
        os.set_inheritable(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _installed = True
    reclaim()
    return True


def reclaim() -> None:
    """Re-install distbatch's SIGTERM/SIGINT handlers after TensorFlow replaced them.

    Does nothing unless :func:`install` ran (the CLI does; a program using the
    Python API keeps its own handlers)."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
