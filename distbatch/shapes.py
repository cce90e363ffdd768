"""One parser for input shapes, used by every command and the Python API."""
from __future__ import annotations

import re
from typing import Sequence

from distbatch.errors import ParameterError


def parse_shape(value: str | Sequence[int], name: str = "input_shape") -> tuple[int, ...]:
    """'32x32x3', '32,32,3' (the two spellings the commands used to take separately),
    '40' or a sequence of ints -> (32, 32, 3); every dimension an integer >= 1.

    Errors name ``name`` (a ParameterError, so the CLI shows its flag for ``input_shape``).
    """
    if isinstance(value, str):
        parts = re.split(r"[x,]", value.strip().lower())
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    try:
        dims = tuple(int(p) for p in parts)
        if not isinstance(value, str) and any(isinstance(p, bool) or int(p) != p for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ParameterError(f"{{{name}}} must look like 40, 32x32x3 or 32,32,3, got {value!r}",
                             name) from None
    if not dims or any(d < 1 for d in dims):
        raise ParameterError(f"{{{name}}} dimensions must be integers >= 1, got {value!r}", name)
    return dims
