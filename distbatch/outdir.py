"""The --out directory: distbatch writes only into a directory it created (or
found empty), marks it as its own, and --overwrite removes only its own files.

A run directory holds the marker file ``.distbatch-run``, written when
distbatch first writes there. Round-1 runs had no marker; their config.json
(a JSON object with distbatch's ``"command"`` and ``"backend_reason"`` keys)
marks them instead. A non-empty directory with neither is the user's: it is
refused, with or without --overwrite or --resume, and nothing in it changes.

Every check here is read-only (the writability probe creates and removes one
temporary file), so a refused --out is never touched.
"""
from __future__ import annotations

import json
import os
import shutil

from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_text, unwritable_reason

MARKER = ".distbatch-run"


def owned(out: str) -> bool:
    """True if distbatch wrote `out`: the marker, or a round-1 run's own config.json."""
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
    """Refuse an --out that is not ours, not writable, or holds a run (without --resume/--overwrite).

    `holds`: the files whose presence means a run is there (train: summary.json, ...).
    """
    require(bool(str(out).strip()), f"--out must name a directory, got {out!r}")
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"--out {out!r} is a broken symlink or a symlink loop")
    if not os.path.exists(out):
        parent = _nearest_existing(out)
        require(os.path.isdir(parent), f"--out {out!r} cannot be created: {parent!r} is not a directory")
        _require_writable(out, parent)
        return
    require(os.path.isdir(out), f"--out {out!r} exists and is not a directory")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise UsageError(f"--out {out!r} cannot be read ({e.strerror})") from None
    if entries and not owned(out):
        raise UsageError(f"--out {out!r} is not empty and was not created by distbatch (no {MARKER} "
                         "file); refusing to write into it or delete anything; use a new or empty "
                         "directory")
    found = [name for name in holds if name in entries]
    if found and not (resume or overwrite):
        raise UsageError(f"--out {out!r} already holds a run ({', '.join(found)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    _require_writable(out, out)


def claim_out_dir(out: str, kind: str, *, remove: tuple[str, ...] = ()) -> None:
    """Create `out` (if needed) with its marker, after deleting the entries `remove` (--overwrite).

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
                          f"written by `distbatch {kind}`: --overwrite may replace distbatch's own "
                          "files in this directory, nothing else\n")


def _nearest_existing(out: str) -> str:
    path = os.path.abspath(out)
    while not os.path.exists(path):
        if os.path.islink(path):
            raise UsageError(f"--out {out!r}: {path!r} is a broken symlink or a symlink loop")
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _require_writable(out: str, directory: str) -> None:
    reason = unwritable_reason(directory)
    if reason:
        raise UsageError(f"--out {out!r} is not writable ({reason}: {directory!r})")
