"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, an impossible batch
arithmetic) raises :class:`UsageError` with ONE line that names the value
received and what was expected. The CLI prints it as ``distbatch: error: ...``
and exits with status 2, without a traceback.

A disk that is full, read-only or not ours to write (ENOSPC, EROFS, EACCES,
...) is not the user's input and not out of memory: the CLI prints one
``distbatch: error: I/O error: ...`` line and exits with :data:`EXIT_IO`.
"""
import contextlib
import errno
import os
import re

EXIT_IO = 4


class UsageError(ValueError):
    """A bad input from the user: one line, naming the value and what was expected."""


class ParameterError(UsageError):
    """A bad argument of the Python API, naming the PARAMETER ("base_lr must be > 0, got -1").

    ``template`` writes each parameter of ``params`` as ``{name}``; the message is the
    template with the names, and :meth:`for_flags` gives the same error as the CLI shows
    it, each parameter written as the CLI's flag instead (two dashes, then the name with
    dashes for underscores, unless `flags` says otherwise). So the library validates once and
    never needs to know its flag names.
    """

    def __init__(self, template: str, *params: str):
        self.template, self.params = template, params
        super().__init__(self._render({p: p for p in params}))

    def _render(self, names: dict) -> str:
        message = self.template
        for p in self.params:
            message = message.replace("{" + p + "}", names[p])
        return message

    def for_flags(self, flags: dict | None = None) -> UsageError:
        """This error with each parameter written as ``flags[name]`` or as its default flag."""
        return UsageError(self._render({p: flag_name(p, flags) for p in self.params}))


def flag_name(param: str, flags: dict | None = None) -> str:
    """The CLI's flag for `param`: ``flags[param]``, else two dashes and the name with dashes."""
    return (flags or {}).get(param, "--" + param.replace("_", "-"))


# How a message that is not a ParameterError (a progress line, a ClusterSetupError, the
# preemption notice) writes a parameter: as its name, unless the front door the user came
# through names parameters otherwise. The CLI runs each command inside flag_names(...).
_FLAG_NAMES: dict | None = None


@contextlib.contextmanager
def flag_names(flags: dict | None):
    """Within this block param_name() writes parameters as the CLI's flags (see flag_name)."""
    global _FLAG_NAMES
    saved, _FLAG_NAMES = _FLAG_NAMES, dict(flags or {})
    try:
        yield
    finally:
        _FLAG_NAMES = saved


def param_name(param: str) -> str:
    """`param` as the user knows it: the parameter's name, or its flag under the CLI."""
    return param if _FLAG_NAMES is None else flag_name(param, _FLAG_NAMES)


class ClusterSetupError(RuntimeError):
    """The workers of a multi-worker job did not all come up in time (one line, exit 1)."""


class RanksDriftedError(RuntimeError):
    """The ranks' weights no longer agree (one line, exit 1): something changed the model on
    some ranks only."""


def require(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless condition holds."""
    if not condition:
        raise UsageError(message)


def require_param(condition: bool, template: str, *params: str) -> None:
    """Raise ParameterError(template, *params) unless condition holds."""
    if not condition:
        raise ParameterError(template, *params)


# Errors a collective raises on the surviving ranks when a peer dies or stops:
# tf.distribute's coordination service aborts collectives once the peer stops
# sending heartbeats; Horovod raises HorovodInternalError.
PEER_FAILURE_ERRORS = ("UnavailableError", "AbortedError", "CancelledError",
                       "DeadlineExceededError", "HorovodInternalError")


def peer_failure_message(exc: BaseException) -> str | None:
    """One line for an error caused by another worker failing, else None."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name not in PEER_FAILURE_ERRORS or not module.startswith(("tensorflow", "horovod")):
        return None
    # TF prefixes "Graph execution error: Detected at node ... defined at:" and a
    # Python stack (File lines, each followed by its source line); keep the rest.
    kept, after_frame = [], False
    for line in str(getattr(exc, "message", None) or exc).splitlines():
        line = line.strip()
        skip = after_frame or not line or line.startswith(
            ('File "', "Graph execution error", "Detected at node", "[[", "The error could be"))
        after_frame = line.startswith('File "')
        if not skip:
            kept.append(line)
    detail = " ".join(" ".join(kept).split()) or name
    return (f"a collective operation failed, most likely because another worker died or was "
            f"stopped ({name}: {detail[:240]}); rerun with {param_name('resume')} to continue from "
            "the last checkpoint")


# A write (or read) the file system refused. TensorFlow wraps these in its own errors
# (ENOSPC becomes ResourceExhaustedError, like a device OOM; EROFS FailedPreconditionError
# or UnknownError) but keeps the OS's text, so the text is what identifies them.
IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
             errno.EFBIG)
IO_TEXTS = tuple(os.strerror(e) for e in IO_ERRNOS)  # "No space left on device", ...


def io_failure_message(exc: BaseException) -> str | None:
    """One line for a disk-full / read-only / permission error anywhere in exc's chain, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            return _io_line(exc.strerror or os.strerror(exc.errno), where)
        text = str(getattr(exc, "message", None) or exc)
        hit = next((t for t in IO_TEXTS if t in text), None)
        if hit:
            line = next(l for l in text.splitlines() if hit in l)
            line = " ".join(re.sub(r"\{\{[^}]*\}\}", "", line).split())  # TF's {{function_node ...}}
            line = line if len(line) <= 200 else "..." + line[-200:]
            return _io_line(hit, f" ({type(exc).__name__}: {line})")
        exc = exc.__cause__ or exc.__context__
    return None


def _io_line(what: str, where: str) -> str:
    return (f"I/O error: {what}{where}; free space or fix the file system's permissions, then "
            f"rerun ({param_name('resume')} continues from the last checkpoint)")
