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


def require(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless condition holds."""
    if not condition:
        raise UsageError(message)
