"""What this machine offers, read without TensorFlow: its RAM.

The checks that refuse impossible sizes before anything is allocated (a synthetic dataset,
a model's output layer, a bench batch) compare against it; tests patch
``distbatch.machine.physical_memory`` to get messages that do not depend on the test machine.
"""
from __future__ import annotations

import os


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
