"""The task: which loss the step minimises and which metrics it reports, for any Keras
loss and metrics, single- or multi-output.

Loss. distbatch needs PER-EXAMPLE losses (it divides their sum by the GLOBAL batch,
tf.nn.compute_average_loss), so a Keras loss object is called through its unreduced
`Loss.call` whatever its `reduction`; a name goes through keras.losses.get; a plain
function must return per-example values (extra axes are averaged). A multi-output
model takes one loss for every output or a list/dict matching the outputs; the
per-example losses of the outputs are summed. Sample weights multiply them.

Metrics are aggregated EXACTLY across replicas and workers: each replica computes its
metrics' state update from zero state on its batch (Keras's stateless_update_state),
the updates ride in the gradients' all-reduce as one flat float32 vector, and the host
adds them into the metric's state, so the result is what one device would report for
the whole global batch (states summed, not averages of averages). This holds for every
Keras metric whose state is a sum over examples (Mean-based metrics, accuracies, MAE/MSE,
Precision/Recall/AUC, confusion-matrix metrics...); a metric whose initial state is not
zero is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.compile_utils import get_metric  # private: Keras's own metric-by-name rule


def _flatten_outputs(tf, nest) -> list:
    return tf.nest.flatten(nest)


def _per_example(tf, values):
    """[batch, ...] -> [batch] (mean over the other axes), float32."""
    values = tf.cast(values, tf.float32)
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)
    return values


def _loss_callable(loss) -> Callable:
    """fn(y, y_pred) -> unreduced values, from a Keras loss object, a name or a function."""
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # unreduced, whatever the object's `reduction`
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError:
            fn = None
        if fn is None:
            raise ValueError(f"loss: unknown Keras loss {loss!r}")
        return fn.call if isinstance(fn, keras.losses.Loss) else fn
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a Keras loss object, a loss name or a function "
                    f"(y_true, y_pred) -> per-example losses, got {type(loss).__name__}")


def sparse_ce_from_logits(y, logits):
    """The CLI's default: per-example sparse categorical cross-entropy on float32 logits."""
    return keras.losses.sparse_categorical_crossentropy(y, tf.cast(logits, tf.float32),
                                                        from_logits=True)


def _loss_weights(weights, output_names: list, n_out: int) -> list:
    """One float per output from Keras's loss_weights (None: all 1)."""
    if weights is None:
        return [1.0] * n_out
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(output_names))
        if unknown or len(output_names) != n_out:
            raise ValueError(f"loss_weights: unknown outputs {unknown}; the model's outputs are "
                             f"{output_names}")
        values = [weights.get(n, 1.0) for n in output_names]
    elif isinstance(weights, (list, tuple)):
        if len(weights) != n_out:
            raise ValueError(f"loss_weights: a list needs one number per output ({n_out}), got "
                             f"{len(weights)}")
        values = list(weights)
    else:
        raise TypeError(f"loss_weights must be a list (one number per output) or a dict "
                        f"{{output name: number}}, got {type(weights).__name__}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"loss_weights: each weight must be a finite number >= 0, got {v!r}")
    return [float(v) for v in values]


@dataclass
class _MetricSlot:
    name: str
    metric: Any
    output: int          # index into the flattened outputs / targets
    sizes: list          # flattened sizes of the metric's state variables


class Task:
    """Resolved loss and metrics for one model.

    `loss`: a Keras loss object or name, a function, or a list/dict of those (one per output);
    None: sparse categorical cross-entropy from logits (distbatch's classification default).
    `metrics`: Keras metric objects or names (a list, applied to a single output), or a
    dict {output name: [metrics]} / list of lists for several outputs.
    `output_names`: the model's output names (keras.Model.output_names), for dicts and logs.
    `y_example`, `pred_example`: nests of example tensors (shape matters: Keras picks the
    accuracy kind from them) used to resolve metric names like "accuracy".
    `loss_weights`: as Keras compile takes them: a list (one number per output) or a dict
    {output name: number}; the loss is the weighted sum of the outputs' losses.
    """

    def __init__(self, loss=None, metrics=None, *, output_names=None, y_example=None,
                 pred_example=None, loss_weights=None) -> None:
        self.output_names = list(output_names or [])
        preds = _flatten_outputs(tf, pred_example) if pred_example is not None else [None]
        ys = _flatten_outputs(tf, y_example) if y_example is not None else [None] * len(preds)
        n_out = len(preds)
        if len(ys) != n_out:
            raise ValueError(f"the model has {n_out} output(s) but the targets y have {len(ys)}")
        self.n_outputs = n_out
        # Loss per output.
        if loss is None:
            fns = [sparse_ce_from_logits] * n_out
        elif isinstance(loss, dict):
            missing = [n for n in self.output_names if n not in loss]
            if missing or len(loss) != n_out:
                raise ValueError(f"loss: a dict needs one entry per output {self.output_names}, "
                                 f"got keys {sorted(loss)}")
            fns = [_loss_callable(loss[n]) for n in self.output_names]
        elif isinstance(loss, (list, tuple)):
            if len(loss) != n_out:
                raise ValueError(f"loss: a list needs one loss per output ({n_out}), got {len(loss)}")
            fns = [_loss_callable(l) for l in loss]
        else:
            fns = [_loss_callable(loss)] * n_out
        self._loss_fns = fns
        self.loss_config = loss
        self.loss_weights = _loss_weights(loss_weights, self.output_names, n_out)
        # Metrics per output.
        if isinstance(metrics, dict):
            per_output = [list(metrics.get(n, []) or []) for n in self.output_names]
            unknown = sorted(set(metrics) - set(self.output_names))
            if unknown:
                raise ValueError(f"metrics: unknown outputs {unknown}; the model's outputs are "
                                 f"{self.output_names}")
        elif metrics and n_out > 1 and all(isinstance(m, (list, tuple)) for m in metrics):
            if len(metrics) != n_out:
                raise ValueError(f"metrics: a list of lists needs one list per output ({n_out})")
            per_output = [list(m) for m in metrics]
        else:
            if metrics is not None and not isinstance(metrics, (list, tuple)):
                raise TypeError(f"metrics must be a list of Keras metrics or names, got "
                                f"{type(metrics).__name__}")
            per_output = [list(metrics or [])] + [[] for _ in range(n_out - 1)]
            if metrics and n_out > 1:
                raise ValueError("metrics: a model with several outputs needs a dict "
                                 "{output name: [metrics]} or one list per output")
        self.slots: list[_MetricSlot] = []
        for i, items in enumerate(per_output):
            for m in items:
                if isinstance(m, keras.metrics.Metric):
                    metric = m
                elif isinstance(m, str) or callable(m):
                    try:
                        metric = get_metric(m, ys[i] if ys[i] is not None else tf.zeros([1]),
                                            preds[i] if preds[i] is not None else tf.zeros([1, 2]))
                    except ValueError:
                        raise ValueError(f"metrics: unknown Keras metric {m!r}") from None
                else:
                    raise TypeError(f"metrics: expected Keras metric objects or names, got "
                                    f"{type(m).__name__}")
                metric.reset_state()
                if any(np.any(np.asarray(v.numpy()) != 0) for v in metric.variables):
                    raise ValueError(f"metrics: {metric.name} starts from a non-zero state; "
                                     "distbatch sums metric states across replicas")
                name = metric.name if n_out == 1 else f"{self.output_names[i]}_{metric.name}"
                self.slots.append(_MetricSlot(name, metric, i, [int(np.prod(v.shape))
                                                                for v in metric.variables]))
        names = [s.name for s in self.slots]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "loss" in names:
            raise ValueError(f"metrics: duplicate names {dup or ['loss']}; give each metric its own name=")
        self.metric_names = names
        self.state_size = sum(sum(s.sizes) for s in self.slots)
        self.metrics = [s.metric for s in self.slots]

    # -- in the graph ------------------------------------------------------------------
    def per_example_loss(self, y, y_pred):
        """float32 [batch]: the sum over outputs of each output's per-example loss."""
        ys, preds = _flatten_outputs(tf, y), _flatten_outputs(tf, y_pred)
        total = None
        for fn, yt, yp, weight in zip(self._loss_fns, ys, preds, self.loss_weights):
            if yp.dtype in (tf.float16, tf.bfloat16):
                yp = tf.cast(yp, tf.float32)
            value = _per_example(tf, fn(yt, yp))
            if weight != 1.0:
                value = value * weight
            total = value if total is None else total + value
        return total

    def metric_update(self, y, y_pred, sample_weight):
        """float32 [state_size]: every metric's state after one update from zero state."""
        if not self.slots:
            return tf.zeros([0])
        ys, preds = _flatten_outputs(tf, y), _flatten_outputs(tf, y_pred)
        parts = []
        for s in self.slots:
            zeros = [tf.zeros(v.shape, v.dtype) for v in s.metric.variables]
            yp = preds[s.output]
            if yp.dtype in (tf.float16, tf.bfloat16):
                yp = tf.cast(yp, tf.float32)
            new = s.metric.stateless_update_state(zeros, ys[s.output], yp,
                                                  sample_weight=sample_weight)
            parts += [tf.reshape(tf.cast(v, tf.float32), [-1]) for v in new]
        return tf.concat(parts, 0)

    # -- on the host -------------------------------------------------------------------
    def results(self, state: np.ndarray) -> dict:
        """{metric name: result} for a summed flat state (float64 on the host)."""
        out, offset = {}, 0
        for s in self.slots:
            if type(s.metric).result is keras.metrics.Mean.result:
                # Mean and MeanMetricWrapper (accuracies, MAE, ...): total / count, on the host
                # (no eager TensorFlow ops per log window)
                total, count = state[offset], state[offset + 1]
                out[s.name] = float(total / count) if count else 0.0
                offset += 2
                continue
            for v, size in zip(s.metric.variables, s.sizes):
                v.assign(np.asarray(state[offset:offset + size]).reshape(v.shape).astype(v.dtype))
                offset += size
            value = np.asarray(s.metric.result())
            out[s.name] = float(value) if value.ndim == 0 else value.tolist()
        return out
