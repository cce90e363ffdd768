"""The training loop around the shared step: calls of steps, evaluations, the batch policy's
segments, divergence. Every backend runs this same code. What happens at evaluations and log
windows (TensorBoard, the target, the progress line, early stopping, checkpoints, the users'
Keras callbacks) are callbacks (training/run_callbacks.py, training/hooks.py).

Durations are converted to steps once (BatchPlan); the loop deals only in
steps. Side effects happen on the chief only (`backend.is_chief`), except
what TensorFlow requires of every worker (multiworker saves, non-chief to a
temporary directory).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

import tensorflow as tf

from distbatch import interrupts
from distbatch.backends.base import Backend
from distbatch.data.inputs import array_sources, without_autotune_thread
from distbatch.training.noise_scale import NoiseScaleTracker
from distbatch.training.checkpoints import newest_intact
from distbatch.training.batch_policy import FixedBatch, Segment, segment_record
from distbatch.training.early_stopping import EarlyStopping
from distbatch.training.evaluation import eval_iterator, run_evaluation
from distbatch.training.hooks import CallbackHooks, check_ranks_agree
# The options and result, the loop's state and its files, and the progress line live in their
# own modules; LoopOptions, RunResult and the rest stay importable from here.
from distbatch.training.loop_options import (  # noqa: F401  (AUTO_*: re-exported)
    AUTO_CALL_SECONDS, AUTO_MAX_STEPS, LoopOptions, RunResult, resolve_steps_per_execution)
from distbatch.training.loop_state import (
    LoopState, checkpoint_state, fresh_counters, load_state, restore_early_stopping, restore_loop,
    zero_sums)
from distbatch.training.plan import BatchPlan
from distbatch.training.preemption import CallBoundary, chief_ints, sync_every_calls
from distbatch.training.run_callbacks import ProgressLine, TargetTracker, TensorBoardScalars
from distbatch.training.run_checkpoints import RunCheckpoint
from distbatch.training.step import (StepOptions, default_task, make_eval_step, make_train_step,
                                     noise_splits_for)


class Trainer:
    """Runs a whole run of the shared step on one backend: `total_steps` at one batch, or the
    segments of a batch policy (distbatch.training.batch_policy)."""

    def __init__(self, backend: Backend, model, optimizer, plan: BatchPlan, data,
                 options: LoopOptions, loss_fn: Callable | None = None, adascale=None,
                 step_cache: dict | None = None, *, task=None, validation_data=None,
                 callbacks=None, policy=None) -> None:
        """`data`: a distbatch ArrayDataset (train and validation arrays) or a training source
        (distbatch.data.inputs; then `validation_data` is a source or None).
        `task` (distbatch.training.task.Task): loss and metrics; default `loss_fn` (per
        example; default sparse cross-entropy from logits) with accuracy.
        `callbacks`: Keras callbacks, called on the chief with global metrics.
        `adascale`: a distbatch.recipes.adascale.AdaScaleState whose schedule the optimizer uses;
        the run then ends when its tau reaches the base-batch budget (or at total_steps).
        `step_cache`: compiled steps by batch plan (a batch seen before does not compile again).
        `policy`: the batch policy (FixedBatch(plan, options.total_steps) by default): the
        segments of the run, each at its own global batch; one evaluation ends each."""
        self.step_cache = {} if step_cache is None else step_cache
        self.backend, self.model, self.optimizer, self.plan = backend, model, optimizer, plan
        self.opt, self.adascale = options, adascale
        self._val_iterator = None  # (iterator, batches): made at the first evaluation
        if hasattr(data, "x_train"):
            self.train_source, self.val_source = array_sources(data)
        elif hasattr(data, "train_source"):  # distbatch.data.inputs.SourceDataset
            self.train_source, self.val_source = data.train_source, data.val_source
        else:
            self.train_source, self.val_source = data, validation_data
        if "task" not in self.step_cache:
            self.step_cache["task"] = task or default_task(loss_fn)
        self.task = self.step_cache["task"]
        self.callbacks = list(callbacks or [])
        self.chief = backend.is_chief
        self.policy = policy or FixedBatch(plan, options.total_steps)
        self._seg = None  # the segment being trained (batch_policy.Segment)

    # -- output helpers -------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.chief and self.opt.verbose:
            print(msg, file=sys.stderr, flush=True)

    # -- boundaries -----------------------------------------------------------------------
    def _at_eval(self, step: int) -> bool:
        return ((step - self._seg.start_step) % self._eval_every == 0 or step == self._seg.end_step
                or self._finished)

    def _at_end(self, step: int) -> bool:
        """The last step of the segment, or AdaScale's budget reached."""
        return step == self._seg.end_step or self._finished

    def _at_log(self, step: int) -> bool:
        return (step - self._seg.start_step) % max(1, self.opt.log_every) == 0 or self._at_eval(step)

    def _steps_until_boundary(self, step: int, limit: int) -> int:
        """How many steps one call may run from `step`: up to `limit`, never past the next
        evaluation or checkpoint (they act on the weights of exactly that step)."""
        opt, every, start = self.opt, self._eval_every, self._seg.start_step
        nxt = start + ((step - start) // every + 1) * every
        if self._ckpt is not None and opt.checkpoint_every:
            nxt = min(nxt, (step // opt.checkpoint_every + 1) * opt.checkpoint_every)
        return max(1, min(limit, nxt - step, self._seg.end_step - step))

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._ckpt = None
        try:
            return self._run()
        finally:  # after the last save (a save recreates the directory), and on an error too
            if self._ckpt is not None:
                self._ckpt.remove_temp()

    def _enter(self, seg: Segment, loop: LoopState):
        """Start a segment: its plan, steps (compiled once per plan), noise tracker, iterator.
        Its first call compiles (or re-times): not training time, steps per call chosen anew."""
        if self._seg is not None and seg.plan != self.plan:
            self._val_iterator = None  # validation batches follow the global batch
        self._seg, self.plan = seg, seg.plan
        step_fn, eval_fn, tracker = self._build_steps()
        self._tracker = tracker
        loop.t_last, loop.timed, loop.per_call = None, False, 1
        self._seg_start = (loop.step, loop.counters["train_time"], loop.counters["timed_samples"])
        self._left = False
        return step_fn, eval_fn, tracker, self._train_iterator(loop.step)

    def _leave(self, loop: LoopState, tracker) -> dict:
        """What the policy learns of the segment that ended (and metrics["segments"] keeps)."""
        step0, time0, samples0 = self._seg_start
        seconds = loop.counters["train_time"] - time0
        sps = (loop.counters["timed_samples"] - samples0) / seconds if seconds > 0 else None
        self._left = True
        if tracker is not None:
            self._trajectory.extend(tracker.trajectory)
        info = dict(self._seg.info)
        return {"step": loop.step, "segment": self._seg, "samples_per_sec": sps, "info": info,
                "steps": loop.step - step0,
                "b_simple": tracker.b_simple if tracker is not None else None}

    @staticmethod
    def _segment_entry(done: dict) -> dict:
        """metrics["segments"]'s entry of a segment that ended (`done`: see _leave)."""
        return {**segment_record(done["segment"], done["steps"], done["samples_per_sec"]),
                **done["info"]}

    def _run(self) -> RunResult:
        self._seg = self.policy.first()
        self.plan = self._seg.plan
        loop = self._start()
        self._trajectory, segments = [], []
        step_fn, eval_fn, tracker, iterator = self._enter(self._seg, loop)
        if tracker is not None and self._tracker_state:
            tracker.restore(self._tracker_state)
        self._hooks = self._callbacks(loop)
        # Time-based checkpoints and SIGTERM (distbatch.training.preemption): decided at call
        # boundaries, the same on every worker. SIGTERM only sets a flag while the loop runs.
        ckpt = self._ckpt
        watch = ckpt is not None and interrupts.arm_preemption()
        self._boundary = CallBoundary(self.backend, self.opt.checkpoint_every_seconds
                                      if ckpt is not None else 0.0,
                                      interrupts.preemption_requested if watch else None)
        if ckpt is not None:
            ckpt.boundary = self._boundary
        self._hooks.train_begin(len(loop.history))
        wall0 = time.perf_counter()
        while not self._finished and not loop.stopped and loop.diverged_step is None:
            if loop.step >= self._seg.end_step:  # the segment ended: the policy says what next
                done = self._leave(loop, tracker)
                nxt = self.policy.next(done)  # (may add to done["info"])
                segments.append(self._segment_entry(done))
                if nxt is None:
                    break
                step_fn, eval_fn, tracker, iterator = self._enter(nxt, loop)
                continue
            if not self._run_call(loop, step_fn, iterator, tracker):
                break
            save, stop = self._pending = self._boundary.decide()
            if not self._at_eval(loop.step):
                if ckpt is not None and (save or ckpt.at_step(loop.step, False)):
                    ckpt.save(loop.step, preempting=stop)
                    loop.t_last = time.perf_counter()  # checkpoints are not training time
                if stop:
                    ckpt.stop_preempted(loop.step)
                continue
            self._evaluation(loop, eval_fn)
            if loop.stopped or self._finished:
                break
            if stop and loop.step < self.opt.total_steps:  # else: finish
                ckpt.stop_preempted(loop.step)
            loop.t_last = time.perf_counter()  # evaluation and checkpoints are not training time
        interrupts.disarm_preemption()
        self._hooks.builtins_train_end()  # early stopping's best weights are back
        if not self._left:  # stopped, finished or diverged inside the segment
            segments.append(self._segment_entry(self._leave(loop, tracker)))
        metrics = self._finish(loop, eval_fn, tracker, time.perf_counter() - wall0)
        metrics.update(self.policy.metrics(segments))
        self._hooks.train_end(metrics)
        return RunResult(metrics=metrics, history=loop.history)

    def _callbacks(self, loop: LoopState) -> CallbackHooks:
        """The run's built-in callbacks (run_callbacks.py; every rank) around the users'."""
        opt, counters = self.opt, lambda: loop.counters
        builtins = [TensorBoardScalars(opt.tensorboard_dir if self.chief else None)]
        if opt.target_accuracy is not None:
            builtins.append(TargetTracker(opt.target_accuracy, counters, opt.stop_at_target))
        if self.chief and opt.verbose:
            builtins.append(ProgressLine(self.log, opt.total_steps,
                                         lambda: self.plan.global_batch_size, counters))
        if self._early_stopping is not None:
            builtins.append(self._early_stopping)
        return CallbackHooks(self.callbacks, self.model, self.backend, opt, self.plan,
                             self.optimizer, builtins=builtins,
                             after=[self._ckpt] if self._ckpt is not None else [],
                             builtins_may_stop=(self._early_stopping is not None
                                                or (opt.target_accuracy is not None
                                                    and opt.stop_at_target)))

    def _build_steps(self):
        """The train step (cached per batch plan and options), the eval step, the noise tracker.

        The noise scale needs two batch sizes. With several replicas (or accumulation) they
        come for free (micro-batch before the all-reduce, global batch after); on one replica
        each batch is split in two micro-batches. Either way every step measures. AdaScale's
        gain comes from the same statistics."""
        opt, plan, ada = self.opt, self.plan, self.adascale
        self._eval_every = max(1, plan.steps_per_epoch // max(1, opt.evals_per_epoch))
        noise = opt.noise_scale or (ada is not None and ada.needs_statistics)
        splits = noise_splits_for(plan) if noise else 1
        step_options = StepOptions(noise_scale=noise, noise_splits=splits, jit_compile=opt.jit_compile,
                                   bucket_mb=opt.bucket_mb, grad_compression=opt.grad_compression)
        key = (plan, step_options)
        if key not in self.step_cache:
            # TensorFlow traces and compiles the step first: many seconds of silence otherwise.
            self.log("distbatch: compiling the train step (the first step takes longer)...")
            self.step_cache[key] = make_train_step(self.backend, self.model, self.optimizer, plan,
                                                   options=step_options, adascale=ada, task=self.task)
        if "eval" not in self.step_cache:
            self.step_cache["eval"] = make_eval_step(self.backend, self.model, task=self.task)
        step_fn = self.step_cache[key]
        tracker = NoiseScaleTracker(step_fn.b_small, plan.global_batch_size) if noise else None
        return step_fn, self.step_cache["eval"], tracker

    def _start(self) -> LoopState:
        """A fresh loop, or the one of the newest intact checkpoint (resume)."""
        opt, ada = self.opt, self.adascale
        self._finished = False  # AdaScale: tau reached the base-batch budget
        size = self.task.state_size
        loop = LoopState(step=0, history=[], sums=zero_sums(size),
                         window=zero_sums(size), counters=fresh_counters())
        self._early_stopping = (EarlyStopping(opt.early_stopping_metric, opt.early_stopping_patience,
                                              opt.min_delta, lambda: loop.history)
                                if opt.early_stopping_metric else None)
        self._pending = (False, False)  # the (save, stop) decision of the last call boundary
        self._ckpt = (RunCheckpoint(self.backend, self.model, self.optimizer, opt,
                                    adascale=ada, early_stopping=self._early_stopping,
                                    state=lambda: (loop.history, checkpoint_state(
                                        loop, self._tracker, self._early_stopping)),
                                    at_evaluation=self._at_eval,
                                    pending=lambda: self._pending)
                      if opt.checkpoint_dir else None)
        self._tracker_state = None
        # Every worker restores the CHIEF's checkpoint (non-chief workers save to temp dirs), the
        # newest intact one: damaged ones are skipped with a warning (training/checkpoints.py).
        latest = (newest_intact(opt.checkpoint_dir, warn=self.chief)
                  if self._ckpt is not None and opt.resume else None)
        if not latest:
            return loop
        loop.step = self._ckpt.restore(latest)
        loop.history, state = load_state(opt.checkpoint_dir, loop.step)
        loop.stopped = restore_early_stopping(self._early_stopping, state, opt.checkpoint_dir)
        if state:  # the loop's own counters, saved with the checkpoint (see checkpoint_state)
            restore_loop(loop, state, self.task, self.plan.global_batch_size)
            self._tracker_state = state.get("noise")
        if ada is not None:  # a run resumed at its end must not take more steps
            self._finished = float(ada.tau.numpy()) >= ada.total_base_steps
        self.log(f"resumed from {latest} at step {loop.step}")
        return loop

    def _train_iterator(self, start_step: int):
        opt = self.opt
        source, plan = self.train_source, self.plan
        make = lambda w, L: without_autotune_thread(source.train_dataset(  # noqa: E731
            plan, seed=opt.seed, worker_index=w, num_workers=self.backend.num_workers,
            local_replicas=L, start_step=start_step - self._seg.start_step,
            total_steps=self._seg.end_step - self._seg.start_step, epoch_offset=self._seg.start_epoch))
        return self.backend.iterator(make)

    def _run_call(self, loop: LoopState, step_fn, iterator, tracker) -> bool:
        """One call of up to steps_per_execution steps; False when the loss diverged."""
        opt, plan, ada = self.opt, self.plan, self.adascale
        n = self._steps_until_boundary(loop.step, loop.per_call)
        t0 = time.perf_counter()
        with self.backend.waiting(f"train steps {loop.step + 1}-{loop.step + n}"):
            out = step_fn.multi(iterator, tf.constant(n, tf.int32))
            values = {k: v.numpy() for k, v in out.items()}
        now = time.perf_counter()
        n = len(values["loss_sum"])  # fewer than asked when AdaScale's budget ran out
        c = loop.counters
        if loop.t_last is None:
            # The compile call is not training time. "auto" then times one more single-step
            # call to choose steps_per_execution.
            if opt.steps_per_execution != "auto":
                loop.per_call = resolve_steps_per_execution(opt.steps_per_execution, 0.0)
            self._boundary.saved()  # the time cadence counts training, not the compile
        else:
            c["train_time"] += now - loop.t_last
            c["timed_samples"] += n * plan.global_batch_size
            if not loop.timed:
                loop.timed = True
                step_seconds = (now - t0) / max(n, 1)
                auto = opt.steps_per_execution == "auto"
                per_call = resolve_steps_per_execution("auto", step_seconds) if auto else loop.per_call
                every = sync_every_calls(per_call * step_seconds)  # the decision's cadence, in calls
                if auto or self._boundary.sync:
                    # Each worker timed its own call; the chief's counts win on every worker,
                    # always: per-call collectives (the checkpoint/SIGTERM decision, the
                    # callbacks' stop flag) need the same call boundaries everywhere, or ranks
                    # wait in different collectives (the intermittent multiworker hang of #13).
                    per_call, every = chief_ints(self.backend, per_call, every)
                loop.per_call = per_call
                if self._boundary.sync:
                    self._boundary.every_calls = every
        loop.t_last = now
        loop.diverged_step = self._consume(loop, values, tracker)
        if ada is not None:
            loop.gains.extend(values["gain"].tolist())
            self._finished = values["tau"][-1] >= ada.total_base_steps if n else True
        loop.step += n
        if loop.diverged_step is not None:
            return False
        if self._hooks.active and self._hooks.sync_stop():
            loop.stopped = True
        return True

    def _evaluation(self, loop: LoopState, eval_fn) -> None:
        """At an evaluation step: validation metrics and the history record, then the callbacks
        (target, progress, early stopping, the users', the checkpoint); sets loop.stopped when
        the run should end."""
        step = loop.step
        # One copy of each replica's own state (BatchNorm's moving statistics), so the metrics
        # below are those of the model distbatch returns and saves; then every rank must agree.
        self.backend.average_replica_state(self.model.non_trainable_variables)
        check_ranks_agree(self.backend, self.model, step)  # before the callbacks act
        val = self._evaluate(eval_fn) if self.val_source is not None else {}
        train = self._means(loop.sums)
        loop.sums = zero_sums(self.task.state_size)
        rec = {"step": step, "epoch": round(self._epoch_at(step), 4),
               **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()}, "lr": loop.last_lr}
        loop.history.append(rec)
        epoch = len(loop.history) - 1  # a Keras epoch index counts evaluations
        if self._hooks.epoch_end(epoch, rec):
            loop.stopped = True
        self._hooks.after_epoch_end(epoch, {**rec, "end": self._at_end(step)})
        if not loop.stopped and step < self.opt.total_steps and not self._finished:
            self._hooks.epoch_begin(epoch + 1)

    def _means(self, sums: dict) -> dict:
        """{"loss": mean loss, <metric>: result} of running sums."""
        count = sums["steps"] * self.plan.global_batch_size
        return {"loss": sums["loss_sum"] / count if count else float("nan"),
                **self.task.results(sums["metrics"])}

    def _finish(self, loop: LoopState, eval_fn, tracker, wall: float) -> dict:
        """The run's summary metrics (summary.json), with early stopping's best weights
        restored and the final weights evaluated on (part of) the training set."""
        step, c, ada, es = loop.step, loop.counters, self.adascale, self._early_stopping
        self.backend.average_replica_state(self.model.non_trainable_variables)
        last = loop.history[-1] if loop.history else {}
        train_time = c["train_time"]
        metrics = {
            "steps": step, "epochs": round(self._epoch_at(step), 4),
            **{k: v for k, v in last.items() if k.startswith(("train_", "val_"))},
            "samples_per_sec": c["timed_samples"] / train_time if train_time > 0 else None,
            "train_time_s": train_time, "wall_time_s": wall,
            "steps_to_target": c["steps_to_target"], "time_to_target_s": c["time_to_target"],
            "diverged": loop.diverged_step is not None, "diverged_step": loop.diverged_step,
            "steps_per_execution": loop.per_call,
        }
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            metrics.setdefault(k, None)
        if ada is not None:
            tau = float(ada.tau.numpy())
            # tau is the sum of all gains so far, over the whole run (also after a resume).
            gains = loop.gains
            mean_gain = tau / step if step else None
            metrics.update(adascale_scale=ada.scale, adascale_mean_gain=mean_gain,
                           adascale_final_gain=gains[-1] if gains else None,
                           scale_invariant_steps=tau, base_steps_budget=ada.total_base_steps)
        if tracker is not None:
            metrics["b_simple"] = tracker.b_simple
            metrics["b_simple_trajectory"] = self._trajectory[:: max(1, len(self._trajectory) // 50)]
        if es is not None and es.best_weights is not None:  # (restored by its on_train_end)
            val = self._evaluate(eval_fn)
            # Train metrics of the restored point too, so the generalization gap compares
            # train and validation of the SAME weights (not last train vs best val).
            at_best = next((r for r in loop.history if r["step"] == es.best_step), {})
            metrics.update({k: v for k, v in at_best.items() if k.startswith("train_")})
            metrics.update(best_step=es.best_step, best_epoch=es.best_data_epoch,
                           stopped_epoch=round(self._epoch_at(step), 4), stopped_early=loop.stopped,
                           restored_metric=self.opt.early_stopping_metric,
                           restored_value=float(es.best), **{f"val_{k}": v for k, v in val.items()})
        head = getattr(self.train_source, "head", None)
        if loop.diverged_step is None and head is not None and self.val_source is not None:
            # The generalization gap needs train metrics of the FINAL weights, evaluated like
            # validation (the per-window running averages lag behind a model that improves).
            n_val = self.val_source.num_examples(1) if hasattr(self.val_source, "head") else 4096
            n = min(self.train_source.num_examples(1), max(n_val, 1))
            train = self._evaluate(eval_fn, head(n))
            metrics.update({f"{k}_running": metrics.get(k) for k in ("train_loss", "train_accuracy")})
            metrics.update({f"train_{k}": v for k, v in train.items()}, train_eval_examples=n)
        if loop.history and "val_loss" in loop.history[0]:
            lows = min(loop.history, key=lambda r: r["val_loss"])
            metrics["best_val_loss_epoch"] = lows["epoch"]
        return metrics

    def _epoch_at(self, step: int) -> float:
        """Absolute epoch after `step` global steps (each segment at its own steps per epoch)."""
        return self._seg.start_epoch + (step - self._seg.start_step) / self.plan.steps_per_epoch

    def _consume(self, loop: LoopState, values: dict, tracker) -> int | None:
        """Take the per-step outputs of one call (steps step+1 .. step+n) on the host: running
        sums, the noise-scale averages, one TensorBoard point and batch hook per log window
        (the window's mean loss and metrics, the lr and B_simple of its last step). Returns the
        first step whose loss is not finite, if any. Per-step values are added one by one, so
        the sums do not depend on how the steps were grouped into calls."""
        gb, step = self.plan.global_batch_size, loop.step
        logging = self._hooks.wants_batches
        lrs = values["lr"].tolist()
        for i, loss_sum in enumerate(values["loss_sum"].tolist()):
            s = step + i + 1
            if not math.isfinite(loss_sum):
                self._hooks.batch_end(s, {"loss": loss_sum})  # (Keras TerminateOnNaN sees it)
                return s
            for acc in (loop.sums, loop.window):
                acc["loss_sum"] += loss_sum
                acc["metrics"] += values["metrics"][i]
                acc["steps"] += 1
            if tracker is not None:
                tracker.update(float(values["small_sq"][i]), float(values["big_sq"][i]), s)
            if logging and self._at_log(s):
                scalars = {**self._means(loop.window), "learning_rate": lrs[i], "global_batch_size": gb}
                if tracker is not None and tracker.b_simple is not None:
                    scalars["b_simple"] = tracker.b_simple
                if "gain" in values:
                    scalars.update(adascale_gain=float(values["gain"][i]),
                                   adascale_tau=float(values["tau"][i]))
                self._hooks.batch_end(s, scalars)
                loop.window = zero_sums(self.task.state_size)
        if lrs:
            loop.last_lr = lrs[-1]
        return None

    def _evaluate(self, eval_fn, source=None) -> dict:
        """Exact {"loss", <metric>...} over ALL of `source` (default: validation), in one call."""
        if source is None:
            if self._val_iterator is None:
                self._val_iterator = eval_iterator(self.backend, self.plan, self.val_source, repeat=True)
            source, iterator = self.val_source, self._val_iterator
        else:
            iterator = eval_iterator(self.backend, self.plan, source, repeat=False)
        return run_evaluation(self.backend, eval_fn, self.task, source, iterator)
