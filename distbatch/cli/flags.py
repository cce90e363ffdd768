"""How the command line names the library's parameters: "--name-with-dashes", except these."""
from __future__ import annotations

from distbatch.errors import ParameterError, UsageError

# Parameters (of Recipe and of the functions it calls) whose flag is not "--name-with-dashes".
FLAG_NAMES = {"exclude_bias_bn": "--no-exclude-bias-bn", "rule": "--scaling",
              "power": "--decay-power", "eta": "--lars-eta"}


def flag_error(error: ParameterError) -> UsageError:
    """A library error as the CLI shows it: the parameter names written as flags."""
    return error.for_flags(FLAG_NAMES)
