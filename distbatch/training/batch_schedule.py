"""Batch-size schedules: raise the global batch at given epochs instead of decaying the lr.

Smith, Kindermans, Le 2017, "Don't Decay the Learning Rate, Increase the Batch
Size" (arXiv:1711.00489): SGD's noise scale is g ~ lr * N / B (N training
examples, B batch), so multiplying B by k lowers the noise like dividing the lr
by k, with k times fewer optimizer steps per epoch. distbatch runs a schedule
such as ``batch_size_schedule="0:64,10:128,20:256"`` (epoch:global batch) as a
sequence of fixed-batch segments:

    segment i covers epochs [e_i, e_{i+1})  (the last one ends at the run's epochs)
    plan_i   = BatchPlan(global batch B_i)   per-replica batch and steps re-derived
    steps_i  = round((e_{i+1} - e_i) * floor(N / B_i))
    start_i  = steps_0 + ... + steps_{i-1}   (global step where segment i starts)

Each segment is one Trainer run on the SAME model and optimizer, so the
optimizer's step counter (and with it the lr schedule, momentum and slots)
runs on across segments. The data order is the same function of
(seed, absolute epoch) as in a fixed-batch run (pipeline.train_dataset's
``epoch_offset``), which is why schedule points must be whole epochs.

Learning rate (a choice, documented in docs/choosing_batch_size.md): a function
of the GLOBAL step: the warmup of the recipe, then the CONSTANT peak lr scaled
for the FIRST batch B_0 (``scaled_learning_rate(base_lr, base_batch, B_0)``).
Batch growth replaces the decay, as in Smith et al.; an lr decay on top
(decay cosine/linear, or decay_epochs) is refused rather than
guessed at. Warmup given in epochs is converted with the schedule's own
steps-per-epoch of each segment.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from distbatch.errors import ParameterError, require_param
from distbatch.training.plan import BatchPlan


def parse_batch_schedule(schedule) -> list[tuple[int, int]]:
    """"0:64,10:128" or [(0, 64), (10, 128)] -> [(0, 64), (10, 128)]: whole epochs, strictly
    increasing, from 0; batches >= 1. Errors name the parameter batch_size_schedule."""
    def bad(message: str):
        raise ParameterError("{batch_size_schedule} " + message, "batch_size_schedule")

    if isinstance(schedule, str):
        items = []
        for part in schedule.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                e_text, b_text = part.split(":")
                items.append((float(e_text), int(b_text), part))
            except ValueError:
                bad(f"entries must be EPOCH:BATCH, got {part!r} in {schedule!r}")
    elif isinstance(schedule, (list, tuple)):
        items = []
        for point in schedule:
            if (not isinstance(point, (list, tuple)) or len(point) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
                    or int(point[1]) != point[1]):
                bad(f"entries must be (epoch, global batch) pairs of numbers, got {point!r}")
            items.append((float(point[0]), int(point[1]), repr(tuple(point))))
    else:
        bad(f"must be 'E0:B0,E1:B1,...' or a list of (epoch, global batch) pairs, got "
            f"{type(schedule).__name__} {schedule!r}")
    points: list[tuple[int, int]] = []
    for epoch_f, batch, text in items:
        if not (math.isfinite(epoch_f) and epoch_f >= 0 and epoch_f == int(epoch_f)):
            bad(f"epochs must be whole numbers >= 0 (data order is per epoch), got {text} in "
                f"{schedule!r}")
        if batch < 1:
            bad(f"batches must be >= 1, got {batch} in {schedule!r}")
        points.append((int(epoch_f), batch))
    if not points:
        bad(f"needs at least one EPOCH:BATCH, got {schedule!r}")
    if points[0][0] != 0:
        bad(f"must start at epoch 0, got {points[0][0]} in {schedule!r}")
    epochs = [e for e, _ in points]
    if not all(b > a for a, b in zip(epochs, epochs[1:])):
        bad(f"epochs must increase strictly, got {epochs}")
    return points


@dataclass(frozen=True)
class Segment:
    """One fixed-batch stretch of a schedule."""
    start_epoch: int
    end_epoch: float
    plan: BatchPlan
    start_step: int   # global steps done before this segment
    steps: int

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


@dataclass(frozen=True)
class BatchSchedule:
    segments: tuple[Segment, ...]

    @property
    def total_steps(self) -> int:
        return self.segments[-1].end_step

    @property
    def first_plan(self) -> BatchPlan:
        return self.segments[0].plan

    def global_step_at_epoch(self, epoch: float) -> int:
        """Global step reached after `epoch` epochs (each segment at its own steps/epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        for seg in self.segments:
            if epoch <= seg.end_epoch or seg is self.segments[-1]:
                within = max(0.0, epoch - seg.start_epoch)
                return seg.start_step + int(math.floor(within * seg.plan.steps_per_epoch + 0.5))
        raise AssertionError("unreachable")

    def as_dict(self) -> list[dict]:
        return [{"start_epoch": s.start_epoch, "end_epoch": s.end_epoch,
                 "global_batch_size": s.plan.global_batch_size,
                 "per_replica_batch_size": s.plan.per_replica_batch_size,
                 "steps_per_epoch": s.plan.steps_per_epoch,
                 "start_step": s.start_step, "steps": s.steps} for s in self.segments]


def plan_schedule(schedule, *, epochs: float, replicas: int, accumulation_steps: int = 1,
                  num_train_examples: int) -> BatchSchedule:
    """Turn (epoch, global batch) points ("0:64,10:128" or pairs) and the run length into
    fixed-batch segments."""
    points = parse_batch_schedule(schedule)
    require_param(epochs is not None and epochs > 0, f"{{batch_size_schedule}} needs {{epochs}} > 0 "
                  f"(the batch changes at epochs), got {epochs}", "batch_size_schedule", "epochs")
    last = points[-1][0]
    require_param(last < epochs, f"{{batch_size_schedule}} point at epoch {last} is not before the "
                  f"end of training ({{epochs}} {epochs:g})", "batch_size_schedule", "epochs")
    segments, start_step = [], 0
    for i, (start, batch) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else float(epochs)
        plan = BatchPlan.derive(global_batch_size=batch, replicas=replicas,
                                accumulation_steps=accumulation_steps,
                                num_train_examples=num_train_examples, param="batch_size_schedule")
        steps = int(math.floor((end - start) * plan.steps_per_epoch + 0.5))
        require_param(steps >= 1, f"{{batch_size_schedule}} segment from epoch {start} to {end:g} at "
                      f"batch {batch} has no optimizer step ({plan.steps_per_epoch} steps/epoch)",
                      "batch_size_schedule")
        segments.append(Segment(start, end, plan, start_step, steps))
        start_step += steps
    return BatchSchedule(tuple(segments))


def check_schedule_run(schedule, *, global_batch_size, steps, epochs, early_stopping: bool,
                       resume: bool, recipe=None) -> None:
    """What of a run interacts with its batch_size_schedule, checked before anything is built."""
    points = parse_batch_schedule(schedule)
    require_param(steps is None, f"{{batch_size_schedule}} needs the length in {{epochs}} (the batch "
                  f"changes at epochs), got {{steps}} {steps}", "batch_size_schedule", "epochs", "steps")
    require_param(global_batch_size is None or global_batch_size == points[0][1],
                  f"{{global_batch_size}} {global_batch_size} disagrees with the first batch of "
                  f"{{batch_size_schedule}} ({points[0][1]}); give only the schedule",
                  "global_batch_size", "batch_size_schedule")
    require_param(not early_stopping, "{early_stopping_metric} is not supported with "
                  "{batch_size_schedule} yet", "early_stopping_metric", "batch_size_schedule")
    require_param(not resume, "{resume} is not supported with {batch_size_schedule} yet",
                  "resume", "batch_size_schedule")
    if epochs is not None:
        require_param(points[-1][0] < epochs, f"{{batch_size_schedule}} point at epoch {points[-1][0]} "
                      f"is not before the end of training ({{epochs}} {epochs:g})",
                      "batch_size_schedule", "epochs")


def schedule_recipe(recipe, schedule: BatchSchedule):
    """The Recipe to build for a schedule: constant lr after warmup, warmup in steps.

    The default ``decay="step"`` (with no ``decay_epochs``) becomes ``constant``: the
    batch growth is the decay. Explicit decays are refused.
    """
    if recipe.decay in ("cosine", "linear") or recipe.decay_epochs:
        milestones = (" {decay_epochs} " + ",".join(f"{e:g}" for e in recipe.decay_epochs)
                      if recipe.decay_epochs else "")
        raise ParameterError(f"{{batch_size_schedule}} replaces lr decay (Smith et al. 2017); got "
                             f"{{decay}} {recipe.decay}{milestones}; use {{decay}} constant or drop "
                             f"the schedule", "batch_size_schedule", "decay", "decay_epochs")
    changes = {"decay": "constant"}
    if recipe.warmup_epochs is not None and recipe.warmup != "none":
        changes.update(warmup_steps=schedule.global_step_at_epoch(recipe.warmup_epochs),
                       warmup_epochs=None)
    return dataclasses.replace(recipe, **changes)

