"""The run's one early stopping: Keras's EarlyStopping callback on a global validation metric,
with state that survives a checkpoint.

The rule is Keras's (restore_best_weights=True): an evaluation improves when it beats the
best value so far by more than `min_delta` (lower for *_loss, higher otherwise); `patience`
evaluations in a row without improvement stop the run, and the weights of the best evaluation
are restored at the end. `early_stopping_metric=` builds it as one of the run's built-in
callbacks (training/run_callbacks.py): it runs on every rank, on all-reduced metrics.

Everything the rule remembers is in `state()` (JSON: best value, step, epoch,
evaluations without improvement, whether it stopped) plus the best weights,
which the trainer writes beside the checkpoint (`best-<best_step>.npz`). A
resumed run therefore takes the same decisions as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np

from distbatch.fileio import atomic_write


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping (restore_best_weights=True) on a global validation metric, plus what
    a run resumed from a checkpoint needs to take the same decisions as an uninterrupted one:
    state() (JSON: best value, step, data epoch, evaluations without improvement) and
    restore(state, best weights). The epoch index Keras sees counts evaluations; best_step and
    best_epoch are the history record's step and data epoch of the best one."""

    def __init__(self, metric: str, patience: int, min_delta: float,
                 history: Callable[[], list]) -> None:
        super().__init__(monitor=metric, patience=patience, min_delta=min_delta,
                         mode="min" if metric.endswith("loss") else "max",
                         restore_best_weights=True)
        self.history = history
        self._resumed = None

    @property
    def metric(self) -> str:
        return self.monitor

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        if self._resumed is not None:
            state, weights = self._resumed
            self.best, self.wait, self.best_weights = state["best_value"], state["bad_evals"], weights
            records = self.history()
            self.best_epoch = next((i for i, r in enumerate(records)
                                    if r["step"] == state["best_step"]), 0)

    def on_train_end(self, logs=None) -> None:
        """The best weights go back into the model (Keras's rule); nothing is printed."""
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def _best_record(self) -> dict:
        records = self.history()
        return records[self.best_epoch] if self.best is not None and records else {}

    @property
    def best_step(self) -> int | None:
        return self._best_record().get("step")

    @property
    def best_data_epoch(self) -> float | None:
        return self._best_record().get("epoch")

    def state(self) -> dict:
        """JSON-ready state; the best weights are saved beside it (early_stopping.weights_file)."""
        best = None if self.best is None else float(self.best)
        return {"best_value": best, "best_step": self.best_step,
                "best_epoch": self.best_data_epoch, "bad_evals": int(self.wait)}

    def restore(self, state: dict, weights: list | None) -> None:
        """Take a checkpoint's state; applied at on_train_begin (which Keras uses to reset)."""
        self._resumed = (state, weights)


def weights_file(best_step: int) -> str:
    """Name of the best weights' file in the checkpoint directory."""
    return f"best-{best_step}.npz"


def save_weights(path: str, weights: list) -> None:
    """Write the weights atomically (a kill leaves the old file or none, never half of one)."""
    atomic_write(path, lambda f: np.savez(f, *weights))


def load_weights(path: str) -> list:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]
