"""The output directory (``out``): distbatch writes only into a directory it created (or
found empty), marks it as its own, and ``overwrite`` removes only its own files.

A run directory holds the marker file ``.distbatch-run``, written when
distbatch first writes there. Runs of the first releases had no marker; their config.json
(a JSON object with distbatch's ``"command"`` and ``"backend_reason"`` keys)
marks them instead. A non-empty directory with neither is the user's: it is
refused, with or without ``overwrite`` or ``resume``, and nothing in it changes.

Every check here is read-only (the writability probe creates and removes one
temporary file), so a refused ``out`` is never touched. Errors are ParameterErrors naming
``out``, ``resume`` and ``overwrite``; the CLI shows them as its flags.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from distbatch.errors import ParameterError, require_param
from distbatch.fileio import atomic_write_text, unwritable_reason

MARKER = ".distbatch-run"


def owned(out: str) -> bool:
    """True if distbatch wrote `out`: the marker, or an early (unmarked) run's own config.json."""
    if os.path.exists(os.path.join(out, MARKER)):
        return True
    try:
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("command") in ("train", "sweep")
            and "backend_reason" in config)


def check_out_dir(out: str, *, resume: bool, overwrite: bool, holds: tuple[str, ...]) -> None:
    """Refuse an `out` that is not ours, not writable, or holds a run (without resume/overwrite).

    `holds`: the files whose presence means a run is there (train: summary.json, ...).
    """
    require_param(bool(str(out).strip()), f"{{out}} must name a directory, got {out!r}", "out")
    if os.path.islink(out) and not os.path.exists(out):
        raise ParameterError(f"{{out}} {out!r} is a broken symlink or a symlink loop", "out")
    if not os.path.exists(out):
        parent = _nearest_existing(out)
        require_param(os.path.isdir(parent),
                      f"{{out}} {out!r} cannot be created: {parent!r} is not a directory", "out")
        _require_writable(out, parent)
        return
    require_param(os.path.isdir(out), f"{{out}} {out!r} exists and is not a directory", "out")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise ParameterError(f"{{out}} {out!r} cannot be read ({e.strerror})", "out") from None
    if entries and not owned(out):
        raise ParameterError(f"{{out}} {out!r} is not empty and was not created by distbatch (no "
                             f"{MARKER} file); refusing to write into it or delete anything; use a new "
                             "or empty directory", "out")
    _refuse_linked_subdirs(out, entries)
    found = [name for name in holds if name in entries]
    if found and not (resume or overwrite):
        raise ParameterError(f"{{out}} {out!r} already holds a run ({', '.join(found)}); "
                             "pass {resume} to continue it or {overwrite} to replace it",
                             "out", "resume", "overwrite")
    _require_writable(out, out)


def check_out_outside_dataset(out: str, dataset: str) -> None:
    """ParameterError when `out` lies inside the image directory `dataset`: every
    sub-directory there is a class, so the run's own directory would become one (and the
    next run's data would hold the previous run's files)."""
    if not os.path.isdir(dataset):
        return  # a name, an .npz or TFRecord files: no directory to land in
    inside = os.path.commonpath([os.path.realpath(out), os.path.realpath(dataset)])
    require_param(inside != os.path.realpath(dataset),
                  f"{{out}} {out!r} is inside the image directory {{dataset}} {dataset!r}, whose "
                  "sub-directories are its classes; expected an {out} outside it", "out", "dataset")


# Sub-directories distbatch writes files into and prunes (train: checkpoints/, tensorboard/;
# sweep: points/, tensorboard/).
WRITTEN_DIRS = ("checkpoints", "tensorboard", "points")


# A checkpoint's index file, by step: checkpoints/ckpt-<step>.index (TensorFlow's checkpoint
# bundle; distbatch/training/checkpoints.py writes and checks them).
CHECKPOINT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")


def checkpoint_candidates(directory: str) -> list[tuple[int, str]]:
    """(step, prefix) of every checkpoint in `directory`, newest first, from the file names
    alone (no TensorFlow: the launcher reads them to say where a restart resumes)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), os.path.join(directory, f"ckpt-{m.group(1)}"))
             for m in map(CHECKPOINT_INDEX.match, names) if m]
    return sorted(found, reverse=True)


def _refuse_linked_subdirs(out: str, entries: list[str]) -> None:
    """A symlinked checkpoints/ (or tensorboard/, points/) would make a resumed run write and
    prune files in whatever directory the link points to, outside `out`."""
    for name in WRITTEN_DIRS:
        path = os.path.join(out, name)
        if name in entries and os.path.islink(path):
            raise ParameterError(f"{{out}} {out!r}: {name}/ is a symlink to {os.readlink(path)!r}; "
                                 "expected a real directory (distbatch writes and deletes files in "
                                 "it); replace the link with a directory or use another {out}", "out")


def check_run_to_resume(out: str) -> None:
    """ParameterError when a resumed train run names an `out` that does not exist or is empty: most
    likely a mistyped path, and a fresh run there would silently leave the run the user meant
    to continue. (A resumed sweep may start a new sweep: `scripts/bootstrap.sh sweep`
    passes it on the first run too. A run killed before its first checkpoint has its
    config.json and marker, so it starts again from step 0.)"""
    what = ("does not exist" if not os.path.lexists(out) else "is empty" if _empty_dir(out) else None)
    require_param(what is None, f"{{resume}}: no checkpoint found in {out!r} (the directory {what}); "
                                "expected the {out} of an earlier run: check the path, or drop "
                                "{resume} to start a new run", "resume", "out")


def _empty_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.listdir(path)
    except OSError:  # unreadable: check_out_dir says so
        return False


def claim_out_dir(out: str, kind: str, *, remove: tuple[str, ...] = ()) -> None:
    """Create `out` (if needed) with its marker, after deleting the entries `remove` (overwrite).

    Only call after check_out_dir accepted `out`: `remove` names distbatch's own files.
    """
    for name in remove:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(out, MARKER)):
        atomic_write_text(os.path.join(out, MARKER),
                          f"written by `distbatch {kind}`: overwriting this run may replace "
                          "distbatch's own files in this directory, nothing else\n")


def _nearest_existing(out: str) -> str:
    path = os.path.abspath(out)
    while not os.path.exists(path):
        if os.path.islink(path):
            raise ParameterError(f"{{out}} {out!r}: {path!r} is a broken symlink or a symlink loop",
                                 "out")
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _require_writable(out: str, directory: str) -> None:
    reason = unwritable_reason(directory)
    if reason:
        raise ParameterError(f"{{out}} {out!r} is not writable ({reason}: {directory!r})", "out")
