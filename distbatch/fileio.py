"""Atomic file writes: a reader (or a crash) sees the old file or the whole new
one, never half of it. Write to a temp file in the same directory, fsync,
os.replace over the target (rename(2) is atomic), then fsync the directory."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` atomically; `write(f)` fills the binary file object f."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary readable files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def unwritable_reason(directory: str | os.PathLike) -> str | None:
    """None if a file can be created in `directory`, else the OS's reason.

    It creates and removes one temp file: the only test that /proc, read-only
    mounts and root (to whom permission bits do not apply) all answer truthfully.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=".distbatch-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(tmp)
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def json_roundtrip(obj: Any) -> Any:
    """`obj` as it reads back from atomic_write_json (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    try:
        return o.item()  # numpy scalars
    except AttributeError:
        return str(o)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
