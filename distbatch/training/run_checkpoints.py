"""The run's checkpoints as one of its built-in callbacks (training/run_callbacks.py): what is
saved (model, optimizer, step, AdaScale's state; the loop's state and early stopping's best
weights beside it), when (on_epoch_end: at evaluations, after the users' callbacks, so a
checkpoint holds what they changed; and at the call boundaries where the loop's time cadence
or a SIGTERM asks for one), the temporary copies of non-chief workers, and the stop after a
preemption checkpoint. Like the other built-ins it runs on every rank: TensorFlow needs every
multiworker worker in a save (non-chief workers write to a temporary directory)."""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable

import keras
import tensorflow as tf

from distbatch import interrupts
from distbatch.training.checkpoints import temp_checkpoint_dir
from distbatch.training.early_stopping import save_weights, weights_file
from distbatch.training.loop_state import prune_states, save_state
from distbatch.training.preemption import Preempted


class RunCheckpoint(keras.callbacks.Callback):
    """Checkpoints of one run in `options.checkpoint_dir`, kept 2 deep.

    `state()` gives (history, the loop's JSON state) to save with a checkpoint; `boundary` is
    the loop's preemption.CallBoundary (told of every save: the time cadence restarts);
    `pending()` gives the (save, stop) decision of the call that ended at this evaluation."""

    def __init__(self, backend, model, optimizer, options, *, adascale=None,
                 early_stopping=None, state: Callable[[], tuple[list, dict]],
                 at_evaluation: Callable[[int], bool], pending: Callable[[], tuple[bool, bool]]) -> None:
        super().__init__()
        self.backend, self.opt, self.chief = backend, options, backend.is_chief
        self.early_stopping, self.state = early_stopping, state
        self.at_evaluation, self.pending = at_evaluation, pending
        self.boundary = None
        self.last_save_time = None
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        extra = {"adascale": adascale.checkpoint} if adascale is not None else {}
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step_var,
                                              **extra)
        # Multiworker: every worker must save (collectives); non-chief to a temp dir.
        directory, self.temp_dir = options.checkpoint_dir, None
        if not self.chief:
            directory = self.temp_dir = temp_checkpoint_dir(backend.worker_index)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=2)

    # -- when -----------------------------------------------------------------------------
    def at_step(self, step: int, end: bool) -> bool:
        """checkpoint_every N: every N steps, at an evaluation or not; 0: at every evaluation.
        `end`: the last step of the run or of its segment."""
        every = self.opt.checkpoint_every
        return end or (step % every == 0 if every else self.at_evaluation(step))

    def due(self, step: int, end: bool) -> bool:
        """At an evaluation (checkpoint_every = 0): the first one, the last step, or when the
        chief's last checkpoint is checkpoint_min_seconds old. The chief decides and every
        rank follows (backend.sync_flag), so all save at the same step (TF needs every
        multiworker worker in a save)."""
        if self.opt.checkpoint_every or end:
            return True
        last = self.last_save_time
        due = self.chief and (last is None or time.perf_counter() - last >= self.opt.checkpoint_min_seconds)
        return self.backend.sync_flag(due)

    def on_epoch_end(self, epoch, logs=None) -> None:
        """At an evaluation, after the users' callbacks: the checkpoint of its step, if due."""
        step, end = logs["step"], logs["end"]
        save, stop = self.pending()
        if save or (self.at_step(step, end) and self.due(step, end)):
            self.save(step, preempting=stop)

    # -- what -----------------------------------------------------------------------------
    def save(self, step: int, *, preempting: bool = False) -> None:
        """Save model, optimizer and step (TF checkpoint) plus history and loop counters (JSON)
        and early stopping's best weights (best-<best step>.npz).

        The best weights and the JSON (state-<step>.json) are written BEFORE the
        checkpoint, each atomically: a kill before the checkpoint is complete leaves
        the previous checkpoint as the latest, with its own files still there. Files
        of pruned checkpoints go.
        """
        self.last_save_time = time.perf_counter()
        if preempting:
            interrupts.hold_watchdog()  # the save may take longer than the hang watchdog's grace
        self.step_var.assign(step)
        es = self.early_stopping
        if self.chief:
            history, state = self.state()
            if es is not None and es.best_weights is not None:
                path = os.path.join(self.opt.checkpoint_dir, weights_file(es.best_step))
                if not os.path.exists(path):  # written once per new best
                    save_weights(path, es.best_weights)
            save_state(self.opt.checkpoint_dir, step, history, state)
        self.manager.save(checkpoint_number=step)
        if self.chief:
            prune_states(self.opt.checkpoint_dir, self.manager.checkpoints)
        if self.boundary is not None:
            self.boundary.saved()

    def restore(self, path: str) -> int:
        """Restore the checkpoint at `path`; its global step."""
        self.checkpoint.restore(path)
        return int(self.step_var.numpy())

    # -- the end --------------------------------------------------------------------------
    def stop_preempted(self, step: int) -> None:
        """After the preemption checkpoint of `step`: wait for every worker (the chief's files are
        complete before anyone exits), then end the run with Preempted (exit 75)."""
        if self.backend.num_workers > 1:
            self.backend.sync_flag(False)  # a barrier
        interrupts.release_watchdog()  # (still armed: a late SIGTERM must not cut the exit short)
        self.remove_temp()
        raise Preempted(step, self.opt.checkpoint_dir)

    def on_train_end(self, logs=None) -> None:
        self.remove_temp()

    def remove_temp(self) -> None:
        """A non-chief worker's checkpoint copies are never read (every worker resumes from the
        chief's): nothing of them may stay in the temp directory once the run ends."""
        directory, self.temp_dir = self.temp_dir, None
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
