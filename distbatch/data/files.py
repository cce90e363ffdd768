"""Streaming from files: data larger than memory, read as the training runs.

    from distbatch.data import files
    source = files("data/train-*.tfrecord", parse_fn)
    distbatch.fit(..., data=source, global_batch_size=1024, epochs=10)

``parse_fn(serialized)`` maps one record to ``(x, y)`` or ``(x, y, sample_weight)``
(x and y may be nested dicts/tuples, each of one fixed shape: they are batched); it is
applied with ``num_parallel_calls``.
One record gives one example. Nothing is cached in memory: each epoch reads the
files again, shuffled in seeded blocks of ``shuffle_buffer`` records.

Policies (docs/data.md, "Streaming from files"):

* Listing. ``pattern`` is a glob or a list of globs/paths; every one must match
  something; the union is sorted, so every worker sees the same list.
* Sharding. W workers, F files. F >= W: BY FILE, round-robin on the sorted
  list (worker w reads files w, w+W, w+2W, ...). F < W: BY ELEMENT, every worker
  reads every file and keeps record i of the common stream when i % W == w.
* Equal steps (remainder policy). ``num_examples(W) = W * min_w n_w`` where n_w
  is worker w's share, so steps_per_epoch = num_examples // global_batch is the
  same on every worker and each worker takes exactly steps_per_epoch * B / W
  examples per epoch. Examples beyond that in a larger shard are DROPPED for that
  epoch (which ones changes with the shuffle). Nobody waits in a collective for a
  worker that ran dry.
* Order. Epoch e (absolute: epoch_offset + e) orders each worker's files by a
  permutation seeded by (seed, e), interleaves ``cycle_length`` of them (fixed,
  4 by default, so the order does not depend on the machine's core count) with
  deterministic=True, then shuffles within consecutive blocks of ``shuffle_buffer``
  records, each block's permutation seeded by (seed, e, block)
  (distbatch.data.inputs.block_shuffle; independent of TensorFlow's global seed).
  Same seed: same order on every run; a resumed run skips
  whole epochs by seed and then batches within the epoch, so from start_step on
  it sees what an uninterrupted run sees. ``shuffle_buffer=0`` and
  ``shuffle_files=False`` give the plain file order.
* Counting. The per-file record counts are read once (uncompressed TFRecords by
  their frame headers, seeking over the data; anything else by one pass) and
  kept on the object. ``num_examples=`` skips counting: a list of per-file
  counts (sorted-file order) or a {path: count} dict is exact; a single total N
  is split over the files in proportion to their sizes in bytes (exact for
  fixed-size records). If a worker's files hold fewer records than counted, it
  wraps around its own shard instead of ending early: a wrong count repeats a
  few examples, it never hangs a collective.
* Validation (eval_dataset). Same sharding, no shuffling; fixed per-replica
  batches; each worker pads its share with masked (mask 0, weight 0) examples up
  to the SAME number of batches, so every example counts exactly once. With only
  a total N (no per-file counts) validation shards by element.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from distbatch.data.inputs import block_shuffle
from distbatch.data.tfrecord_io import (  # noqa: F401 (unreadable, tf_reason: importable from here)
    LABEL_SAMPLE, count_tfrecord_frames, first_record, is_tfrecord_reader, tf_reason, unreadable)
from distbatch.errors import UsageError, require

_is_tfrecord_reader = is_tfrecord_reader  # the name tests import

DEFAULT_CYCLE_LENGTH = 4
EVAL_MIN_BATCH = 256           # per-replica validation batch, as in data/indices.py
_FILES_OPTIONS = {"shuffle_buffer", "shuffle_files", "compression", "num_parallel_reads",
                  "cycle_length"}
_P = 2147483647                # 2**31 - 1: the hold-out hash works modulo this prime


def list_files(pattern: str | Sequence[str]) -> list[str]:
    """The sorted union of the files matching `pattern` (a glob or a list of globs/paths)."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern or [])
    if not patterns:
        raise UsageError(f"no file pattern given (got {pattern!r}); expected a glob like 'data/*.tfrecord'")
    found: set[str] = set()
    for p in patterns:
        p = str(p)
        if "://" in p:  # gs://, s3://, hdfs://: TensorFlow's file systems
            hits = tf.io.gfile.glob(p)
        else:
            hits = [h for h in glob.glob(os.path.expanduser(p)) if os.path.isfile(h)]
        if not hits:
            raise UsageError(f"no file matches {p!r}" + (f" (in {patterns!r})" if len(patterns) > 1 else ""))
        found.update(hits)
    return sorted(found)


def files(pattern: str | Sequence[str], parse_fn: Callable, *, shuffle_buffer: int = 10_000,
          shuffle_files: bool = True, compression: str | None = None,
          num_parallel_reads: int | None = None, cycle_length: int = DEFAULT_CYCLE_LENGTH,
          num_examples: int | Sequence[int] | Mapping[str, int] | None = None,
          reader: Callable | None = None) -> "FileSource":
    """A streaming source over the files matching `pattern` (see the module docstring).

    reader(path[, compression_type=...]) -> tf.data.Dataset of records
    (default tf.data.TFRecordDataset); num_parallel_reads defaults to AUTOTUNE
    (it changes speed, never the order).
    """
    return FileSource(list_files(pattern), parse_fn, shuffle_buffer=shuffle_buffer,
                      shuffle_files=shuffle_files, compression=compression,
                      num_parallel_reads=num_parallel_reads, cycle_length=cycle_length,
                      num_examples=num_examples, reader=reader, name=str(pattern))


@dataclass(frozen=True)
class _Holdout:
    """Record (file f, index i) is validation when hash(seed, f, i) < fraction * P.

    A pure integer hash, identical in NumPy and TensorFlow, so the split sizes
    are computed from the record counts without reading any data."""
    fraction: float
    seed: int
    side: str  # "train" or "val"

    def _hash(self, f, i, xp):
        shift, xor, mod = xp
        x = mod(i * 48271 + f * 69621 + (self.seed % _P) * 40692 + 12345, _P)
        for a, s in ((48271, 13), (69621, 11), (48271, 7)):
            x = mod(x * a, _P)
            x = xor(x, shift(x, s))
        return x

    def np_count(self, f: int, n: int) -> int:
        h = self._hash(f, np.arange(n, dtype=np.int64), (np.right_shift, np.bitwise_xor, np.mod))
        val = int(np.count_nonzero(h < self.fraction * _P))
        return val if self.side == "val" else n - val

    def tf_keep(self, f, i):
        h = self._hash(tf.cast(f, tf.int64), tf.cast(i, tf.int64),
                       (tf.bitwise.right_shift, tf.bitwise.bitwise_xor, tf.math.floormod))
        is_val = h < tf.constant(int(self.fraction * _P), tf.int64)
        return is_val if self.side == "val" else tf.logical_not(is_val)


class FileSource:
    """Files read as a stream; implements the Trainer's Source protocol
    (num_examples, train_dataset, eval_dataset)."""

    def __init__(self, paths: Sequence[str], parse_fn: Callable, *, shuffle_buffer: int = 10_000,
                 shuffle_files: bool = True, compression: str | None = None,
                 num_parallel_reads: int | None = None, cycle_length: int = DEFAULT_CYCLE_LENGTH,
                 num_examples=None, reader: Callable | None = None, name: str | None = None,
                 holdout: _Holdout | None = None):
        require(callable(parse_fn), f"parse_fn must be callable, got {parse_fn!r}")
        for label, value, low in (("shuffle_buffer", shuffle_buffer, 0), ("cycle_length", cycle_length, 1)):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                    f"{label} must be an integer >= {low}, got {value!r}")
        require(num_parallel_reads is None or (isinstance(num_parallel_reads, int) and
                                               (num_parallel_reads >= 1 or num_parallel_reads == -1)),
                f"num_parallel_reads must be a positive integer or None (AUTOTUNE), got {num_parallel_reads!r}")
        require(compression in (None, "", "GZIP", "ZLIB"),
                f"compression must be None, 'GZIP' or 'ZLIB', got {compression!r}")
        self.files = tuple(str(p) for p in paths)
        require(len(self.files) > 0, "no files given")
        self.parse_fn, self.shuffle_buffer, self.shuffle_files = parse_fn, shuffle_buffer, shuffle_files
        self.compression, self.cycle_length, self.reader = compression or None, cycle_length, reader
        self.num_parallel_reads = num_parallel_reads
        self.name = name or self.files[0]
        self._holdout = holdout
        self._counts: list[int] | None = None
        self._total: int | None = None   # a user-given total: per-file counts are estimates
        self._set_counts(num_examples)

    def __repr__(self) -> str:
        return f"FileSource({self.name!r}, {len(self.files)} files)"

    # ------------------------------------------------------------- counting

    def _set_counts(self, num_examples) -> None:
        if num_examples is None:
            return
        F = len(self.files)
        require(self._holdout is None, "num_examples cannot be given for a held-out split")
        if isinstance(num_examples, Mapping):
            missing = [p for p in self.files if p not in num_examples]
            if missing:
                raise UsageError(f"num_examples has no count for {missing[0]!r} "
                                 f"({len(missing)} of {F} files missing)")
            num_examples = [num_examples[p] for p in self.files]
        if isinstance(num_examples, (int, np.integer)) and not isinstance(num_examples, bool):
            require(num_examples >= 1, f"num_examples must be >= 1, got {num_examples}")
            self._total = int(num_examples)
            sizes = [_file_size(p) for p in self.files]
            whole = sum(sizes) or 1
            self._counts = [self._total * s // whole for s in sizes]
            return
        counts = list(num_examples)
        require(len(counts) == F and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                         and c >= 0 for c in counts),
                f"num_examples must be a total, {F} per-file counts >= 0 (sorted file order) or a "
                f"{{path: count}} dict, got {num_examples!r:.120}")
        self._counts = [int(c) for c in counts]

    def file_counts(self) -> list[int]:
        """Examples per file (sorted order), counted once and kept."""
        if self._counts is None:
            raw = [self._count_records(p) for p in self.files]
            self._counts = ([self._holdout.np_count(f, n) for f, n in enumerate(raw)]
                            if self._holdout else raw)
        return self._counts

    def _count_records(self, path: str) -> int:
        if is_tfrecord_reader(self.reader) and self.compression is None and "://" not in path:
            return count_tfrecord_frames(path)
        try:
            return int(self._read_file(tf, tf.constant(path)).reduce(np.int64(0), lambda c, _: c + 1))
        except Exception as exc:  # DataLossError, NotFoundError, ...
            raise UsageError(f"cannot read {path!r} ({type(exc).__name__}: {tf_reason(exc)})") from None

    def sample_digest(self, files: int = 8, records: int = 8) -> str:
        """SHA-256 (16 hex digits) of the first `records` records of up to `files` files spread
        evenly over the sorted list: a fixed sample that a resumed run compares (distbatch.data.
        datasets.fingerprint). Reads those records only, never the whole files."""

        digest = hashlib.sha256()
        for i in sorted({int(i) for i in np.linspace(0, len(self.files) - 1, min(files, len(self.files)))}):
            for record in self._read_file(tf, self.files[i]).take(records):
                digest.update(np.asarray(record.numpy()).tobytes())
        return digest.hexdigest()[:16]

    def sharding(self, num_workers: int) -> str:
        """"file" when there are at least as many files as workers, else "element"."""
        return "file" if len(self.files) >= num_workers else "element"

    def worker_counts(self, num_workers: int, *, eval: bool = False) -> list[int]:
        """Examples in each worker's share."""
        require(num_workers >= 1, f"num_workers must be >= 1, got {num_workers}")
        counts, W = self.file_counts(), num_workers
        if self._mode(W, eval) == "file":
            return [sum(counts[w::W]) for w in range(W)]
        total = self._total if self._total is not None else sum(counts)
        return [(total - w + W - 1) // W for w in range(W)]  # #{i < total : i % W == w}

    def _mode(self, num_workers: int, eval: bool) -> str:
        # With only a total, per-file counts are estimates; validation must be exact.
        return "element" if eval and self._total is not None else self.sharding(num_workers)

    def num_examples(self, num_workers: int) -> int:
        """Usable training examples per epoch over all workers: W * the smallest share."""
        return num_workers * min(self.worker_counts(num_workers))

    # ------------------------------------------------------------- datasets

    def train_dataset(self, plan, *, seed: int, worker_index: int, num_workers: int,
                      local_replicas: int, start_step: int, total_steps: int,
                      epoch_offset: int = 0):
        """Per-worker training batches; element i is local replica i % L of step start_step + i // L."""
        W, L, w = num_workers, local_replicas, worker_index
        _check_layout(plan, W, L, w)
        self._check_parse_fn(tf)
        S, Kb = plan.steps_per_epoch, plan.accumulation_steps * plan.per_replica_batch_size
        require(S >= 1, f"the plan has {S} steps per epoch; it needs at least 1")
        require(0 <= start_step <= total_steps,
                f"start_step must be in [0, total_steps={total_steps}], got {start_step}")
        quota = S * L * Kb  # this worker's examples per epoch
        have = self.worker_counts(W)[w]
        if self._total is None and quota > have:
            raise UsageError(f"the plan needs {quota} examples per epoch from worker {w} of {W} but "
                             f"its share of {self.name!r} holds {have}; derive the plan with "
                             f"num_train_examples=source.num_examples({W}) = {self.num_examples(W)}")
        first, end = start_step // S, max(start_step // S + 1, math.ceil(total_steps / S))

        def epoch(e):
            records = self._records(tf, e, seed, w, W, shuffle=True).repeat().take(quota)
            return (records.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                    .batch(Kb, drop_remainder=True))

        ds = tf.data.Dataset.range(epoch_offset + first, epoch_offset + end).flat_map(epoch)
        ds = ds.skip((start_step - first * S) * L).take((total_steps - start_step) * L)
        return ds.prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, plan, *, worker_index: int, num_workers: int, local_replicas: int):
        """(per-worker dataset of (x, y, sample_weight, mask) batches, batches per local replica)."""
        W, L, w = num_workers, local_replicas, worker_index
        _check_layout(plan, W, L, w)
        self._check_parse_fn(tf)
        shares = self.worker_counts(W, eval=True)
        total = sum(shares)
        require(total >= 1, f"the validation files {self.name!r} hold no examples")
        eb = max(1, min(max(plan.per_replica_batch_size * plan.accumulation_steps, EVAL_MIN_BATCH),
                        math.ceil(total / plan.replicas)))
        n = max(math.ceil(s / (L * eb)) for s in shares)
        mode = self._mode(W, True)
        masked = lambda x, y, sw: (x, y, sw, tf.ones([], tf.float32))  # noqa: E731
        real = (self._records(tf, None, 0, w, W, shuffle=False, mode=mode)
                .map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).map(masked))

        def blank(x, y, sw, mask):
            zeros = lambda t: tf.nest.map_structure(tf.zeros_like, t)  # noqa: E731
            return zeros(x), zeros(y), tf.zeros_like(sw), tf.zeros_like(mask)

        # padding copies the shape of the first record of all the files; take() bounds it
        # even if the files hold more than counted, so every worker yields exactly n * L batches
        pad = self._records(tf, None, 0, 0, 1, shuffle=False, mode="element").take(1) \
            .map(self._parse).map(masked).map(blank).cache().repeat()  # one element, read once
        ds = real.concatenate(pad).take(n * L * eb).batch(eb, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE), n

    # ------------------------------------------------------------- pieces

    def _read_file(self, tf, path, file_index=None):
        reader = self.reader or tf.data.TFRecordDataset
        ds = reader(path, compression_type=self.compression) if self.compression else reader(path)
        if self._holdout is not None and file_index is not None:
            keep = self._holdout.tf_keep
            ds = ds.enumerate().filter(lambda i, r: keep(file_index, i)).map(lambda i, r: r)
        return ds

    def _records(self, tf, epoch, seed: int, w: int, W: int, *, shuffle: bool, mode: str | None = None):
        """Worker w's serialized records for one epoch (epoch is a tensor, or None: no shuffling)."""
        mode = mode or self.sharding(W)
        index = list(range(w, len(self.files), W)) if mode == "file" else list(range(len(self.files)))
        paths = tf.constant([self.files[i] for i in index])
        ids = tf.constant(index, tf.int64)
        if shuffle and self.shuffle_files and len(index) > 1:
            # the same permutation on every worker (element sharding needs one common stream)
            keys = tf.random.stateless_uniform([len(index)], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            order = tf.argsort(keys, stable=True)
            paths, ids = tf.gather(paths, order), tf.gather(ids, order)
        records = tf.data.Dataset.from_tensor_slices((paths, ids)).interleave(
            lambda p, i: self._read_file(tf, p, i), cycle_length=min(self.cycle_length, len(index)),
            block_length=1, num_parallel_calls=self.num_parallel_reads or tf.data.AUTOTUNE,
            deterministic=True)
        if mode == "element" and W > 1:
            records = records.shard(W, w)
        if shuffle and self.shuffle_buffer > 1:
            # -1 - epoch keeps this seed apart from the file permutation's (seed, epoch)
            records = block_shuffle(tf, records, self.shuffle_buffer, seed, -1 - epoch)
        return records

    def _check_parse_fn(self, tf) -> None:
        """Trace parse_fn once (no data read) so a wrong return is a one-line error here,
        not an autograph traceback from inside the pipeline."""
        spec = tf.data.Dataset.from_tensors(tf.constant(b"")).map(self.parse_fn).element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            got = (f"a tuple of {len(spec)}" if isinstance(spec, tuple) else
                   "a dict" if isinstance(spec, dict) else "one tensor")
            raise UsageError(f"parse_fn must return (x, y) or (x, y, sample_weight), got {got}")

    def _parse(self, record):
        out = self.parse_fn(record)
        sw = tf.reshape(tf.cast(out[2], tf.float32), []) if len(out) == 3 else tf.ones([], tf.float32)
        return out[0], out[1], sw


def _check_layout(plan, W: int, L: int, w: int) -> None:
    require(L >= 1 and W >= 1 and plan.replicas == W * L,
            f"plan.replicas ({plan.replicas}) must equal num_workers ({W}) x local_replicas ({L})")
    require(0 <= w < W, f"worker_index must be in [0, {W}), got {w}")


def _file_size(path: str) -> int:
    if "://" in path:
        return int(tf.io.gfile.stat(path).length)
    return os.path.getsize(path)


# ------------------------------------------------------- the CLI's TFRecord format

def tfrecord_source(pattern: str | Sequence[str], *, x_key: str = "x", y_key: str = "y",
                    shape: str | Sequence[int] | None = None, val_path: str | Sequence[str] | None = None,
                    val_fraction: float = 0.2, num_classes: int | None = None, seed: int = 0,
                    **options: Any) -> tuple[FileSource, FileSource, tuple[int, ...], int]:
    """Streaming sources for the tf.train.Example format of distbatch/data/datasets.py
    ("x" float_list, "y" int64_list of length 1, optional "shape" int64_list).

    Returns (train_source, val_source, input_shape, num_classes). Validation is
    `val_path` when given, else a seeded hash split of the records (record i of
    file f is held out when hash(seed, f, i) < val_fraction), computed without
    reading any data. input_shape: `shape`, else the "shape" feature of the first
    record, else (len(x),). num_classes: given, else max label + 1 over the first
    LABEL_SAMPLE records (pass it for a large set whose first records miss a class).
    `options` go to files() (shuffle_buffer, compression, cycle_length, ...).
    """

    unknown = sorted(set(options) - _FILES_OPTIONS)
    require(not unknown, f"unknown option(s) {', '.join(unknown)} for tfrecord_source; "
                         f"expected some of {', '.join(sorted(_FILES_OPTIONS))}")
    require(isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1,
            f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    train_files = list_files(pattern)
    compression = options.get("compression")
    label = str(pattern)
    first = first_record(tf, train_files, compression, label)
    parsed = tf.io.parse_single_example(first, {x_key: tf.io.VarLenFeature(tf.float32),
                                                y_key: tf.io.VarLenFeature(tf.int64),
                                                "shape": tf.io.VarLenFeature(tf.int64)})
    length, y_len = int(tf.size(parsed[x_key].values)), int(tf.size(parsed[y_key].values))
    require(length > 0 and y_len == 1, f"TFRecords {label!r}: the first record has {length} {x_key!r} "
                                       f"values and {y_len} {y_key!r} values; expected > 0 and exactly 1")
    input_shape = _shape(shape if shape is not None else
                         (parsed["shape"].values.numpy().tolist() or [length]), label)
    require(math.prod(input_shape) == length, f"TFRecords {label!r}: shape {input_shape} needs "
                                              f"{math.prod(input_shape)} values per record, got {length}")
    spec = {x_key: tf.io.FixedLenFeature([length], tf.float32), y_key: tf.io.FixedLenFeature([1], tf.int64)}

    def parse_fn(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        return tf.reshape(ex[x_key], input_shape), tf.cast(ex[y_key][0], tf.int32)

    if val_path is not None:
        train = FileSource(train_files, parse_fn, name=label, **options)
        val = files(val_path, parse_fn, **{**options, "shuffle_buffer": 0})
    else:
        split = lambda side: _Holdout(float(val_fraction), int(seed), side)  # noqa: E731
        train = FileSource(train_files, parse_fn, name=label, holdout=split("train"), **options)
        val = FileSource(train_files, parse_fn, name=f"{label} (held out)", holdout=split("val"),
                         **{**options, "shuffle_buffer": 0})
    if num_classes is None:
        paths = list(train.files) + list(val.files)
        sample = tf.data.TFRecordDataset(paths, compression_type=compression)
        try:
            labels = [int(r[y_key][0]) for r in sample.take(LABEL_SAMPLE).map(
                lambda s: tf.io.parse_single_example(s, {y_key: spec[y_key]}))]
        except Exception as exc:  # DataLossError: a file cut inside a record, a bad CRC
            raise unreadable(exc, paths, label, compression) from None
        require(min(labels) >= 0, f"TFRecords {label!r}: labels must be class indices >= 0, got {min(labels)}")
        num_classes = max(labels) + 1
    require(isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
            and num_classes >= 2, f"num_classes must be an integer >= 2, got {num_classes!r}")
    return train, val, input_shape, int(num_classes)


def _shape(shape, label: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in (shape.lower().replace(",", "x").split("x") if isinstance(shape, str)
                                      else shape))
    except (TypeError, ValueError):
        dims = ()
    require(bool(dims) and all(d >= 1 for d in dims),
            f"shape for {label!r} must be positive integers like 32x32x3, got {shape!r}")
    return dims
