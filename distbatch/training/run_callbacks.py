"""distbatch's built-in behaviours as Keras callbacks: the same protocol (keras.callbacks.Callback:
on_train_begin, on_epoch_end at every evaluation, on_train_batch_end at every log window,
on_train_end) and the same call points as the users' callbacks (training/hooks.py,
CallbackHooks). They differ from the users' in two ways only: they run on EVERY rank (their
decisions are functions of global, all-reduced values, so every rank takes the same one), and
their logs carry distbatch's names (``step``, ``epoch``, ``train_loss``, ``val_accuracy``,
``learning_rate``...), of which the users' callbacks get the Keras names.

    TensorBoardScalars  train scalars per log window, val scalars per evaluation (chief)
    TargetTracker       steps and training time to the target accuracy; stops at it if asked
    ProgressLine        the chief's line per evaluation
and, in their own modules, the run's one early stopping (training/early_stopping.py:
keras.callbacks.EarlyStopping whose state survives a checkpoint) and its checkpoints
(training/run_checkpoints.py, RunCheckpoint), the latter called after the users' callbacks so
that a checkpoint holds what they changed.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import keras
import tensorflow as tf

from distbatch.training.progress import progress_line


class TensorBoardScalars(keras.callbacks.Callback):
    """distbatch's own TensorBoard points with the global step numbers: the train scalars of
    each log window (on_train_batch_end) and the validation metrics of each evaluation.
    `directory` None (every rank but the chief): writes nothing."""

    def __init__(self, directory: str | None) -> None:
        super().__init__()
        self.writers = {}
        if directory:
            self.writers = {k: tf.summary.create_file_writer(os.path.join(directory, k))
                            for k in ("train", "val")}

    @property
    def acts_per_batch(self) -> bool:
        return bool(self.writers)

    def on_train_batch_end(self, batch, logs=None) -> None:
        if math.isfinite(logs.get("loss", 0.0)):  # the diverged step's NaN is not a point
            self._write("train", batch + 1, logs)

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._write("val", logs["step"], {k[len("val_"):]: v for k, v in logs.items()
                                          if k.startswith("val_")})

    def on_train_end(self, logs=None) -> None:
        for w in self.writers.values():
            w.flush()

    def _write(self, kind: str, step: int, scalars: dict) -> None:
        if kind not in self.writers:
            return
        with self.writers[kind].as_default(step=step):
            for name, value in scalars.items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(name, value)


class TargetTracker(keras.callbacks.Callback):
    """The first evaluation at or above `target` validation accuracy: its step and the training
    time so far go into `counters` (steps_to_target, time_to_target); `stop` ends the run there."""

    def __init__(self, target: float, counters: Callable[[], dict], stop: bool) -> None:
        super().__init__()
        self.target, self.counters, self.stop = target, counters, stop

    def on_epoch_end(self, epoch, logs=None) -> None:
        c = self.counters()
        if c["steps_to_target"] is None and logs.get("val_accuracy", -1.0) >= self.target:
            c["steps_to_target"], c["time_to_target"] = logs["step"], c["train_time"]
            if self.stop:
                self.model.stop_training = True


class ProgressLine(keras.callbacks.Callback):
    """The chief's progress line at each evaluation (training/progress.py)."""

    def __init__(self, log: Callable[[str], None], total_steps: int,
                 global_batch_size: Callable[[], int], counters: Callable[[], dict]) -> None:
        super().__init__()
        self.log, self.total_steps = log, total_steps
        self.global_batch_size, self.counters = global_batch_size, counters

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.log(progress_line(logs, logs["epoch"], logs["step"], self.total_steps,
                               self.global_batch_size(), self.counters()))
