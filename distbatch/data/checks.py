"""What distbatch.fit checks in the user's data and model before any step runs.

A mistake here would otherwise surface from inside the compiled step as a TensorFlow
"in user code" error (labels outside the classes, one-hot labels with the sparse default
loss, a batched dataset, unknown shapes) or not at all (regression targets cast to class 0,
NaN ending the run as "diverged", negative sample weights). Every check raises ValueError or
TypeError naming the parameter (`data`, `validation_data`, `model_fn`, `loss`), the value
found and what was expected.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def check_arrays(name: str, x_leaves: list, y_leaves: list, sample_weight) -> None:
    """NumPy inputs: numeric, at least 1-d, finite; sample weights >= 0."""
    for part, leaves in (("x", x_leaves), ("y", y_leaves)):
        for a in leaves:
            a = np.asarray(a)
            if a.ndim == 0:
                raise ValueError(f"{name}: {part} is a 0-d array (a single value); expected one "
                                 f"entry per example along the first axis")
            if np.iscomplexobj(a):
                raise TypeError(f"{name}: {part} holds complex numbers ({a.dtype}); expected "
                                f"real numbers")
            if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
                raise TypeError(f"{name}: {part} has dtype {a.dtype}; expected numbers")
            if np.issubdtype(a.dtype, np.floating):
                bad = ~np.isfinite(a)
                if bad.any():
                    i = int(np.argwhere(bad)[0][0])
                    raise ValueError(f"{name}: {part} holds NaN or infinite values (the first in "
                                     f"example {i}); clean or drop those examples")
    if sample_weight is not None:
        w = np.asarray(sample_weight)
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            i = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name}: sample_weight must be finite and >= 0, got {w[i]} for "
                             f"example {i}")


def check_element_spec(name: str, spec) -> None:
    """A tf.data dataset of single examples with known ranks."""
    for part, nest in (("x", spec[0]), ("y", spec[1])):
        for s in tf.nest.flatten(nest):
            if s.shape.rank is None:
                raise ValueError(
                    f"{name}: the dataset's {part} has unknown shape ({s.shape}); give the shapes, "
                    f"e.g. tf.data.Dataset.from_generator(gen, output_signature=(tf.TensorSpec("
                    f"shape=(8,), dtype=tf.float32), tf.TensorSpec(shape=(), dtype=tf.int64)))")


def batched_in(ds) -> int | None:
    """The batch size of a .batch()/.padded_batch() anywhere in the dataset's chain (after it,
    elements are batches, not examples), else None."""
    seen = 0
    while ds is not None and seen < 100:
        kind = type(ds).__name__
        if kind in ("_UnbatchDataset", "_RebatchDataset"):
            return None
        if kind in ("_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset"):
            size = getattr(ds, "_batch_size", None)
            try:
                return int(size.numpy()) if size is not None else -1
            except (AttributeError, TypeError, ValueError):
                return -1
        ds = getattr(ds, "_input_dataset", None)
        seen += 1
    return None


def check_classification(name: str, labels: np.ndarray | None, y_shape: tuple, out_shape: tuple,
                         ) -> None:
    """The default loss (sparse categorical cross-entropy from logits): the model outputs
    (batch, classes) logits and y holds class indices 0..classes-1, one per example.

    labels: every label (or None when not cheaply known); y_shape / out_shape: one example's
    target shape and the model's output shape, both with the batch axis."""
    if len(out_shape) != 2:
        raise ValueError(
            f"model_fn: the model's output has shape {tuple(out_shape)[1:]} per example, but the "
            f"default loss (sparse categorical cross-entropy) needs one vector of class logits "
            f"per example; pass loss= for this output")
    classes = int(out_shape[-1])
    per_example = tuple(y_shape[1:])
    if per_example not in ((), (1,)):
        hint = (" (one-hot labels: pass loss=keras.losses.CategoricalCrossentropy(from_logits=True)"
                ", or give class indices)" if per_example == (classes,) else "")
        raise ValueError(f"{name}: y has shape {per_example} per example, but the default loss "
                         f"takes one class index per example{hint}")
    if labels is None:
        return
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return
    if np.issubdtype(labels.dtype, np.floating):
        frac = labels[np.mod(labels, 1) != 0]
        if frac.size:
            raise ValueError(f"{name}: y holds non-integer values (e.g. {frac[0]}), but the default "
                             f"loss takes class indices; for regression pass loss= (e.g. 'mse') "
                             f"and metrics=")
    low, high = labels.min(), labels.max()
    if low < 0 or high >= classes:
        raise ValueError(f"{name}: labels must be class indices in [0, {classes - 1}] for a model "
                         f"with {classes} outputs, got labels from {low:g} to {high:g}")


def dataset_labels(ds, max_examples: int = 1_000_000) -> np.ndarray | None:
    """Every label of a dataset of single (x, y[, w]) examples with one numeric y, read in one
    pass (None for several outputs or a large dataset)."""
    if len(tf.nest.flatten(ds.element_spec[1])) != 1:
        return None
    n = int(ds.cardinality())
    if n < 0 or n > max_examples:
        return None
    ys = ds.map(lambda *e: tf.reshape(e[1], [-1])).batch(65536)
    return np.concatenate([b.numpy() for b in ys]) if n else np.zeros(0)


def check_same_shapes(name: str, train_example, other_example) -> None:
    """Validation examples have the training examples' shapes (batch axis aside)."""
    for part, a, b in (("x", train_example[0], other_example[0]),
                       ("y", train_example[1], other_example[1])):
        fa, fb = tf.nest.flatten(a), tf.nest.flatten(b)
        if len(fa) != len(fb):
            raise ValueError(f"{name}: {part} has {len(fb)} arrays, data has {len(fa)}")
        for ta, tb in zip(fa, fb):
            sa, sb = tuple(np.shape(ta))[1:], tuple(np.shape(tb))[1:]
            if sa != sb:
                raise ValueError(f"{name}: {part} has shape {sb} per example, but data has {sa}")
