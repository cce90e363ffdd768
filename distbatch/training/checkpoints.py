"""Which checkpoint `--resume` continues from: the newest INTACT one.

TensorFlow's own choice (`tf.train.latest_checkpoint`) trusts the
`checkpoint` index file: garbage there means "no checkpoint" (a silent
restart from step 0), and a damaged newest checkpoint ends in a traceback.
Here the candidates come from the files themselves (`ckpt-<step>.index`),
newest first, and one counts only if

* every tensor of its .index/.data files reads back (the bundle's CRCs), and
* its `state-<step>.json` (history and loop counters, written just before it)
  is there and names the same step;
* with early stopping, the best weights that state names (`best-<step>.npz`)
  read back.

Each damaged one is skipped with a one-line warning. If checkpoints exist
but none is intact, resume is refused (UsageError) rather than silently
starting again. Nothing here writes or deletes a file, so a refused or
fallen-back resume never prunes an older checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import sys

from distbatch.errors import UsageError

_CKPT = re.compile(r"^ckpt-(\d+)\.index$")


def candidates(directory: str) -> list[tuple[int, str]]:
    """(step, prefix) of every checkpoint in `directory`, newest first, from the file names."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), os.path.join(directory, f"ckpt-{m.group(1)}"))
             for m in map(_CKPT.match, names) if m]
    return sorted(found, reverse=True)


def damage(directory: str, step: int, prefix: str) -> str | None:
    """Why checkpoint `prefix` (of `step`) cannot be resumed from, or None if it is intact."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)  # reads the bytes and checks them against the CRC
    except Exception as e:  # noqa: BLE001 - DataLossError, NotFoundError, OutOfRangeError, ...
        text = " ".join(str(getattr(e, "message", None) or e).split())
        return f"{type(e).__name__}: {text[:160]}"
    state = os.path.join(directory, f"state-{step}.json")
    if not os.path.exists(state):
        return f"its state-{step}.json (history and loop counters) is missing"
    try:
        with open(state) as f:
            saved = json.load(f)
        if saved.get("step") != step or not isinstance(saved.get("history"), list):
            raise ValueError(f"it holds step {saved.get('step')!r}")
        best = ((saved.get("loop") or {}).get("early_stopping") or {}).get("best_step")
    except (OSError, ValueError, AttributeError) as e:
        return f"its state-{step}.json is unreadable ({type(e).__name__}: {str(e)[:100]})"
    if best is not None:
        from distbatch.training.early_stopping import load_weights, weights_file
        try:
            load_weights(os.path.join(directory, weights_file(best)))
        except Exception as e:  # noqa: BLE001 - OSError, BadZipFile, ValueError, ...
            return (f"its early-stopping best weights {weights_file(best)} are unreadable "
                    f"({type(e).__name__}: {str(e)[:100]})")
    return None


def newest_intact(directory: str, *, warn: bool = False) -> str | None:
    """The prefix of the newest intact checkpoint in `directory`, or None if there is none at all.

    With `warn`, prints one stderr line per damaged checkpoint it skips. Raises
    UsageError when checkpoints exist but every one is damaged.
    """
    found = candidates(directory)
    problems = []
    for step, prefix in found:
        why = damage(directory, step, prefix)
        if why is None:
            return prefix
        problems.append(f"{os.path.basename(prefix)}: {why}")
        if warn:
            print(f"distbatch: warning: skipping damaged checkpoint {prefix} ({why}); trying an "
                  "older one", file=sys.stderr, flush=True)
    if found:
        raise UsageError(f"--resume: no intact checkpoint in {directory!r} ({'; '.join(problems)}); "
                         "nothing was changed; use --overwrite (or another --out) to start again")
    return None
