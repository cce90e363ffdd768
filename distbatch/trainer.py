"""The training loop around the shared step: epochs, evaluation, logging,
checkpoints, early stopping, divergence. Every backend runs this same code.

Durations are converted to steps once (BatchPlan); the loop deals only in
steps. Side effects happen on the chief only (`backend.is_chief`), except
what TensorFlow requires of every worker (multiworker saves, non-chief to a
temporary directory).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from distbatch import pipeline
from distbatch.backends.base import Backend
from distbatch.checkpoints import newest_intact
from distbatch.errors import UsageError
from distbatch.noise import NoiseScaleTracker
from distbatch.plan import BatchPlan
from distbatch.step import StepOptions, make_eval_step, make_train_step, noise_splits_for


@dataclass
class LoopOptions:
    total_steps: int
    seed: int = 0
    evals_per_epoch: int = 1
    noise_scale: bool = False
    noise_every: int = 8                       # on one replica: measure on every 8th step
    target_accuracy: float | None = None
    stop_at_target: bool = False               # budget "until target" (capped by total_steps)
    early_stopping_metric: str | None = None   # "val_loss" or "val_accuracy"
    early_stopping_patience: int = 5
    min_delta: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0                  # steps; 0 = at every evaluation
    resume: bool = False
    tensorboard_dir: str | None = None
    verbose: bool = True
    log_every: int = 50
    # Batch-size schedules (distbatch.batch_schedule) run one Trainer per fixed-batch
    # segment. step_offset: global steps done before this segment (steps, history and
    # total_steps are absolute); epoch_offset: absolute epoch where the segment starts
    # (the data order is a function of (seed, absolute epoch)). Default 0: one segment.
    step_offset: int = 0
    epoch_offset: int = 0


@dataclass
class RunResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    lr_trace: list[tuple[int, float]] = field(default_factory=list)


def _mean(sums: dict, count: float) -> tuple[float, float]:
    return float(sums["loss_sum"]) / count, float(sums["correct"]) / count


class Trainer:
    """Runs `total_steps` of the shared step on one backend."""

    def __init__(self, backend: Backend, model, optimizer, plan: BatchPlan, data,
                 options: LoopOptions, loss_fn: Callable | None = None,
                 learning_rate_fn: Callable[[int], float] | None = None) -> None:
        self.backend, self.model, self.optimizer, self.plan = backend, model, optimizer, plan
        self.data, self.opt, self.loss_fn = data, options, loss_fn
        self.lr_fn = learning_rate_fn
        self.chief = backend.is_chief

    # -- output helpers -------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.chief and self.opt.verbose:
            print(msg, file=sys.stderr, flush=True)

    def _checkpoint(self):
        import tensorflow as tf
        if not self.opt.checkpoint_dir:
            return None, None
        self._step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self._step_var)
        # Multiworker: every worker must save (collectives); non-chief to a temp dir.
        directory = self.opt.checkpoint_dir
        self._temp_checkpoint_dir = None
        if not self.chief:
            directory = tempfile.mkdtemp(prefix=f"distbatch-ckpt-w{self.backend.worker_index}-")
            self._temp_checkpoint_dir = directory
        return ckpt, tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        import tensorflow as tf
        b, plan, opt = self.backend, self.plan, self.opt
        per_epoch = plan.steps_per_epoch
        eval_every = max(1, per_epoch // max(1, opt.evals_per_epoch))
        # The noise scale needs two batch sizes. With several replicas (or accumulation) they
        # come for free (micro-batch before the all-reduce, global batch after), so every step
        # measures. On one replica the batch must be split in two, which slows a step down, so
        # only every `noise_every`-th step does it.
        splits = noise_splits_for(plan) if opt.noise_scale else 1
        step_fn = make_train_step(b, self.model, self.optimizer, plan, self.loss_fn,
                                  StepOptions(noise_scale=opt.noise_scale and splits == 1))
        noise_fn, noise_every = step_fn, 1
        if opt.noise_scale and splits > 1:
            noise_fn = make_train_step(b, self.model, self.optimizer, plan, self.loss_fn,
                                       StepOptions(noise_scale=True, noise_splits=splits))
            noise_every = max(1, opt.noise_every)
        eval_fn = make_eval_step(b, self.model, self.loss_fn)
        tracker = (NoiseScaleTracker(noise_fn.b_small, plan.global_batch_size)
                   if opt.noise_scale else None)

        ckpt, manager = self._checkpoint()
        start_step, history, state = opt.step_offset, [], {}
        # Every worker restores the CHIEF's checkpoint (non-chief workers save to temp dirs),
        # the newest intact one: damaged ones are skipped with a warning (distbatch/checkpoints.py).
        latest = newest_intact(opt.checkpoint_dir, warn=self.chief) if ckpt is not None and opt.resume else None
        if latest:
            ckpt.restore(latest)
            start_step = int(self._step_var.numpy())
            history, state = _load_state(opt.checkpoint_dir, start_step)
            self.log(f"resumed from {latest} at step {start_step}")

        make_train = lambda w, L: pipeline.train_dataset(  # noqa: E731
            self.data.x_train, self.data.y_train, plan, seed=opt.seed, worker_index=w,
            local_replicas=L, start_step=start_step - opt.step_offset,
            total_steps=opt.total_steps - opt.step_offset, epoch_offset=opt.epoch_offset)
        iterator = iter(b.distribute(make_train))
        writers = self._writers()

        result = RunResult(metrics={}, history=history)
        best = None  # (value, step, epoch, weights)
        bad_evals = 0
        sums = {"loss_sum": 0.0, "correct": 0.0}
        window_count = 0
        pending: list[tuple[int, dict]] = []
        train_time, timed_samples = 0.0, 0
        steps_to_target = time_to_target = None
        diverged_step = None
        stopped_early = False
        t_last = None
        step = start_step
        if state:  # the loop's own counters, saved with the checkpoint (see _save_checkpoint)
            sums, window_count = state["sums"], state["window_count"]
            train_time, timed_samples = state["train_time"], state["timed_samples"]
            steps_to_target, time_to_target = state["steps_to_target"], state["time_to_target"]

        def loop_state() -> dict:
            return {"sums": dict(sums), "window_count": window_count, "train_time": train_time,
                    "timed_samples": timed_samples, "steps_to_target": steps_to_target,
                    "time_to_target": time_to_target}

        wall0 = time.perf_counter()
        while step < opt.total_steps:
            out = (noise_fn if (step + 1) % noise_every == 0 else step_fn)(iterator)
            step += 1
            pending.append((step, out))
            at_eval = (step - opt.step_offset) % eval_every == 0 or step == opt.total_steps
            # --checkpoint-every N: every N steps, at an evaluation or not; 0: at every evaluation.
            at_ckpt = ckpt is not None and (step == opt.total_steps or (
                step % opt.checkpoint_every == 0 if opt.checkpoint_every else at_eval))
            # Sync right after the run's first (compiling) step, so timing excludes it.
            if at_eval or at_ckpt or len(pending) >= opt.log_every or step == start_step + 1:
                diverged_step = self._drain(pending, sums, tracker, writers)
                window_count += len(pending)
                pending.clear()
                now = time.perf_counter()
                # The first synced point after the run's first step ends the compile phase.
                if t_last is None:
                    t_last = now
                else:
                    train_time += now - t_last
                    timed_samples += (step - last_step) * plan.global_batch_size
                    t_last = now
                last_step = step
                if diverged_step is not None:
                    break
            if not at_eval:
                if at_ckpt:
                    self._save_checkpoint(manager, step, history, loop_state())
                    t_last = time.perf_counter()  # checkpoints are not training time
                continue
            val_loss, val_acc = self._evaluate(eval_fn)
            train_loss, train_acc = _mean(sums, window_count * plan.global_batch_size)
            sums, window_count = {"loss_sum": 0.0, "correct": 0.0}, 0
            epoch = self._epoch_at(step)
            rec = {"step": step, "epoch": round(epoch, 4), "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc}
            history.append(rec)
            self._write_scalars(writers, "val", step, {"loss": val_loss, "accuracy": val_acc})
            if (opt.target_accuracy is not None and steps_to_target is None
                    and val_acc >= opt.target_accuracy):
                steps_to_target, time_to_target = step, train_time
                stopped_early = stopped_early or opt.stop_at_target
            speed = timed_samples / train_time if train_time > 0 else float("nan")
            eta = (opt.total_steps - step) * plan.global_batch_size / speed if speed == speed and speed > 0 else float("nan")
            self.log(f"epoch {epoch:6.2f} step {step}/{opt.total_steps}  loss {train_loss:.4f} "
                     f"acc {train_acc:.4f}  val_loss {val_loss:.4f} val_acc {val_acc:.4f}  "
                     f"{speed:,.0f} samples/s  ETA {_fmt_eta(eta)}")
            # Early stopping on the GLOBAL metric: every rank takes the same decision.
            if opt.early_stopping_metric:
                value = rec[opt.early_stopping_metric]
                sign = -1.0 if opt.early_stopping_metric.endswith("loss") else 1.0
                if best is None or sign * (value - best[0]) > opt.min_delta:
                    best = (value, step, epoch, [w.copy() for w in self.model.get_weights()])
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if bad_evals >= opt.early_stopping_patience:
                        stopped_early = True
                # The metrics are all-reduced sums, so every rank should agree already;
                # OR-ing the flag across workers guarantees it (a rank that stopped alone
                # would leave the others waiting in a collective).
                stopped_early = b.sync_flag(stopped_early)
            if at_ckpt:
                self._save_checkpoint(manager, step, history, loop_state())
            if stopped_early:
                break
            t_last = time.perf_counter()  # evaluation and checkpoints are not training time
        wall = time.perf_counter() - wall0
        if getattr(self, "_temp_checkpoint_dir", None):
            shutil.rmtree(self._temp_checkpoint_dir, ignore_errors=True)

        last = history[-1] if history else {}
        metrics = {
            "steps": step, "epochs": round(self._epoch_at(step), 4),
            "train_loss": last.get("train_loss"), "train_accuracy": last.get("train_accuracy"),
            "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
            "samples_per_sec": timed_samples / train_time if train_time > 0 else None,
            "train_time_s": train_time, "wall_time_s": wall,
            "steps_to_target": steps_to_target, "time_to_target_s": time_to_target,
            "diverged": diverged_step is not None, "diverged_step": diverged_step,
        }
        if tracker is not None:
            metrics["b_simple"] = tracker.b_simple
            metrics["b_simple_trajectory"] = tracker.trajectory[:: max(1, len(tracker.trajectory) // 50)]
        if opt.early_stopping_metric and best is not None:
            self.model.set_weights(best[3])
            val_loss, val_acc = self._evaluate(eval_fn)
            # Train metrics of the restored point too, so the generalization gap compares
            # train and validation of the SAME weights (not last train vs best val).
            at_best = next((r for r in history if r["step"] == best[1]), {})
            metrics.update(train_loss=at_best.get("train_loss", metrics["train_loss"]),
                           train_accuracy=at_best.get("train_accuracy", metrics["train_accuracy"]))
            metrics.update(best_step=best[1], best_epoch=round(best[2], 4),
                           stopped_epoch=round(self._epoch_at(step), 4), stopped_early=stopped_early,
                           restored_metric=opt.early_stopping_metric,
                           restored_value=best[0], val_loss=val_loss, val_accuracy=val_acc)
        if diverged_step is None:
            # The generalization gap needs train metrics of the FINAL weights, evaluated like
            # validation (the per-window running averages lag behind a model that improves).
            n = min(len(self.data.x_train), max(len(self.data.x_val), 1))
            train_loss, train_acc = self._evaluate(eval_fn, self.data.x_train[:n], self.data.y_train[:n])
            metrics.update(train_loss_running=metrics["train_loss"],
                           train_accuracy_running=metrics["train_accuracy"],
                           train_loss=train_loss, train_accuracy=train_acc, train_eval_examples=n)
        if history:
            lows = min(history, key=lambda r: r["val_loss"])
            metrics["best_val_loss_epoch"] = lows["epoch"]
        for w in writers.values():
            w.flush()
        result.metrics, result.history = metrics, history
        return result

    # -- pieces ---------------------------------------------------------------------------
    def _save_checkpoint(self, manager, step: int, history: list, state: dict) -> None:
        """Save model, optimizer and step (TF checkpoint) plus history and loop counters (JSON).

        The JSON (state-<step>.json) is written BEFORE the checkpoint: a kill
        between the two leaves the previous checkpoint as the latest, and its
        own state file is still there. State files of pruned checkpoints go.
        """
        self._step_var.assign(step)
        if self.chief:
            _save_state(self.opt.checkpoint_dir, step, history, state)
        manager.save(checkpoint_number=step)
        if self.chief:
            _prune_states(self.opt.checkpoint_dir, manager.checkpoints)

    def _epoch_at(self, step: int) -> float:
        """Absolute epoch after `step` global steps (segments of a batch schedule add offsets)."""
        return self.opt.epoch_offset + (step - self.opt.step_offset) / self.plan.steps_per_epoch

    def _drain(self, pending, sums, tracker, writers) -> int | None:
        """Fetch the window's step outputs; return the first diverged step, if any."""
        gb = self.plan.global_batch_size
        for step, out in pending:
            values = {k: float(v.numpy()) for k, v in out.items()}
            loss = values["loss_sum"] / gb
            if not math.isfinite(loss):
                return step
            sums["loss_sum"] += values["loss_sum"]
            sums["correct"] += values["correct"]
            scalars = {"loss": loss, "accuracy": values["correct"] / gb}
            if self.lr_fn is not None and "train" in writers:  # only the chief logs it
                scalars["learning_rate"] = float(self.lr_fn(step - 1))
            if tracker is not None and "small_sq" in values:
                bs = tracker.update(values["small_sq"], values["big_sq"], step)
                if bs is not None:
                    scalars["b_simple"] = bs
            self._write_scalars(writers, "train", step, scalars)
        return None

    def _evaluate(self, eval_fn, x=None, y=None) -> tuple[float, float]:
        """Exact (loss, accuracy) over ALL of x (default: the validation set)."""
        x, y = (self.data.x_val, self.data.y_val) if x is None else (x, y)
        make_eval = lambda w, L: pipeline.eval_dataset(  # noqa: E731
            x, y, self.plan, worker_index=w, local_replicas=L)
        it = iter(self.backend.distribute(make_eval))
        total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for _ in range(pipeline.eval_steps(self.plan, len(x))):
            out = eval_fn(it)
            for k in total:
                total[k] += float(out[k].numpy())
        if total["count"] != len(x):
            raise RuntimeError(f"evaluation covered {total['count']} examples, expected {len(x)}")
        return _mean(total, total["count"])

    def _writers(self) -> dict:
        if not (self.chief and self.opt.tensorboard_dir):
            return {}
        import tensorflow as tf
        return {k: tf.summary.create_file_writer(os.path.join(self.opt.tensorboard_dir, k))
                for k in ("train", "val")}

    @staticmethod
    def _write_scalars(writers, kind, step, scalars) -> None:
        if kind not in writers:
            return
        import tensorflow as tf
        with writers[kind].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)


def _fmt_eta(seconds: float) -> str:
    if not seconds == seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _load_history(directory: str) -> list:
    import json
    path = os.path.join(directory, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _save_state(directory: str, step: int, history: list, state: dict) -> None:
    import json
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"state-{step}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "history": history, "loop": state}, f)
    os.replace(path + ".tmp", path)


def _prune_states(directory: str, kept_checkpoints: list) -> None:
    keep = {f"state-{p.rsplit('-', 1)[-1]}.json" for p in kept_checkpoints}
    for name in os.listdir(directory):
        if name.startswith("state-") and name.endswith(".json") and name not in keep:
            os.remove(os.path.join(directory, name))


def _load_state(directory: str, step: int) -> tuple[list, dict]:
    """(history, loop counters) saved with the checkpoint of `step`; older runs: history.json."""
    import json
    path = os.path.join(directory, f"state-{step}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        return saved["history"], saved["loop"]
    return [r for r in _load_history(directory) if r["step"] <= step], {}
