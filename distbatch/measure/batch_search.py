"""The search of `distbatch probe-batch`, without TensorFlow: the largest batch for which a
monotone `fits(batch)` holds (distbatch/measure/probe.py runs it with real training steps).

Search (PyTorch Lightning's batch-size finder, "power" then "binsearch" mode):
double the batch from `start` while one training step fits, then binary-search
between the last batch that fitted and the first that did not. With a monotone
`fits` this costs about 2*log2(answer) trial steps and returns the exact
largest fitting batch.
"""
from __future__ import annotations

from typing import Callable

from distbatch.errors import ParameterError, require_param
from distbatch.training.oom import OutOfMemory

DEFAULT_MAX_BATCH = 4096


def find_max_batch(fits: Callable[[int], bool], start: int = 1,
                   max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Largest b in [start, max_batch] with fits(b), assuming fits is monotone (True then False).

    Doubling from `start` until a batch fails or `max_batch` is reached, then
    binary search between the last success and the first failure. Raises
    OutOfMemory if even `start` does not fit.
    """
    for name, v in (("start_batch", start), ("max_batch", max_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParameterError(f"{{{name}}} must be an integer >= 1, got {v!r}", name)
    require_param(start <= max_batch, f"{{start_batch}} {start} is larger than {{max_batch}} {max_batch}",
                  "start_batch", "max_batch")
    if not fits(start):
        raise OutOfMemory(f"even per-replica batch {start} does not fit in memory; use a smaller "
                          f"model or input, mixed precision, or a device with more memory")
    good, bad = start, None
    while bad is None and good < max_batch:
        trial = min(2 * good, max_batch)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good  # max_batch fits: the cap, not memory, is the limit
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
