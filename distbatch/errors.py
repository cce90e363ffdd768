"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, an impossible batch
arithmetic) raises :class:`UsageError` with ONE line that names the value
received and what was expected. The CLI prints it as ``distbatch: error: ...``
and exits with status 2, without a traceback.
"""


class UsageError(ValueError):
    """A bad input from the user: one line, naming the value and what was expected."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step = step
        self.loss = loss


class ClusterSetupError(RuntimeError):
    """The workers of a multi-worker job did not all come up in time (one line, exit 1)."""


def require(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless condition holds."""
    if not condition:
        raise UsageError(message)


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
            f"stopped ({name}: {detail[:240]}); rerun with --resume to continue from the last checkpoint")
