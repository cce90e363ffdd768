"""What the training loop calls besides the step: the callbacks, the run's built-in ones
(training/run_callbacks.py: TensorBoard, target, progress, early stopping, checkpoints) and the
users' Keras callbacks, through one dispatcher; and the check that every rank still holds the
same weights.

The users' Keras callbacks run on the chief only, with global metrics. Whatever they change there
(weights restored by EarlyStopping(restore_best_weights=True), the learning rate set by
ReduceLROnPlateau or LearningRateScheduler, model.stop_training) is copied to every rank
before the next step, so ranks never drift apart: measured before this, ReduceLROnPlateau
under Horovod halved rank 0's learning rate only (0.0125 against 0.1 after 4 epochs).
"""
from __future__ import annotations

import math
import zlib

import keras
import numpy as np

from distbatch.errors import RanksDriftedError


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
    """The run's callbacks (keras.callbacks.Callback protocol), called with GLOBAL metrics:
    on_train_begin/end, on_epoch_begin/end at every evaluation (the epoch index counts
    evaluations), on_train_batch_end at every log window after the call that ran it.

    Three lists, in this order at every point:
      builtins  distbatch's own (TensorBoard, target, progress, early stopping): every rank,
                distbatch's names in the logs (step, epoch, train_loss, val_loss, learning_rate)
      users     the users' callbacks: the chief only, Keras's names (loss, <metric>, val_loss,
                val_<metric>, lr)
      after     the checkpoint: every rank, after the others changed what they change
    After the chief's callbacks ran, every rank takes the chief's model.stop_training and
    learning rate (one collective per call, with the stop flag), and after on_epoch_end and
    on_train_end also its weights."""

    def __init__(self, callbacks: list, model, backend, options, plan, optimizer=None, *,
                 builtins=(), after=(), builtins_may_stop: bool = False) -> None:
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
        self.builtins, self.after = BuiltinCallbacks(builtins, model), BuiltinCallbacks(after, model)
        # Per log window: only when some callback acts there.
        self.builtin_batches = any(getattr(cb, "acts_per_batch", False) for cb in builtins)
        self.wants_batches = self.active or self.builtin_batches
        # A built-in that may stop the run (early stopping, the target): the ranks then agree
        # once per evaluation (every rank decides alike on global metrics; the OR guarantees it).
        self.builtins_may_stop = builtins_may_stop
        model.stop_training = False

    def train_begin(self, epoch: int) -> None:
        self.builtins.on_train_begin()
        if self.list is not None:
            self.list.on_train_begin()
            self.list.on_epoch_begin(epoch)
        self.after.on_train_begin()
        if self.active:
            self._share(weights=False)

    def epoch_begin(self, epoch: int) -> None:
        self.builtins.on_epoch_begin(epoch)
        if self.list is not None:
            self.list.on_epoch_begin(epoch)
        if self.active:
            self._share(weights=False)

    def batch_end(self, step: int, logs: dict) -> None:
        if self.builtin_batches:
            self.builtins.on_train_batch_end(step - 1, logs)
        if self.list is not None:
            self.list.on_train_batch_end(step - 1, _keras_logs(logs))

    def epoch_end(self, epoch: int, record: dict) -> bool:
        """on_epoch_end of the built-ins and the users' callbacks; True if one stopped the run
        (the same answer on every rank)."""
        self.builtins.on_epoch_end(epoch, record)
        if self.list is not None:
            self.list.on_epoch_end(epoch, _keras_logs(record))
        stop = self._share(weights=True) if self.active else bool(self.model.stop_training)
        if self.builtins_may_stop and self.backend.num_workers > 1:
            stop = self.backend.sync_flag(stop)
        self.model.stop_training = stop
        return stop

    def after_epoch_end(self, epoch: int, record: dict) -> None:
        """The checkpoint's on_epoch_end, once the stop decision is in the loop's state."""
        self.after.on_epoch_end(epoch, record)

    def sync_stop(self) -> bool:
        """After a call's on_train_batch_end: the chief's stop flag and learning rate on every
        rank (one collective); True if the chief's callbacks stopped the run."""
        return self._share(weights=False)

    def builtins_train_end(self) -> None:
        """The built-ins' on_train_end (early stopping's best weights go back), before the
        run's final metrics are measured on those weights."""
        self.builtins.on_train_end()

    def train_end(self, metrics: dict) -> None:
        if self.list is not None:
            self.list.on_train_end(_keras_logs(metrics))
        if self.active:
            self._share(weights=True)
        self.after.on_train_end()

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


class BuiltinCallbacks:
    """The built-in callbacks, called in order with the loop's own logs as they are (Keras's
    CallbackList would turn every value into a float and sort the keys)."""

    def __init__(self, callbacks, model) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            cb.set_model(model)

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: [getattr(cb, name)(*args) for cb in self.callbacks]


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
