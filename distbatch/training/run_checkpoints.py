"""The run's checkpoints, as a part of the Trainer: what is saved (model, optimizer, step,
AdaScale's state; the loop's state and early stopping's best weights beside it), the
temporary copies of non-chief workers, and the stop after a preemption checkpoint."""
from __future__ import annotations

import os
import shutil
import time

import tensorflow as tf

from distbatch import interrupts
from distbatch.training.checkpoints import temp_checkpoint_dir
from distbatch.training.early_stopping import save_weights, weights_file
from distbatch.training.loop_state import prune_states, save_state
from distbatch.training.preemption import Preempted


class RunCheckpoints:
    """Mixed into distbatch.training.trainer.Trainer (uses its backend, model, optimizer,
    adascale, opt, chief, _early_stopping, _boundary)."""

    def _checkpoint(self):
        if not self.opt.checkpoint_dir:
            return None, None
        self._step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        extra = {"adascale": self.adascale.checkpoint} if self.adascale is not None else {}
        ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self._step_var,
                                   **extra)
        # Multiworker: every worker must save (collectives); non-chief to a temp dir.
        directory = self.opt.checkpoint_dir
        self._temp_checkpoint_dir = None
        if not self.chief:
            directory = temp_checkpoint_dir(self.backend.worker_index)
            self._temp_checkpoint_dir = directory
        return ckpt, tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)

    def _remove_temp_checkpoints(self) -> None:
        """A non-chief worker's checkpoint copies are never read (every worker resumes from the
        chief's): nothing of them may stay in the temp directory once the run ends."""
        directory, self._temp_checkpoint_dir = getattr(self, "_temp_checkpoint_dir", None), None
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    def _save_checkpoint(self, step: int, history: list, state: dict, *,
                         preempting: bool = False) -> None:
        """Save model, optimizer and step (TF checkpoint) plus history and loop counters (JSON)
        and early stopping's best weights (best-<best step>.npz).

        The best weights and the JSON (state-<step>.json) are written BEFORE the
        checkpoint, each atomically: a kill before the checkpoint is complete leaves
        the previous checkpoint as the latest, with its own files still there. Files
        of pruned checkpoints go.
        """
        self._last_checkpoint_time = time.perf_counter()
        if preempting:
            interrupts.hold_watchdog()  # the save may take longer than the hang watchdog's grace
        self._step_var.assign(step)
        es = self._early_stopping
        if self.chief:
            if es is not None and es.best_weights is not None:
                path = os.path.join(self.opt.checkpoint_dir, weights_file(es.best_step))
                if not os.path.exists(path):  # written once per new best
                    save_weights(path, es.best_weights)
            save_state(self.opt.checkpoint_dir, step, history, state)
        self._manager.save(checkpoint_number=step)
        if self.chief:
            prune_states(self.opt.checkpoint_dir, self._manager.checkpoints)
        self._boundary.saved()

    def _stop_preempted(self, step: int) -> None:
        """After the preemption checkpoint of `step`: wait for every worker (the chief's files are
        complete before anyone exits), then end the run with Preempted (exit 75)."""
        if self.backend.num_workers > 1:
            self.backend.sync_flag(False)  # a barrier
        interrupts.release_watchdog()  # (still armed: a late SIGTERM must not cut the exit short)
        if getattr(self, "_temp_checkpoint_dir", None):
            shutil.rmtree(self._temp_checkpoint_dir, ignore_errors=True)
        raise Preempted(step, self.opt.checkpoint_dir)
