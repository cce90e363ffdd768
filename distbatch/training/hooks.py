"""What the training loop calls besides the step: TensorBoard scalars, the users' Keras
callbacks, and the check that every rank still holds the same weights.

Keras callbacks run on the chief only, with global metrics. Whatever they change there
(weights restored by EarlyStopping(restore_best_weights=True), the learning rate set by
ReduceLROnPlateau or LearningRateScheduler, model.stop_training) is copied to every rank
before the next step, so ranks never drift apart: measured before this, ReduceLROnPlateau
under Horovod halved rank 0's learning rate only (0.0125 against 0.1 after 4 epochs).
"""
from __future__ import annotations

import math
import os
import zlib

import keras
import numpy as np
import tensorflow as tf

from distbatch.errors import RanksDriftedError


class TensorBoardHook:
    """distbatch's own TensorBoard points (chief only): train scalars per log window, val at
    evaluations, with the global step numbers."""

    def __init__(self, directory: str | None) -> None:
        self.writers = {}
        if directory:
            self.writers = {k: tf.summary.create_file_writer(os.path.join(directory, k))
                            for k in ("train", "val")}
        self.active = bool(self.writers)

    def scalars(self, kind: str, step: int, scalars: dict) -> None:
        if kind not in self.writers:
            return
        with self.writers[kind].as_default(step=step):
            for name, value in scalars.items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(name, value)

    def close(self) -> None:
        for w in self.writers.values():
            w.flush()


def learning_rate_variable(optimizer):
    """The optimizer's learning-rate variable, or None when it follows a schedule (a pure
    function of the step, the same on every rank). Wrappers (LossScaleOptimizer, AdaScale)
    delegate to their inner optimizer."""
    while optimizer is not None:
        lr = getattr(optimizer, "_learning_rate", None)
        if isinstance(lr, keras.Variable):
            return lr
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


class CallbackHooks:
    """Keras callbacks (keras.callbacks.Callback protocol), called on the chief with GLOBAL
    metrics: on_train_begin/end, on_epoch_begin/end at every evaluation (the epoch index
    counts evaluations; logs loss, <metric>, val_loss, val_<metric>, lr), on_train_batch_end
    at every log window (logs: the window's means) after the call that ran it.

    After the chief's callbacks ran, every rank takes the chief's model.stop_training and
    learning rate (one collective per call, with the stop flag), and after on_epoch_end and
    on_train_end also its weights."""

    def __init__(self, callbacks: list, model, backend, options, plan, optimizer=None) -> None:
        self.active = bool(callbacks)
        self.backend, self.model = backend, model
        self.lr = learning_rate_variable(optimizer)
        self.list = None
        if self.active and backend.is_chief:
            self.list = keras.callbacks.CallbackList(
                callbacks, add_history=False, add_progbar=False, model=model, verbose=0,
                epochs=max(1, math.ceil(options.total_steps / max(
                    1, plan.steps_per_epoch // max(1, options.evals_per_epoch)))),
                steps=plan.steps_per_epoch)
        model.stop_training = False

    def train_begin(self, epoch: int) -> None:
        if self.list is not None:
            self.list.on_train_begin()
            self.list.on_epoch_begin(epoch)
        if self.active:
            self._share(weights=False)

    def epoch_begin(self, epoch: int) -> None:
        if self.list is not None:
            self.list.on_epoch_begin(epoch)
        if self.active:
            self._share(weights=False)

    def batch_end(self, step: int, logs: dict) -> None:
        if self.list is not None:
            self.list.on_train_batch_end(step - 1, _keras_logs(logs))

    def epoch_end(self, epoch: int, record: dict) -> bool:
        """on_epoch_end with the record's metrics as Keras names; True if a callback stopped."""
        if not self.active:
            return False
        if self.list is not None:
            self.list.on_epoch_end(epoch, _keras_logs(record))
        return self._share(weights=True)

    def sync_stop(self) -> bool:
        """After a call's on_train_batch_end: the chief's stop flag and learning rate on every
        rank (one collective); True if the chief's callbacks stopped the run."""
        return self._share(weights=False)

    def train_end(self, metrics: dict) -> None:
        if self.list is not None:
            self.list.on_train_end(_keras_logs(metrics))
        if self.active:
            self._share(weights=True)

    def _share(self, *, weights: bool) -> bool:
        """Every rank takes the chief's stop flag, learning rate and (`weights`) weights; the
        stop flag comes back."""
        stop = bool(getattr(self.model, "stop_training", False))
        if self.backend.num_workers == 1:
            return stop
        head = np.array([stop, float(self.lr.numpy()) if self.lr is not None else 0.0], np.float64)
        values = self.backend.broadcast_from_chief(
            [head] + (self.model.get_weights() if weights else []))
        stop = bool(values[0][0] > 0.5)
        self.model.stop_training = stop
        if self.lr is not None:
            self.lr.assign(float(values[0][1]))
        if weights:
            self.model.set_weights(values[1:])
        return stop


def weights_checksum(model) -> int:
    """CRC-32 of every weight's bytes (model.weights order): equal on every rank unless they
    drifted apart."""
    crc = 0
    for w in model.get_weights():
        crc = zlib.crc32(np.ascontiguousarray(w).tobytes(), crc)
    return crc


def check_ranks_agree(backend, model, step: int) -> None:
    """Raise RanksDriftedError on every rank when any worker's weights differ from the
    chief's (one small collective: every worker's checksum)."""
    if backend.num_workers == 1:
        return
    sums = backend.gather_from_workers(weights_checksum(model))
    drifted = [w for w, s in enumerate(sums) if s != sums[0]]
    if drifted:
        raise RanksDriftedError(
            f"ranks drifted apart: after step {step} the weights of worker(s) "
            f"{', '.join(map(str, drifted))} differ from the chief's; something changed the model "
            f"on some ranks only (a callback or code outside distbatch acting on one rank)")


def _keras_logs(record: dict) -> dict:
    """distbatch's names -> Keras's: train_loss -> loss, val_loss stays, learning_rate -> lr."""
    logs = {}
    for k, v in record.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k in ("step", "epoch"):
            continue
        if k.startswith("train_"):
            k = k[len("train_"):]
        logs["lr" if k == "learning_rate" else k] = float(v)
    return logs
