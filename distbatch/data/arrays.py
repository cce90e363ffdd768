"""The in-memory dataset (ArrayDataset) and the checks every array source passes: shapes,
label range and class count, values (finite, within float32), the scale of the two splits;
plus the seeded split and subset helpers the loaders share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distbatch.errors import ParameterError, UsageError

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


def parse_shape(shape, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape.lower().split("x")) if isinstance(shape, str) \
            else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"shape for {spec!r} must be positive integers like 32x32x3, got {shape!r}")
    return dims


def check_fraction(value, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UsageError(f"{label} must be a number in (0, 1), got {value!r}")
    return float(value)


def seeded_split(x, y, val_fraction: float, seed: int):
    """Seeded shuffle, then the last ``round(n * val_fraction)`` examples are validation."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(order) * val_fraction))
    tr, va = order[: len(order) - n_val], order[len(order) - n_val:]
    return x[tr], y[tr], x[va], y[va]


def subset(x, y, size, rng, label, display):
    if size is None or np.ndim(x) == 0 or np.ndim(y) == 0:
        return x, y  # validated_dataset reports a 0-d array (len() of it is a TypeError)
    if size == len(x):
        return x, y
    if size > len(x):
        raise UsageError(f"{label}={size} exceeds the {len(x)} examples of dataset {display!r}")
    if len(x) != len(y):
        return x, y  # validated_dataset reports the mismatch with both lengths
    idx = np.sort(rng.choice(len(x), size, replace=False))
    return x[idx], y[idx]


def validated_dataset(name, x_tr, y_tr, x_va, y_va, num_classes) -> ArrayDataset:
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
            raise ParameterError(f"{name}: labels go up to {num_classes - 1} but only {present} "
                                 f"distinct values occur; expected class indices 0..K-1 (pass "
                                 f"{{num_classes}} {num_classes} to insist on {num_classes} classes)",
                                 "num_classes")
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
