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

import hashlib
import os
from typing import Any

import numpy as np

# The readers of each source (loaders.py) and the checks of the arrays (arrays.py) live in
# their own modules; their public names stay importable from here.
from distbatch.data.arrays import (  # noqa: F401
    FLOAT32_MAX, SCALE_RATIO_LIMIT, ArrayDataset, subset, validated_dataset)
from distbatch.data.loaders import (  # noqa: F401
    BUILTIN_NAMES, KERAS_DATASETS, LOADER_OPTIONS, MNIST1D_DEFAULT_SIZES, NPZ_EXPECTED,
    SYNTHETIC_DEFAULT_SIZES, TFRECORD_SUFFIXES, cache_dir, loader_for)
from distbatch.errors import UsageError
from distbatch.machine import physical_memory  # noqa: F401 (importable from here too)


def streams_from_files(spec: str) -> bool:
    """True for a TFRecord path or glob (the CLI streams those with distbatch.data.files)."""
    spec = str(spec).strip()
    return any(ch in spec for ch in "*?[") or spec.endswith(TFRECORD_SUFFIXES)


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
    loader = loader_for(spec)
    allowed = LOADER_OPTIONS[loader.__name__] | {"num_classes"}
    unknown = sorted(set(options) - allowed)
    if unknown:  # checked before loading: generating or reading data first would waste minutes
        raise UsageError(f"unknown option(s) {', '.join(unknown)} for dataset {spec!r}; "
                         f"expected some of {', '.join(sorted(allowed))}")
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_va, y_va, inferred = loader(spec, seed=seed, train_size=train_size,
                                              val_size=val_size, options=options)
    num_classes = options.pop("num_classes", inferred)
    x_tr, y_tr = subset(x_tr, y_tr, train_size, rng, "train_size", spec)
    x_va, y_va = subset(x_va, y_va, val_size, rng, "val_size", spec)
    return validated_dataset(spec, x_tr, y_tr, x_va, y_va, num_classes)


FINGERPRINT_SAMPLE = 64  # examples of each split hashed by fingerprint()


def fingerprint_indices(n: int) -> np.ndarray:
    """The FINGERPRINT_SAMPLE evenly spaced indices (fewer if n is smaller) of n examples that
    a fingerprint hashes."""
    return np.unique(np.linspace(0, max(n - 1, 0), min(n, FINGERPRINT_SAMPLE)).astype(np.int64))


def fingerprint(data) -> dict | None:
    """What identifies the data of a run read from files, for a resumed run: the example counts
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
            pick = fingerprint_indices(len(x))
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
