"""Readers of each dataset source into NumPy arrays (the table of sources is in
distbatch/data/datasets.py): the generated sets (MNIST-1D, digits, synthetic), the Keras
downloads, .npz files, image directories and TFRecord files read whole. Each loader returns
(x_train, y_train, x_val, y_val, num_classes or None); load_dataset checks and subsets them."""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from distbatch import machine
from distbatch.data.arrays import check_fraction, parse_shape, seeded_split
from distbatch.data.tfrecord_io import count_tfrecord_frames, tf_reason, unreadable
from distbatch.errors import ParameterError, UsageError
from distbatch.fileio import atomic_write
from distbatch.outdir import MARKER

KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
BUILTIN_NAMES = ("mnist1d", "digits", "synthetic") + KERAS_DATASETS
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
MNIST1D_DEFAULT_SIZES = (20000, 4000)
SYNTHETIC_DEFAULT_SIZES = (2048, 256)
_MNIST1D_FORMAT = 1  # bump when the generated arrays change, to miss old caches


def cache_dir() -> Path:
    """Where generated datasets are cached: $DISTBATCH_CACHE_DIR or ~/.cache/distbatch/datasets."""
    env = os.environ.get("DISTBATCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "distbatch" / "datasets"


# --------------------------------------------------------------------- routing

LOADER_OPTIONS = {
    "_load_mnist1d": {"cache"},
    "_load_digits": {"val_fraction"},
    "_load_synthetic": {"shape"},
    "_load_keras": {"label_mode"},
    "_load_npz": set(),
    "_load_image_dir": {"image_size", "color_mode", "val_fraction"},
    "_load_tfrecord": {"shape", "x_key", "y_key", "val_path", "val_fraction"},
}


def loader_for(spec: str) -> Callable:
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
    from mnist1d.data import get_dataset_args, make_dataset  # optional: only this dataset needs it

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
    from sklearn.datasets import load_digits  # optional: only this dataset needs it

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    frac = check_fraction(options.pop("val_fraction", 0.2), "val_fraction")
    x_tr, y_tr, x_va, y_va = seeded_split(x, y, frac, seed)
    return x_tr, y_tr, x_va, y_va, 10


def _load_synthetic(spec, *, seed, train_size, val_size, options):
    shape = options.pop("shape", None)
    suffix = spec.split(":", 1)[1] if ":" in spec else None
    if shape is None:
        shape = suffix or (32, 32, 3)
    shape = parse_shape(shape, spec)
    classes = options.pop("num_classes", 10)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise UsageError(f"synthetic num_classes must be an integer >= 2, got {classes!r}")
    n_train = train_size or SYNTHETIC_DEFAULT_SIZES[0]
    n_val = val_size or SYNTHETIC_DEFAULT_SIZES[1]
    need, have = (n_train + n_val) * math.prod(shape) * 4, machine.physical_memory()
    if have and need > have:
        raise ParameterError(f"dataset {spec!r} needs {n_train + n_val} examples x "
                             f"{math.prod(shape):,} float32 values = {need / 2**30:,.1f} GiB, more "
                             f"than this machine's {have / 2**30:,.1f} GiB of memory; use a smaller "
                             "shape or {train_size}/{val_size}", "train_size", "val_size")
    rng = np.random.default_rng([seed, 0x5EED])
    make = lambda n: (rng.random((n, *shape), dtype=np.float32),  # noqa: E731
                      rng.integers(0, classes, n, dtype=np.int32))
    (x_tr, y_tr), (x_va, y_va) = make(n_train), make(n_val)
    return x_tr, y_tr, x_va, y_va, classes


# ------------------------------------------------------------------ file formats

def _load_keras(spec, *, seed, train_size, val_size, options):

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

    size = options.pop("image_size", (32, 32))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise UsageError(f"image_size must be (height, width) positive integers, got {size!r}")
    frac = check_fraction(options.pop("val_fraction", 0.2), "val_fraction")
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
    a run's output directory inside the dataset would otherwise become an extra, empty class.
    None (Keras lists them itself) when the directory cannot be listed here."""
    try:
        names = sorted(os.listdir(spec))
    except OSError:
        return None
    return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(spec, n))
            and not os.path.exists(os.path.join(spec, n, MARKER))]


def _first_undecodable(paths: list[str]) -> str | None:
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
    frac = check_fraction(options.pop("val_fraction", 0.2), "val_fraction")
    x, y = _read_tfrecords(_expand(spec), shape, x_key, y_key, spec)
    if val_path is None:
        x_tr, y_tr, x_va, y_va = seeded_split(x, y, frac, seed)
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
        if type(exc).__name__ == "DataLossError":  # name the file, not TensorFlow's blob
            raise unreadable(exc, files, spec, records=None) from None
        raise UsageError(f"cannot read TFRecords {spec!r} ({type(exc).__name__}: {tf_reason(exc)})") from None
    # TensorFlow reads a file cut inside a record's 12-byte header as if it ended before it
    for path in files:
        count_tfrecord_frames(path)  # UsageError naming the file unless its frames end at its end
    if not xs:
        raise UsageError(f"TFRecords {spec!r} contain no records")
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    if shape is None and len(shapes) > 1:
        raise UsageError(f"TFRecords {spec!r}: records disagree on 'shape': {sorted(shapes)[:3]}")
    target = parse_shape(shape, spec) if shape is not None else (shapes.pop() if shapes else (x.shape[1],))
    if any(d < 1 for d in target):
        raise UsageError(f"TFRecords {spec!r}: the 'shape' feature {list(target)} has dimensions < 1; "
                         "expected positive integers like [28, 28, 1]")
    if int(np.prod(target)) != x.shape[1]:
        raise UsageError(f"TFRecords {spec!r}: shape {tuple(target)} needs {int(np.prod(target))} "
                         f"values per record, got {x.shape[1]}")
    return x.reshape((-1, *target)), y


# ------------------------------------------------------------------- helpers

def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a HOME we may not read: no cache
        return False


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that a reader sees the old file or the whole new one, never half."""
    atomic_write(path, lambda f: np.savez(f, **arrays))
