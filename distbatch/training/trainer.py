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

from distbatch import interrupts
from distbatch.training import pipeline
from distbatch.backends.base import Backend
from distbatch.training.checkpoints import newest_intact
from distbatch.training.early_stopping import EarlyStopping, load_weights, save_weights, weights_file
from distbatch.measure.noise import NoiseScaleTracker
from distbatch.training.plan import BatchPlan
from distbatch.training.preemption import CallBoundary, Preempted, broadcast_int
from distbatch.training.step import StepOptions, make_eval_step, make_train_step, noise_splits_for


@dataclass
class LoopOptions:
    total_steps: int
    seed: int = 0
    evals_per_epoch: int = 1
    noise_scale: bool = False
    target_accuracy: float | None = None
    stop_at_target: bool = False               # budget "until target" (capped by total_steps)
    early_stopping_metric: str | None = None   # "val_loss" or "val_accuracy"
    early_stopping_patience: int = 5
    min_delta: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0                  # steps; 0 = at evaluations (see below)
    # With checkpoint_every = 0: an evaluation checkpoints only when the last checkpoint is at
    # least this many seconds old (the first evaluation and the last step always do). Saving
    # model and optimizer costs ~60 ms for a small MLP: at every epoch of a tiny epoch that
    # was a quarter of the run time.
    checkpoint_min_seconds: float = 60.0
    checkpoint_every_seconds: float = 0.0      # also when this long passed (chief's clock); 0 = off
    resume: bool = False
    tensorboard_dir: str | None = None
    verbose: bool = True
    log_every: int = 50                        # one TensorBoard point per this many steps
    # Steps run inside one tf.function call (a tf.while_loop). "auto": measured after the
    # compile step so that one call takes about AUTO_CALL_SECONDS. Calls never cross an
    # evaluation, checkpoint or segment boundary, so every result is the same as with 1.
    steps_per_execution: int | str = "auto"
    jit_compile: bool = False                  # XLA for the per-replica forward/backward
    bucket_mb: float = 0.0                     # gradient all-reduce buckets (MB); 0 = one group
    grad_compression: str = "none"             # none | fp16 | bf16: gradient type on the wire
    # Batch-size schedules (distbatch.training.batch_schedule) run one Trainer per fixed-batch
    # segment. step_offset: global steps done before this segment (steps, history and
    # total_steps are absolute); epoch_offset: absolute epoch where the segment starts
    # (the data order is a function of (seed, absolute epoch)). Default 0: one segment.
    step_offset: int = 0
    epoch_offset: int = 0


AUTO_CALL_SECONDS = 0.2     # target duration of one call with steps_per_execution="auto"
AUTO_MAX_STEPS = 1000


def resolve_steps_per_execution(value, step_seconds: float) -> int:
    """An int as given; "auto": enough steps that one call takes ~AUTO_CALL_SECONDS, so the
    per-call host work (dispatch, fetching results) is amortised while a call stays short
    enough for prompt signals and progress."""
    if value != "auto":
        return int(value)
    if not step_seconds > 0:
        return AUTO_MAX_STEPS
    return int(min(AUTO_MAX_STEPS, max(1, round(AUTO_CALL_SECONDS / step_seconds))))


@dataclass
class RunResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _mean(sums: dict, count: float) -> tuple[float, float]:
    return float(sums["loss_sum"]) / count, float(sums["correct"]) / count


def _zero_sums() -> dict:
    return {"loss_sum": 0.0, "correct": 0.0, "steps": 0}


class Trainer:
    """Runs `total_steps` of the shared step on one backend."""

    def __init__(self, backend: Backend, model, optimizer, plan: BatchPlan, data,
                 options: LoopOptions, loss_fn: Callable | None = None, adascale=None,
                 step_cache: dict | None = None) -> None:
        """`adascale`: a distbatch.recipes.adascale.AdaScaleState whose schedule the optimizer uses;
        the run then ends when its tau reaches the base-batch budget (or at total_steps).
        `step_cache`: a dict shared by Trainers of one model and optimizer (segments of a
        changing batch) so a batch seen before does not compile its step again."""
        self.step_cache = {} if step_cache is None else step_cache
        self.backend, self.model, self.optimizer, self.plan = backend, model, optimizer, plan
        self.data, self.opt, self.loss_fn, self.adascale = data, options, loss_fn, adascale
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
        extra = {"adascale": self.adascale.checkpoint} if self.adascale is not None else {}
        ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self._step_var,
                                   **extra)
        # Multiworker: every worker must save (collectives); non-chief to a temp dir.
        directory = self.opt.checkpoint_dir
        self._temp_checkpoint_dir = None
        if not self.chief:
            directory = tempfile.mkdtemp(prefix=f"distbatch-ckpt-w{self.backend.worker_index}-")
            self._temp_checkpoint_dir = directory
        return ckpt, tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)

    # -- boundaries -----------------------------------------------------------------------
    def _at_eval(self, step: int) -> bool:
        return ((step - self.opt.step_offset) % self._eval_every == 0 or step == self.opt.total_steps
                or self._finished)

    def _at_checkpoint(self, step: int) -> bool:
        """--checkpoint-every N: every N steps, at an evaluation or not; 0: at every evaluation."""
        opt = self.opt
        if self._manager is None:
            return False
        if step == opt.total_steps or self._finished:
            return True
        return step % opt.checkpoint_every == 0 if opt.checkpoint_every else self._at_eval(step)

    def _at_log(self, step: int) -> bool:
        return (step - self.opt.step_offset) % max(1, self.opt.log_every) == 0 or self._at_eval(step)

    def _checkpoint_due(self, step: int) -> bool:
        """At an evaluation (checkpoint_every = 0): the first one, the last step, or when the
        chief's last checkpoint is checkpoint_min_seconds old. The chief decides and every
        rank follows (backend.sync_flag), so all save at the same step (TF needs every
        multiworker worker in a save)."""
        opt = self.opt
        if opt.checkpoint_every or step == opt.total_steps or self._finished:
            return True
        last = getattr(self, "_last_checkpoint_time", None)
        due = self.chief and (last is None or time.perf_counter() - last >= opt.checkpoint_min_seconds)
        return self.backend.sync_flag(due)

    def _steps_until_boundary(self, step: int, limit: int) -> int:
        """How many steps one call may run from `step`: up to `limit`, never past the next
        evaluation or checkpoint (they act on the weights of exactly that step)."""
        opt, every = self.opt, self._eval_every
        nxt = opt.step_offset + ((step - opt.step_offset) // every + 1) * every
        if self._manager is not None and opt.checkpoint_every:
            nxt = min(nxt, (step // opt.checkpoint_every + 1) * opt.checkpoint_every)
        return max(1, min(limit, nxt - step, opt.total_steps - step))

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        import tensorflow as tf
        b, plan, opt = self.backend, self.plan, self.opt
        self._eval_every = max(1, plan.steps_per_epoch // max(1, opt.evals_per_epoch))
        # The noise scale needs two batch sizes. With several replicas (or accumulation) they
        # come for free (micro-batch before the all-reduce, global batch after); on one replica
        # each batch is split in two micro-batches. Either way every step measures.
        # AdaScale's gain comes from the same statistics.
        ada = self.adascale
        noise = opt.noise_scale or (ada is not None and ada.needs_statistics)
        splits = noise_splits_for(plan) if noise else 1
        step_options = StepOptions(noise_scale=noise, noise_splits=splits, jit_compile=opt.jit_compile,
                                   bucket_mb=opt.bucket_mb, grad_compression=opt.grad_compression)
        key = (plan, step_options)
        if key not in self.step_cache:
            # TensorFlow traces and compiles the step first: many seconds of silence otherwise.
            self.log("distbatch: compiling the train step (the first step takes longer)...")
            self.step_cache[key] = make_train_step(b, self.model, self.optimizer, plan, self.loss_fn,
                                                   step_options, adascale=ada)
        step_fn = self.step_cache[key]
        if "eval" not in self.step_cache:
            self.step_cache["eval"] = make_eval_step(b, self.model, self.loss_fn)
        eval_fn = self.step_cache["eval"]
        tracker = NoiseScaleTracker(step_fn.b_small, plan.global_batch_size) if noise else None
        self._finished = False  # AdaScale: tau reached the base-batch budget
        gains: list[float] = []

        ckpt, self._manager = self._checkpoint()
        start_step, history, state = opt.step_offset, [], {}
        # Every worker restores the CHIEF's checkpoint (non-chief workers save to temp dirs),
        # the newest intact one: damaged ones are skipped with a warning (distbatch/training/checkpoints.py).
        latest = newest_intact(opt.checkpoint_dir, warn=self.chief) if ckpt is not None and opt.resume else None
        es = (EarlyStopping(opt.early_stopping_metric, opt.early_stopping_patience, opt.min_delta)
              if opt.early_stopping_metric else None)
        self._early_stopping = es
        stopped_early = False
        if latest:
            ckpt.restore(latest)
            start_step = int(self._step_var.numpy())
            history, state = _load_state(opt.checkpoint_dir, start_step)
            stopped_early = _restore_early_stopping(es, state, opt.checkpoint_dir)
            if ada is not None:  # a run resumed at its end must not take more steps
                self._finished = float(ada.tau.numpy()) >= ada.total_base_steps
            self.log(f"resumed from {latest} at step {start_step}")

        make_train = lambda w, L: pipeline.train_dataset(  # noqa: E731
            self.data.x_train, self.data.y_train, plan, seed=opt.seed, worker_index=w,
            local_replicas=L, start_step=start_step - opt.step_offset,
            total_steps=opt.total_steps - opt.step_offset, epoch_offset=opt.epoch_offset)
        iterator = iter(b.distribute(make_train))
        writers = self._writers()

        # Running sums: `sums` since the last evaluation (train metrics in the history),
        # `window` since the last TensorBoard point.
        sums, window = _zero_sums(), _zero_sums()
        c = {"train_time": 0.0, "timed_samples": 0, "steps_to_target": None, "time_to_target": None}
        if state:  # the loop's own counters, saved with the checkpoint (see _save_checkpoint)
            sums = {"steps": state["window_count"], **state["sums"]}
            window = state.get("window", dict(sums))
            c = {k: state[k] for k in c}
            if tracker is not None and state.get("noise"):
                tracker.restore(state["noise"])

        def loop_state() -> dict:
            s = {k: sums[k] for k in ("loss_sum", "correct")}
            return {"sums": s, "window_count": sums["steps"], "window": dict(window), **c,
                    "noise": tracker.state() if tracker is not None else None,
                    "early_stopping": es.state() if es is not None else None,
                    "stopped": stopped_early}

        # Time-based checkpoints and SIGTERM (distbatch.training.preemption): decided at call boundaries,
        # the same on every worker. SIGTERM only sets a flag while the loop runs (CLI only).
        watch = self._manager is not None and interrupts.arm_preemption()
        boundary = CallBoundary(b, opt.checkpoint_every_seconds if self._manager is not None else 0.0,
                                interrupts.preemption_requested if watch else None)
        self._boundary = boundary
        diverged_step = None
        per_call = 1   # the first call compiles: one step, then steps_per_execution is resolved
        step = start_step
        wall0 = time.perf_counter()
        t_last = None
        while step < opt.total_steps and not self._finished and not stopped_early:
            n = self._steps_until_boundary(step, per_call)
            t0 = time.perf_counter()
            out = step_fn.multi(iterator, tf.constant(n, tf.int32))
            values = {k: v.numpy().tolist() for k, v in out.items()}
            now = time.perf_counter()
            n = len(values["loss_sum"])  # fewer than asked when AdaScale's budget ran out
            if t_last is None:
                # The compile call is not training time. "auto" then times one more
                # single-step call to choose steps_per_execution.
                if opt.steps_per_execution != "auto":
                    per_call = resolve_steps_per_execution(opt.steps_per_execution, 0.0)
                boundary.saved()  # the time cadence counts training, not the compile
            else:
                c["train_time"] += now - t_last
                c["timed_samples"] += n * plan.global_batch_size
                if per_call == 1 and opt.steps_per_execution == "auto":
                    per_call = resolve_steps_per_execution("auto", (now - t0) / n)
                    if boundary.sync:  # each worker timed its own call; the chief's count wins
                        per_call = broadcast_int(b, per_call)
            t_last = now
            diverged_step = self._consume(step, values, sums, window, tracker, writers)
            if ada is not None:
                gains.extend(values["gain"])
                self._finished = values["tau"][-1] >= ada.total_base_steps if n else True
            step += n
            if diverged_step is not None:
                break
            save, stop = boundary.decide()
            if not self._at_eval(step):
                if save or self._at_checkpoint(step):
                    self._save_checkpoint(step, history, loop_state(), preempting=stop)
                    t_last = time.perf_counter()  # checkpoints are not training time
                if stop:
                    self._stop_preempted(step)
                continue
            val_loss, val_acc = self._evaluate(eval_fn)
            train_loss, train_acc = _mean(sums, sums["steps"] * plan.global_batch_size)
            sums = _zero_sums()
            epoch = self._epoch_at(step)
            rec = {"step": step, "epoch": round(epoch, 4), "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                   "lr": values["lr"][-1]}
            history.append(rec)
            self._write_scalars(writers, "val", step, {"loss": val_loss, "accuracy": val_acc})
            if (opt.target_accuracy is not None and c["steps_to_target"] is None
                    and val_acc >= opt.target_accuracy):
                c["steps_to_target"], c["time_to_target"] = step, c["train_time"]
                stopped_early = stopped_early or opt.stop_at_target
            speed = c["timed_samples"] / c["train_time"] if c["train_time"] > 0 else float("nan")
            eta = (opt.total_steps - step) * plan.global_batch_size / speed if speed == speed and speed > 0 else float("nan")
            self.log(f"epoch {epoch:6.2f} step {step}/{opt.total_steps}  loss {train_loss:.4f} "
                     f"acc {train_acc:.4f}  val_loss {val_loss:.4f} val_acc {val_acc:.4f}  "
                     f"{speed:,.0f} samples/s  ETA {_fmt_eta(eta)}")
            # Early stopping on the GLOBAL metric: every rank takes the same decision.
            if es is not None:
                if es.update(rec[opt.early_stopping_metric], step, epoch, self.model.get_weights):
                    stopped_early = True
                # The metrics are all-reduced sums, so every rank should agree already;
                # OR-ing the flag across workers guarantees it (a rank that stopped alone
                # would leave the others waiting in a collective).
                stopped_early = b.sync_flag(stopped_early)
            if save or (self._at_checkpoint(step) and self._checkpoint_due(step)):
                self._save_checkpoint(step, history, loop_state(), preempting=stop)
            if stopped_early:
                break
            if stop and step < opt.total_steps and not self._finished:  # else: finish the run
                self._stop_preempted(step)
            t_last = time.perf_counter()  # evaluation and checkpoints are not training time
        interrupts.disarm_preemption()
        wall = time.perf_counter() - wall0
        if getattr(self, "_temp_checkpoint_dir", None):
            shutil.rmtree(self._temp_checkpoint_dir, ignore_errors=True)

        last = history[-1] if history else {}
        train_time = c["train_time"]
        metrics = {
            "steps": step, "epochs": round(self._epoch_at(step), 4),
            "train_loss": last.get("train_loss"), "train_accuracy": last.get("train_accuracy"),
            "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
            "samples_per_sec": c["timed_samples"] / train_time if train_time > 0 else None,
            "train_time_s": train_time, "wall_time_s": wall,
            "steps_to_target": c["steps_to_target"], "time_to_target_s": c["time_to_target"],
            "diverged": diverged_step is not None, "diverged_step": diverged_step,
            "steps_per_execution": per_call,
        }
        if ada is not None:
            tau = float(ada.tau.numpy())
            # tau is the sum of all gains so far: over the whole run when it started at step 0
            # (also after a resume); a segment of a changing batch averages its own steps.
            mean_gain = tau / step if opt.step_offset == 0 and step else (
                float(np.mean(gains)) if gains else None)
            metrics.update(adascale_scale=ada.scale, adascale_mean_gain=mean_gain,
                           adascale_final_gain=gains[-1] if gains else None,
                           scale_invariant_steps=tau,
                           base_steps_budget=ada.total_base_steps)
        if tracker is not None:
            metrics["b_simple"] = tracker.b_simple
            metrics["b_simple_trajectory"] = tracker.trajectory[:: max(1, len(tracker.trajectory) // 50)]
        if es is not None and es.best_weights is not None:
            self.model.set_weights(es.best_weights)
            val_loss, val_acc = self._evaluate(eval_fn)
            # Train metrics of the restored point too, so the generalization gap compares
            # train and validation of the SAME weights (not last train vs best val).
            at_best = next((r for r in history if r["step"] == es.best_step), {})
            metrics.update(train_loss=at_best.get("train_loss", metrics["train_loss"]),
                           train_accuracy=at_best.get("train_accuracy", metrics["train_accuracy"]))
            metrics.update(best_step=es.best_step, best_epoch=round(es.best_epoch, 4),
                           stopped_epoch=round(self._epoch_at(step), 4), stopped_early=stopped_early,
                           restored_metric=opt.early_stopping_metric,
                           restored_value=es.best_value, val_loss=val_loss, val_accuracy=val_acc)
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
        return RunResult(metrics=metrics, history=history)

    # -- pieces ---------------------------------------------------------------------------
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
            _save_state(self.opt.checkpoint_dir, step, history, state)
        self._manager.save(checkpoint_number=step)
        if self.chief:
            _prune_states(self.opt.checkpoint_dir, self._manager.checkpoints)
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

    def _epoch_at(self, step: int) -> float:
        """Absolute epoch after `step` global steps (segments of a batch schedule add offsets)."""
        return self.opt.epoch_offset + (step - self.opt.step_offset) / self.plan.steps_per_epoch

    def _consume(self, step: int, values: dict, sums: dict, window: dict, tracker,
                 writers) -> int | None:
        """Take the per-step outputs of one call (steps step+1 .. step+n) on the host: running
        sums, the noise-scale averages, one TensorBoard point per log window (the window's
        mean loss and accuracy, the lr and B_simple of its last step). Returns the first step
        whose loss is not finite, if any. Per-step values are added one by one, so the sums
        do not depend on how the steps were grouped into calls."""
        gb = self.plan.global_batch_size
        noise = tracker is not None
        for i, (loss_sum, correct) in enumerate(zip(values["loss_sum"], values["correct"])):
            s = step + i + 1
            if not math.isfinite(loss_sum):
                return s
            for acc in (sums, window):
                acc["loss_sum"] += loss_sum
                acc["correct"] += correct
                acc["steps"] += 1
            if noise:
                tracker.update(values["small_sq"][i], values["big_sq"][i], s)
            if writers and self._at_log(s):
                count = window["steps"] * gb
                scalars = {"loss": window["loss_sum"] / count, "accuracy": window["correct"] / count,
                           "learning_rate": values["lr"][i], "global_batch_size": gb}
                if noise and tracker.b_simple is not None:
                    scalars["b_simple"] = tracker.b_simple
                if "gain" in values:
                    scalars.update(adascale_gain=values["gain"][i], adascale_tau=values["tau"][i])
                self._write_scalars(writers, "train", s, scalars)
                window.update(_zero_sums())
        return None

    def _evaluate(self, eval_fn, x=None, y=None) -> tuple[float, float]:
        """Exact (loss, accuracy) over ALL of x (default: the validation set), in one call."""
        import tensorflow as tf
        x, y = (self.data.x_val, self.data.y_val) if x is None else (x, y)
        make_eval = lambda w, L: pipeline.eval_dataset(  # noqa: E731
            x, y, self.plan, worker_index=w, local_replicas=L)
        it = iter(self.backend.distribute(make_eval))
        out = eval_fn(it, tf.constant(pipeline.eval_steps(self.plan, len(x)), tf.int32))
        total = {k: float(v.numpy()) for k, v in out.items()}
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
    """Remove the state files of pruned checkpoints, and best weights no kept state names."""
    import json
    keep = {f"state-{p.rsplit('-', 1)[-1]}.json" for p in kept_checkpoints}
    for name in list(keep):
        try:
            with open(os.path.join(directory, name)) as f:
                best = ((json.load(f).get("loop") or {}).get("early_stopping") or {}).get("best_step")
        except (OSError, ValueError):
            continue
        if best is not None:
            keep.add(weights_file(best))
    for name in os.listdir(directory):
        if ((name.startswith("state-") and name.endswith(".json"))
                or (name.startswith("best-") and name.endswith(".npz"))) and name not in keep:
            os.remove(os.path.join(directory, name))


def _restore_early_stopping(es: EarlyStopping | None, state: dict, directory: str) -> bool:
    """Early stopping's state from a checkpoint's loop state; True if the run had stopped."""
    saved = state.get("early_stopping")
    if es is not None and saved:
        best = saved["best_step"]
        es.restore(saved, load_weights(os.path.join(directory, weights_file(best)))
                   if best is not None else None)
    return bool(state.get("stopped", False))


def _load_state(directory: str, step: int) -> tuple[list, dict]:
    """(history, loop counters) saved with the checkpoint of `step`; older runs: history.json."""
    import json
    path = os.path.join(directory, f"state-{step}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        return saved["history"], saved["loop"]
    return [r for r in _load_history(directory) if r["step"] <= step], {}
