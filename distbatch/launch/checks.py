"""The checks every launcher applies to its inputs: process counts, ports, host names and
the worker command. Each returns the value when it is valid and raises UsageError naming the
flag otherwise."""
from __future__ import annotations

import re
from collections.abc import Sequence

from distbatch.errors import UsageError


def check_np(np: int, flag: str = "-np") -> int:
    """Return ``np`` if it is an int >= 1, else raise UsageError naming it."""
    if isinstance(np, bool) or not isinstance(np, int) or np < 1:
        raise UsageError(f"{flag} must be an integer >= 1, got {np!r}")
    return np


def check_command(command: Sequence[str]) -> list[str]:
    """Return the worker command as a list; an empty one is a usage error.

    A leading ``--`` (argparse.REMAINDER keeps it) is dropped.
    """
    cmd = list(command or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError(f"missing COMMAND after '--' (e.g. '-- python train.py'), got {cmd!r}")
    return cmd


def check_port(port: int, flag: str = "--port") -> int:
    """Return ``port`` if it is a usable TCP port (1..65535), else raise UsageError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{flag} must be a TCP port in 1..65535, got {port!r}")
    return port


# Host names and IPv4/IPv6 addresses; nothing a shell, ssh or TF_CONFIG could misread.
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")


def check_host(host: str, where: str) -> str:
    """Return ``host`` if it is a plain host name or address, else raise UsageError naming ``where``."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise UsageError(f"{where}: host must be a host name or IP address (letters, digits, '.', '-', "
                         f"'_'), got {host!r}")
    return host



def _whole(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '²' and other scripts' digits)."""
    return text.isascii() and text.isdigit()
