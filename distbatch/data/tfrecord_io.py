"""Reading TFRecord files directly, below tf.data: counting records by their frame headers,
the first record, and one-line errors that name the FILE a read failed on (TensorFlow's
errors name none). Used by the streaming sources (files.py) and the in-memory loader
(loaders.py)."""
from __future__ import annotations

import os
import re
import struct
from typing import Sequence

import numpy as np
import tensorflow as tf

from distbatch.errors import UsageError

LABEL_SAMPLE = 10_000          # records read to infer num_classes in tfrecord_source


def is_tfrecord_reader(reader) -> bool:
    """True for the default reader, also when passed explicitly as tf.data.TFRecordDataset."""
    return reader is None or (getattr(reader, "__module__", "").startswith("tensorflow.")
                              and getattr(reader, "__name__", "").startswith("TFRecordDataset"))


def count_tfrecord_frames(path: str) -> int:
    """Records in an uncompressed TFRecord file: walk the 8-byte length headers, seek over
    the data (length, length CRC, data, data CRC); a frame past the end is an error."""
    size, offset, count = os.path.getsize(path), 0, 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(12)
            end = offset + 12 + (struct.unpack("<Q", header[:8])[0] if len(header) == 12 else size) + 4
            if end > size:
                raise UsageError(f"TFRecord file {path!r} is truncated or corrupt: record {count + 1} "
                                 f"at byte {offset} runs past the end of the file ({size} bytes)")
            count += 1
            offset = f.seek(end)
    return count


def first_record(tf, paths: list[str], compression: str | None, label: str):
    try:
        for record in tf.data.TFRecordDataset(paths, compression_type=compression).take(1):
            return record
    except Exception as exc:  # DataLossError (corrupt or compressed), ...
        raise unreadable(exc, paths, label, compression, records=1) from None
    raise UsageError(f"TFRecords {label!r} contain no records")


def unreadable(exc: Exception, paths: Sequence[str], label: str, compression: str | None = None,
               *, records: int | None = LABEL_SAMPLE) -> UsageError:
    """One line naming the FILE, for a read of the first `records` records (None: all) of
    the TFRecord files `paths`, in that order, that failed with `exc`.

    TensorFlow's error names no file ("{{function_node __wrapped__IteratorGetNext...}}
    truncated record at 30900' failed with Read less bytes than requested"), so the files
    are read again one by one, up to the records the failed read covered.
    """
    left = -1 if records is None else records + 1  # take(-1): all of them
    for path in paths:
        ds = tf.data.TFRecordDataset(path, compression_type=compression).take(left)
        try:
            read = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
        except Exception as bad:  # noqa: BLE001 - any failure to read this file is the answer
            return _unreadable_file(path, bad, compression)
        if records is not None:
            left -= read
            if left <= 0:
                break
    return UsageError(f"cannot read TFRecords {label!r} ({type(exc).__name__}: {tf_reason(exc)})")


def _unreadable_file(path: str, exc: Exception, compression: str | None) -> UsageError:
    reason = tf_reason(exc)
    if "truncated" in reason and compression is None and "://" not in path:
        count_tfrecord_frames(path)  # raises "... is truncated or corrupt: record N at byte B ..."
    return UsageError(f"cannot read TFRecords {path!r} ({type(exc).__name__}: {reason})")


def tf_reason(exc: BaseException) -> str:
    """TensorFlow's own words from an op error, without its {{function_node ...}} prefix and
    [Op:...] suffix."""
    text = str(getattr(exc, "message", None) or exc)
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    return " ".join(text.split())[:160]
