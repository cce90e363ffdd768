"""Datasets as in-memory NumPy arrays, by name or by path.

Every source ends as an :class:`ArrayDataset` (float32 inputs, int32 labels in
``[0, num_classes)``); the training pipeline (tf.data: per-epoch shuffle,
shard, batch, prefetch) starts from those arrays, so every source behaves the
same under every backend. Sources:

========================  ====================================================
``"mnist1d"`` (default)   MNIST-1D (Greydanus 2020, arXiv:2011.14439), made
                          procedurally by ``mnist1d.data.make_dataset`` (never
                          its downloader). Inputs ``(40,)`` float32, one
                          channel-less sequence per example (a Dense/MLP model
                          takes it as is; a Conv1D model adds a ``(40, 1)``
                          reshape), standardized with the TRAIN mean and std.
                          Default 20000 train / 4000 val. Cached as .npz.
``"digits"``              scikit-learn's bundled 8x8 digits (1797 images),
                          inputs ``(8, 8, 1)`` in [0, 1], split by seed
                          (default 20% validation).
``"synthetic"``           uniform random images for throughput benchmarks;
``"synthetic:32x32x3"``   shape from the suffix or ``shape=``; options
                          ``num_classes`` (10). Default 2048 train / 256 val.
``"mnist"``,              keras.datasets loaders (download once, then read
``"fashion_mnist"``,      ``~/.keras/datasets``); uint8 scaled to [0, 1],
``"cifar10"``,            grayscale gets a channel axis: (28, 28, 1) or
``"cifar100"``            (32, 32, 3). The test split is the validation set.
``path/to/file.npz``      arrays ``x_train, y_train, x_test, y_test`` (or
                          ``x_val, y_val``); uint8 inputs are divided by 255.
``path/to/dir/``          image directory, one sub-folder per class
                          (keras.utils.image_dataset_from_directory); options
                          ``image_size`` (32, 32), ``color_mode`` ("rgb"),
                          ``val_fraction`` (0.2, split by seed).
``*.tfrecord[s]`` / glob  TFRecord files of tf.train.Example, see below.
========================  ====================================================

TFRecord feature spec (one ``tf.train.Example`` per example)::

    "x":     float_list, the input flattened in C order       (required)
    "y":     int64_list of length 1, the class label          (required)
    "shape": int64_list, the input shape, e.g. [28, 28, 1]    (optional)

The input shape comes from the ``shape=`` option, else the ``"shape"`` feature,
else it is the flat ``(len(x),)``. Validation records come from
``val_path=`` (a file or glob), else ``val_fraction`` (0.2) of the records,
split by seed. ``x_key`` / ``y_key`` rename the features.

``train_size`` / ``val_size`` take a seeded random subset of that many examples
(or, for the generated sets, generate that many). ``num_classes=`` overrides the
class count inferred as ``max(label) + 1``; an inferred count is refused when
fewer than half of its classes occur (one stray label 100000 would otherwise
build a 100,001-class model). Training and validation inputs must agree in
dtype and scale. Every bad input raises :class:`~distbatch.errors.UsageError`
with one line naming the value.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distbatch.errors import UsageError
from distbatch.fileio import atomic_write

KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
BUILTIN_NAMES = ("mnist1d", "digits", "synthetic") + KERAS_DATASETS
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
MNIST1D_DEFAULT_SIZES = (20000, 4000)
SYNTHETIC_DEFAULT_SIZES = (2048, 256)
_MNIST1D_FORMAT = 1  # bump when the generated arrays change, to miss old caches
SCALE_RATIO_LIMIT = 20  # train vs val peak |x|: uint8 0..255 vs float 0..1 is 255


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A classification dataset held in memory.

    ``x_*`` are float32 with shape ``(n, *input_shape)``; ``y_*`` are int32 of
    shape ``(n,)`` with values in ``[0, num_classes)``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch axis."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def train_size(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def val_size(self) -> int:
        return int(self.x_val.shape[0])


def streams_from_files(spec: str) -> bool:
    """True for a TFRecord path or glob (the CLI streams those with distbatch.data.files)."""
    spec = str(spec).strip()
    return any(ch in spec for ch in "*?[") or spec.endswith(TFRECORD_SUFFIXES)


def cache_dir() -> Path:
    """Where generated datasets are cached: $DISTBATCH_CACHE_DIR or ~/.cache/distbatch/datasets."""
    env = os.environ.get("DISTBATCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "distbatch" / "datasets"


def load_dataset(
    name_or_path: str,
    *,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int | None = None,
    **options: Any,
) -> ArrayDataset:
    """Load a dataset by name or path (see the module docstring) into memory.

    The same ``(name_or_path, seed, sizes, options)`` always gives identical
    arrays. Unknown options are an error so that typos do not pass silently.
    """
    for label, size in (("train_size", train_size), ("val_size", val_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UsageError(f"{label} must be a positive integer, got {size!r}")
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UsageError(f"dataset must be a name or a path, got {name_or_path!r}")
    spec = str(name_or_path).strip()
    loader = _resolve(spec)
    allowed = _OPTIONS[loader.__name__] | {"num_classes"}
    unknown = sorted(set(options) - allowed)
    if unknown:  # checked before loading: generating or reading data first would waste minutes
        raise UsageError(f"unknown option(s) {', '.join(unknown)} for dataset {spec!r}; "
                         f"expected some of {', '.join(sorted(allowed))}")
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_va, y_va, inferred = loader(spec, seed=seed, train_size=train_size,
                                              val_size=val_size, options=options)
    num_classes = options.pop("num_classes", inferred)
    x_tr, y_tr = _subset(x_tr, y_tr, train_size, rng, "train_size", spec)
    x_va, y_va = _subset(x_va, y_va, val_size, rng, "val_size", spec)
    return _validated(spec, x_tr, y_tr, x_va, y_va, num_classes)


FINGERPRINT_SAMPLE = 64  # examples of each split hashed by fingerprint()


def fingerprint(data) -> dict | None:
    """What identifies the data of a run read from files, for --resume: the example counts
    plus a SHA-256 of a fixed sample (FINGERPRINT_SAMPLE evenly spaced examples of each split
    in memory; the first records of evenly spaced files when streamed). A file replaced by
    another of the same size (labels permuted, inputs negated) changes it; a change outside
    the sample does not (hashing everything would read the whole dataset at every start).

    None for the built-in sets (generated or downloaded): their flags (name, seed, sizes)
    already identify them, and regenerating on another machine may differ in the last bit.
    """
    if str(data.name).strip().split(":", 1)[0] in BUILTIN_NAMES:
        return None
    if hasattr(data, "x_train"):
        digest = hashlib.sha256()
        for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val)):
            pick = np.unique(np.linspace(0, len(x) - 1, min(len(x), FINGERPRINT_SAMPLE)).astype(np.int64))
            digest.update(f"{x.shape[1:]} {x.dtype} {y.dtype}".encode())
            digest.update(np.ascontiguousarray(x[pick]).tobytes())
            digest.update(np.ascontiguousarray(y[pick]).tobytes())
        return {"train_examples": data.train_size, "val_examples": data.val_size,
                "sample_sha256": digest.hexdigest()[:16]}
    train, val = data.train_source, data.val_source
    if not hasattr(train, "sample_digest"):
        return None
    samples = [train.sample_digest()] + ([val.sample_digest()] if val.files != train.files else [])
    return {"train_examples": sum(train.file_counts()), "val_examples": sum(val.file_counts()),
            "sample_sha256": hashlib.sha256(" ".join(samples).encode()).hexdigest()[:16]}


# --------------------------------------------------------------------- routing

_OPTIONS = {
    "_load_mnist1d": {"cache"},
    "_load_digits": {"val_fraction"},
    "_load_synthetic": {"shape"},
    "_load_keras": {"label_mode"},
    "_load_npz": set(),
    "_load_image_dir": {"image_size", "color_mode", "val_fraction"},
    "_load_tfrecord": {"shape", "x_key", "y_key", "val_path", "val_fraction"},
}


def _resolve(spec: str) -> Callable:
    if spec.split(":", 1)[0] == "synthetic":
        return _load_synthetic
    if spec in ("mnist1d", "digits"):
        return {"mnist1d": _load_mnist1d, "digits": _load_digits}[spec]
    if spec in KERAS_DATASETS:
        return _load_keras
    if any(ch in spec for ch in "*?[") or spec.endswith(TFRECORD_SUFFIXES):
        return _load_tfrecord
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_image_dir
    if path.is_file():
        if path.suffix == ".npz":
            return _load_npz
        raise UsageError(f"dataset file {spec!r} is not .npz, .tfrecord or .tfrecords")
    if os.sep in spec or "." in spec or (os.altsep and os.altsep in spec):
        raise UsageError(f"dataset path not found: {spec!r}")
    raise UsageError(f"unknown dataset {spec!r}; expected one of {', '.join(BUILTIN_NAMES)}, "
                     f"or a path to a .npz file, an image directory or TFRecord files")


# --------------------------------------------------------------- generated sets

def _load_mnist1d(spec, *, seed, train_size, val_size, options):
    """MNIST-1D made by its own generator; cached so a second load is instant."""
    n_train = train_size or MNIST1D_DEFAULT_SIZES[0]
    n_val = val_size or MNIST1D_DEFAULT_SIZES[1]
    use_cache = options.pop("cache", True)
    key = json.dumps({"format": _MNIST1D_FORMAT, "seed": seed, "train": n_train, "val": n_val},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-s{seed}-{n_train}-{n_val}-{digest}.npz"
    if use_cache and _is_file(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["x_train"], f["y_train"], f["x_val"], f["y_val"], 10
        except Exception:  # a damaged cache is regenerated, never trusted
            pass
    x_tr, y_tr, x_va, y_va = _generate_mnist1d(seed, n_train, n_val)
    if use_cache:
        try:
            _atomic_savez(path, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va)
        except OSError as e:  # an unwritable HOME costs the cache, not the run
            print(f"distbatch: warning: cannot cache {spec} in {str(path.parent)!r} "
                  f"({e.strerror or e}); continuing without the cache (set DISTBATCH_CACHE_DIR "
                  "to a writable directory)", file=sys.stderr, flush=True)
    return x_tr, y_tr, x_va, y_va, 10


def _generate_mnist1d(seed: int, n_train: int, n_val: int):
    # make_dataset seeds and draws from the GLOBAL numpy/random state; keep the
    # caller's state intact so loading data never changes anyone else's RNG.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    total = n_train + n_val
    args.num_samples = -(-total // 10) * 10  # make_dataset makes num_samples//10 per class
    args.train_split = 1.0  # split below, by count
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"])  # already shuffled by seed
    x_tr, x_va = x[:n_train], x[n_train:total]
    mean, std = x_tr.mean(), x_tr.std()
    standardize = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return standardize(x_tr), y[:n_train].astype(np.int32), standardize(x_va), y[n_train:total].astype(np.int32)


def _load_digits(spec, *, seed, train_size, val_size, options):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    frac = _fraction(options.pop("val_fraction", 0.2), "val_fraction")
    x_tr, y_tr, x_va, y_va = _split(x, y, frac, seed)
    return x_tr, y_tr, x_va, y_va, 10


def _load_synthetic(spec, *, seed, train_size, val_size, options):
    shape = options.pop("shape", None)
    suffix = spec.split(":", 1)[1] if ":" in spec else None
    if shape is None:
        shape = suffix or (32, 32, 3)
    shape = _parse_shape(shape, spec)
    classes = options.pop("num_classes", 10)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise UsageError(f"synthetic num_classes must be an integer >= 2, got {classes!r}")
    n_train = train_size or SYNTHETIC_DEFAULT_SIZES[0]
    n_val = val_size or SYNTHETIC_DEFAULT_SIZES[1]
    need, have = (n_train + n_val) * math.prod(shape) * 4, physical_memory()
    if have and need > have:
        raise UsageError(f"dataset {spec!r} needs {n_train + n_val} examples x {math.prod(shape):,} "
                         f"float32 values = {need / 2**30:,.1f} GiB, more than this machine's "
                         f"{have / 2**30:,.1f} GiB of memory; use a smaller shape or --train-size/--val-size")
    rng = np.random.default_rng([seed, 0x5EED])
    make = lambda n: (rng.random((n, *shape), dtype=np.float32),  # noqa: E731
                      rng.integers(0, classes, n, dtype=np.int32))
    (x_tr, y_tr), (x_va, y_va) = make(n_train), make(n_val)
    return x_tr, y_tr, x_va, y_va, classes


# ------------------------------------------------------------------ file formats

def _load_keras(spec, *, seed, train_size, val_size, options):
    import keras

    kwargs = {}
    if spec == "cifar100":
        kwargs["label_mode"] = options.pop("label_mode", "fine")
    try:
        (x_tr, y_tr), (x_va, y_va) = getattr(keras.datasets, spec).load_data(**kwargs)
    except Exception as exc:  # URLError, OSError, bad hash, truncated archive ...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise UsageError(
            f"could not load keras dataset {spec!r} ({reason}); without internet, run the same "
            f"command once on a connected machine and copy its ~/.keras/datasets/ (or "
            f"$KERAS_HOME/datasets/) here, or pass a .npz with x_train, y_train, x_test, y_test"
        ) from None
    classes = {"fine": 100, "coarse": 20}.get(kwargs.get("label_mode"), 10)
    return _as_images(x_tr), y_tr, _as_images(x_va), y_va, classes


def _as_images(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32) / 255.0
    return x[..., None] if x.ndim == 3 else x


NPZ_EXPECTED = "an .npz archive with x_train, y_train, x_test, y_test (as numpy.savez writes)"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


def _check_npz_magic(spec: str, path: Path) -> None:
    """UsageError saying what the file is unless it starts like a zip archive.

    np.load picks the format from the first bytes, so a renamed .npy comes back as one array
    (no context manager) and anything else as a pickle it refuses with advice to unpickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UsageError(f"cannot read {spec!r} ({e.strerror or e})") from None
    if head.startswith(_ZIP_MAGIC):
        return
    if head.startswith(b"\x93NUMPY"):
        what = "a single .npy array (numpy.save), not an .npz archive"
    elif not head:
        what = "an empty file, not an .npz archive"
    else:
        what = f"not an .npz archive (it starts with bytes {head[:4].hex(' ')}, not a zip header)"
    raise UsageError(f"{spec!r} is {what}; expected {NPZ_EXPECTED}")


def _load_npz(spec, *, seed, train_size, val_size, options):
    path = Path(spec).expanduser()
    _check_npz_magic(spec, path)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            val_keys = ("x_test", "y_test") if {"x_test", "y_test"} <= keys else ("x_val", "y_val")
            wanted = ("x_train", "y_train") + val_keys
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise UsageError(f"{spec!r} lacks array(s) {', '.join(missing)}; expected x_train, "
                                 f"y_train, x_test, y_test, found {', '.join(sorted(keys)) or 'none'}")
            arrays = [f[k] for k in wanted]
            bad = [k for k, a in zip(wanted, arrays) if not isinstance(a, np.ndarray)]
            if bad:
                raise UsageError(f"{spec!r}: member(s) {', '.join(bad)} are not .npy arrays; an .npz "
                                 "must hold arrays saved by numpy.savez")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read {spec!r} as .npz ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    x_tr, y_tr, x_va, y_va = arrays
    uint8_in_one = (x_tr.dtype == np.uint8) != (x_va.dtype == np.uint8)
    if uint8_in_one or x_tr.dtype.kind != x_va.dtype.kind:
        raise UsageError(f"{spec!r}: x_train is {x_tr.dtype} but {wanted[2]} is {x_va.dtype}; give "
                         "both splits in the same dtype and scale (uint8 inputs are divided by 255)")
    if x_tr.dtype == np.uint8:
        x_tr, x_va = x_tr.astype(np.float32) / 255.0, x_va.astype(np.float32) / 255.0
    return x_tr, y_tr, x_va, y_va, None


def _load_image_dir(spec, *, seed, train_size, val_size, options):
    import keras

    size = options.pop("image_size", (32, 32))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise UsageError(f"image_size must be (height, width) positive integers, got {size!r}")
    frac = _fraction(options.pop("val_fraction", 0.2), "val_fraction")
    color_mode = options.pop("color_mode", "rgb")
    try:
        train, val = keras.utils.image_dataset_from_directory(
            spec, labels="inferred", label_mode="int", class_names=_class_dirs(spec),
            color_mode=color_mode, batch_size=None, image_size=size, shuffle=True, seed=seed,
            validation_split=frac, subset="both", verbose=False)
    except Exception as exc:
        raise UsageError(f"cannot read image directory {spec!r} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None

    def to_arrays(ds):
        pairs = list(ds.as_numpy_iterator())
        if not pairs:
            return np.zeros((0, *size, 1 if color_mode == "grayscale" else 3), np.float32), \
                np.zeros((0,), np.int32)
        return (np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0,
                np.asarray([p[1] for p in pairs], np.int32))

    try:
        x_tr, y_tr = to_arrays(train)
        x_va, y_va = to_arrays(val)
    except Exception as exc:  # a file that does not decode: find it and name it
        bad = _first_undecodable(list(train.file_paths) + list(val.file_paths))
        raise UsageError(f"cannot decode image {bad or spec!r} in image directory {spec!r} "
                         f"({type(exc).__name__}); remove or replace it") from None
    return x_tr, y_tr, x_va, y_va, len(train.class_names)


def _class_dirs(spec: str) -> list[str] | None:
    """The class sub-directories of image directory `spec`, as Keras lists them (sorted, not
    hidden) but without distbatch run directories (those holding the .distbatch-run marker):
    an --out inside the dataset would otherwise become an extra, empty class.
    None (Keras lists them itself) when the directory cannot be listed here."""
    from distbatch.outdir import MARKER
    try:
        names = sorted(os.listdir(spec))
    except OSError:
        return None
    return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(spec, n))
            and not os.path.exists(os.path.join(spec, n, MARKER))]


def _first_undecodable(paths: list[str]) -> str | None:
    import tensorflow as tf
    for path in sorted(paths):
        try:
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except Exception:  # noqa: BLE001 - any failure to decode is the answer
            return path
    return None


def _load_tfrecord(spec, *, seed, train_size, val_size, options):
    shape = options.pop("shape", None)
    x_key, y_key = options.pop("x_key", "x"), options.pop("y_key", "y")
    val_path = options.pop("val_path", None)
    frac = _fraction(options.pop("val_fraction", 0.2), "val_fraction")
    x, y = _read_tfrecords(_expand(spec), shape, x_key, y_key, spec)
    if val_path is None:
        x_tr, y_tr, x_va, y_va = _split(x, y, frac, seed)
    else:
        x_tr, y_tr = x, y
        x_va, y_va = _read_tfrecords(_expand(str(val_path)), shape, x_key, y_key, str(val_path))
    return x_tr, y_tr, x_va, y_va, None


def _expand(pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise UsageError(f"dataset path not found: no TFRecord file matches {pattern!r}")
    return files


def _read_tfrecords(files, shape, x_key, y_key, spec):
    import tensorflow as tf

    features = {x_key: tf.io.VarLenFeature(tf.float32), y_key: tf.io.VarLenFeature(tf.int64),
                "shape": tf.io.VarLenFeature(tf.int64)}
    xs, ys, shapes = [], [], set()
    try:
        for batch in tf.data.TFRecordDataset(files).batch(4096):
            parsed = tf.io.parse_example(batch, features)
            n = int(batch.shape[0])
            for key, sp in ((x_key, parsed[x_key]), (y_key, parsed[y_key])):
                lengths = np.bincount(sp.indices[:, 0].numpy(), minlength=n)
                if lengths.min() != lengths.max() or lengths.min() == 0 or (key == y_key and lengths.max() != 1):
                    raise UsageError(f"TFRecords {spec!r}: feature {key!r} has per-record lengths "
                                     f"{sorted(set(lengths.tolist()))[:5]}; expected one fixed length"
                                     f"{' of 1' if key == y_key else ' > 0'} in every record")
            xs.append(tf.sparse.to_dense(parsed[x_key]).numpy())
            ys.append(tf.sparse.to_dense(parsed[y_key]).numpy()[:, 0])
            shape_sp = parsed["shape"]
            if shape_sp.values.shape[0]:
                shapes.add(tuple(tf.sparse.to_dense(shape_sp).numpy()[0].tolist()))
    except UsageError:
        raise
    except Exception as exc:  # DataLossError (corrupt), InvalidArgumentError (wrong types)
        from distbatch.data.files import tf_reason, unreadable
        if type(exc).__name__ == "DataLossError":  # name the file, not TensorFlow's blob
            raise unreadable(exc, files, spec, records=None) from None
        raise UsageError(f"cannot read TFRecords {spec!r} ({type(exc).__name__}: {tf_reason(exc)})") from None
    # TensorFlow reads a file cut inside a record's 12-byte header as if it ended before it
    for path in files:
        _check_tfrecord_framing(path)
    if not xs:
        raise UsageError(f"TFRecords {spec!r} contain no records")
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    if shape is None and len(shapes) > 1:
        raise UsageError(f"TFRecords {spec!r}: records disagree on 'shape': {sorted(shapes)[:3]}")
    target = _parse_shape(shape, spec) if shape is not None else (shapes.pop() if shapes else (x.shape[1],))
    if any(d < 1 for d in target):
        raise UsageError(f"TFRecords {spec!r}: the 'shape' feature {list(target)} has dimensions < 1; "
                         "expected positive integers like [28, 28, 1]")
    if int(np.prod(target)) != x.shape[1]:
        raise UsageError(f"TFRecords {spec!r}: shape {tuple(target)} needs {int(np.prod(target))} "
                         f"values per record, got {x.shape[1]}")
    return x.reshape((-1, *target)), y


def _check_tfrecord_framing(path: str) -> None:
    """UsageError naming `path` unless its record frames (8-byte length, 4-byte CRC, data,
    4-byte CRC) end exactly at the end of the file; seeks over the data."""
    size, offset, number = os.path.getsize(path), 0, 0
    with open(path, "rb") as f:
        while offset < size:
            number += 1
            header = f.read(12)
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else 0
            end = offset + 12 + length + 4
            if len(header) < 12 or end > size:
                raise UsageError(f"TFRecord file {path!r} is truncated or corrupt: record {number} "
                                 f"at byte {offset} runs past the end of the file ({size} bytes)")
            offset = f.seek(end)


# ------------------------------------------------------------------- helpers

def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a HOME we may not read: no cache
        return False


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _parse_shape(shape, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape.lower().split("x")) if isinstance(shape, str) \
            else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"shape for {spec!r} must be positive integers like 32x32x3, got {shape!r}")
    return dims


def _fraction(value, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UsageError(f"{label} must be a number in (0, 1), got {value!r}")
    return float(value)


def _split(x, y, val_fraction: float, seed: int):
    """Seeded shuffle, then the last ``round(n * val_fraction)`` examples are validation."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(order) * val_fraction))
    tr, va = order[: len(order) - n_val], order[len(order) - n_val:]
    return x[tr], y[tr], x[va], y[va]


def _subset(x, y, size, rng, label, display):
    if size is None or np.ndim(x) == 0 or np.ndim(y) == 0:
        return x, y  # _validated reports a 0-d array (len() of it is a TypeError)
    if size == len(x):
        return x, y
    if size > len(x):
        raise UsageError(f"{label}={size} exceeds the {len(x)} examples of dataset {display!r}")
    if len(x) != len(y):
        return x, y  # _validated reports the mismatch with both lengths
    idx = np.sort(rng.choice(len(x), size, replace=False))
    return x[idx], y[idx]


def _validated(name, x_tr, y_tr, x_va, y_va, num_classes) -> ArrayDataset:
    """Check shapes, labels and values; return float32 x and int32 y."""
    arrays = {}
    for split, x, y in (("train", x_tr, y_tr), ("val", x_va, y_va)):
        x, y = np.asarray(x), np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if x.ndim < 2:
            raise UsageError(f"{name}: x_{split} must have shape (n, ...), got {x.shape}")
        if y.ndim != 1:
            raise UsageError(f"{name}: y_{split} must be class indices of shape (n,), got {y.shape}")
        if len(x) != len(y):
            raise UsageError(f"{name}: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise UsageError(f"{name}: the {split} set is empty")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise UsageError(f"{name}: x_{split} must be numeric, got dtype {x.dtype}")
        x = _as_float32(x, f"{name}: x_{split}")
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)) \
                and np.abs(y).max(initial=0) < 2**53:  # beyond, the int64 cast would warn (and lie)
            y = y.astype(np.int64)
        if not np.issubdtype(y.dtype, np.integer):
            raise UsageError(f"{name}: y_{split} must hold integer class labels, got dtype {y.dtype}")
        arrays[split] = (x, y)
    (x_tr, y_tr), (x_va, y_va) = arrays["train"], arrays["val"]
    if x_tr.shape[1:] != x_va.shape[1:]:
        raise UsageError(f"{name}: train inputs have shape {x_tr.shape[1:]} but val inputs {x_va.shape[1:]}")
    peaks = float(np.abs(x_tr).max()), float(np.abs(x_va).max())
    if min(peaks) > 0 and max(peaks) / min(peaks) > SCALE_RATIO_LIMIT:
        raise UsageError(f"{name}: train inputs reach {peaks[0]:.4g} but val inputs {peaks[1]:.4g} "
                         f"(a factor over {SCALE_RATIO_LIMIT}); give both splits in the same scale")
    inferred = num_classes is None
    if inferred:
        num_classes = int(max(y_tr.max(), y_va.max())) + 1
        if num_classes < 2:  # all labels <= 0: "num_classes ... got -4" would not say why
            low = int(min(y_tr.min(), y_va.min()))
            raise UsageError(f"{name}: the labels span [{low}, {num_classes - 1}]; expected class "
                             "indices 0..K-1 (>= 0) with at least 2 classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UsageError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")
    for split, y in (("train", y_tr), ("val", y_va)):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise UsageError(f"{name}: y_{split} labels span [{low}, {high}], "
                             f"expected values in [0, {int(num_classes)})")
    if inferred:
        present = len(np.union1d(y_tr, y_va))
        if 2 * present < num_classes:
            raise UsageError(f"{name}: labels go up to {num_classes - 1} but only {present} distinct "
                             f"values occur; expected class indices 0..K-1 (pass --num-classes "
                             f"{num_classes} to insist on {num_classes} classes)")
    return ArrayDataset(name, x_tr, y_tr.astype(np.int32), x_va, y_va.astype(np.int32), int(num_classes))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    """x as float32, or UsageError naming `what`. Cast silently, complex inputs would lose their
    imaginary part (a ComplexWarning, then training on the real part) and float64 values beyond
    float32's range would become inf (a RuntimeWarning before the error)."""
    if np.iscomplexobj(x):
        raise UsageError(f"{what} has complex dtype {x.dtype}; expected real numbers "
                         "(integers, floats or booleans)")
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32, copy=False)
    finite = np.isfinite(x32)
    if finite.all():
        return x32
    too_big = np.isfinite(x) & ~finite  # finite before the cast, inf after
    if too_big.any():
        raise UsageError(f"{what} has {int(too_big.sum())} value(s) beyond float32's range (largest "
                         f"|x| {float(np.abs(x[too_big]).max()):.4g}); expected values within "
                         f"+-{FLOAT32_MAX:.4g} (inputs are trained as float32)")
    raise UsageError(f"{what} has {int(finite.size - finite.sum())} NaN/inf value(s)")


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that a reader sees the old file or the whole new one, never half."""
    atomic_write(path, lambda f: np.savez(f, **arrays))
