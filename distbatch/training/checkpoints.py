"""Which checkpoint a resumed run (``resume``) continues from: the newest INTACT one.

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
but none is intact, resume is refused (ParameterError) rather than silently
starting again. Choosing writes or deletes no file, so a refused or
fallen-back resume never prunes an older checkpoint.

Also here: the temporary directory a non-chief worker saves its (never read)
checkpoint copies to, :func:`temp_checkpoint_dir`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import tensorflow as tf

from distbatch.errors import ParameterError
from distbatch.outdir import checkpoint_candidates
from distbatch.training.early_stopping import load_weights, weights_file

candidates = checkpoint_candidates  # the name the launcher and the resume imports use
_TEMP = re.compile(r"^distbatch-ckpt-w\d+-p(\d+)-")


def damage(directory: str, step: int, prefix: str) -> str | None:
    """Why checkpoint `prefix` (of `step`) cannot be resumed from, or None if it is intact."""
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
        try:
            load_weights(os.path.join(directory, weights_file(best)))
        except Exception as e:  # noqa: BLE001 - OSError, BadZipFile, ValueError, ...
            return (f"its early-stopping best weights {weights_file(best)} are unreadable "
                    f"({type(e).__name__}: {str(e)[:100]})")
    return None


def newest_intact(directory: str, *, warn: bool = False) -> str | None:
    """The prefix of the newest intact checkpoint in `directory`, or None if there is none at all.

    With `warn`, prints one stderr line per damaged checkpoint it skips. Raises
    ParameterError (naming resume) when checkpoints exist but every one is damaged.
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
        raise ParameterError(f"{{resume}}: no intact checkpoint in {directory!r} "
                             f"({'; '.join(problems)}); nothing was changed; use {{overwrite}} (or "
                             "another {out}) to start again", "resume", "overwrite", "out")
    return None


def temp_checkpoint_dir(worker_index: int, root: str | None = None) -> str:
    """A new temporary directory for a non-chief worker's checkpoint copies (TensorFlow needs
    every worker in a save; only the chief's copy is ever read), named with this process's id.

    First removes those of processes that no longer run: a worker SIGKILLed by a restart or
    a dead peer cannot remove its own, and each copy is a model plus optimizer state."""
    root = root or tempfile.gettempdir()
    remove_orphaned_temp_dirs(root)
    return tempfile.mkdtemp(prefix=f"distbatch-ckpt-w{worker_index}-p{os.getpid()}-", dir=root)


def remove_orphaned_temp_dirs(root: str) -> list[str]:
    """Remove (and return the names of) the temp checkpoint directories in `root` whose process
    is gone. Those of live processes (any user's) and older names without a process id stay."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    gone = [n for n in names if (m := _TEMP.match(n)) and not _alive(int(m.group(1)))]
    for name in gone:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True
