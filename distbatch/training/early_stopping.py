"""Early stopping on a global validation metric, with state that survives a checkpoint.

The rule (Keras's EarlyStopping with restore_best_weights): an evaluation
improves when it beats the best value so far by more than `min_delta`
(lower for *_loss, higher otherwise); `patience` evaluations in a row without
improvement stop the run, and the weights of the best evaluation are restored
at the end.

Everything the rule remembers is in `state()` (JSON: best value, step, epoch,
evaluations without improvement, whether it stopped) plus the best weights,
which the trainer writes beside the checkpoint (`best-<best_step>.npz`). A
resumed run therefore takes the same decisions as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from distbatch.fileio import atomic_write


@dataclass
class EarlyStopping:
    metric: str                      # "val_loss" or "val_accuracy"
    patience: int
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    best_weights: list | None = None
    bad_evals: int = 0               # evaluations since the best without improvement

    def update(self, value: float, step: int, epoch: float,
               weights: Callable[[], list]) -> bool:
        """Record one evaluation; True when patience has run out. `weights()` is called
        (and copied) only when this evaluation is the new best."""
        sign = -1.0 if self.metric.endswith("loss") else 1.0
        if self.best_value is None or sign * (value - self.best_value) > self.min_delta:
            self.best_value, self.best_step, self.best_epoch = value, step, epoch
            self.best_weights = [np.array(w, copy=True) for w in weights()]
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state(self) -> dict:
        """JSON-ready state; the best weights are saved separately (see weights_file)."""
        return {"best_value": self.best_value, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def restore(self, state: dict, weights: list | None) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.best_epoch, self.bad_evals = state["best_epoch"], state["bad_evals"]
        self.best_weights = weights


def weights_file(best_step: int) -> str:
    """Name of the best weights' file in the checkpoint directory."""
    return f"best-{best_step}.npz"


def save_weights(path: str, weights: list) -> None:
    """Write the weights atomically (a kill leaves the old file or none, never half of one)."""
    atomic_write(path, lambda f: np.savez(f, *weights))


def load_weights(path: str) -> list:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]
