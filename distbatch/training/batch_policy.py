"""Batch policies: which global batch the ONE Trainer of a run uses, segment by segment.

A run is a sequence of fixed-batch segments; the Trainer asks its policy for the first
one and, at the end of each, for the next (None: the run ends):

    FixedBatch      one segment: the whole run at one batch
    ScheduledBatch  the segments of a batch-size schedule (batch_schedule.BatchSchedule)
    GoodputBatch    one data epoch per segment, the next batch chosen by goodput
                    (goodput.choose_batch; AdaScale's gain sets the lr)
    RampBatch       one data epoch per segment, the batch raised to the largest candidate
                    not above the measured noise scale B_simple, never lowered
                    (batch_ramp.py; the lr follows the recipe's scaling rule)

Each policy also says what the run's metrics add (``metrics(segments)``): nothing for a
fixed batch; the segments' records, and for the adaptive ones the batch trajectory.

Steps, the history and the data order are absolute: segment i starts at global step
``start_step`` and absolute epoch ``start_epoch`` (the example order is a function of
(seed, absolute epoch), as for fixed batches). The model, optimizer, callbacks, TensorBoard
writer and checkpoints belong to the run, not to a segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from distbatch.training.goodput import ThroughputModel, backend_slowest, choose_batch
from distbatch.training.plan import BatchPlan


@dataclass(frozen=True)
class Segment:
    plan: BatchPlan
    start_step: int
    end_step: int          # an upper bound for GoodputBatch (AdaScale may end it earlier)
    start_epoch: float = 0
    info: dict = field(default_factory=dict)   # what the policy adds to metrics["segments"]


def batch_trajectory(segments: list[dict]) -> list[tuple[int, int]]:
    """[(start step, global batch)] of metrics["segments"]."""
    return [(s["start_step"], s["global_batch_size"]) for s in segments]


class FixedBatch:
    """The whole run at one batch."""

    def __init__(self, plan: BatchPlan, total_steps: int) -> None:
        self.plan, self.total_steps = plan, total_steps

    def first(self) -> Segment:
        return Segment(self.plan, 0, self.total_steps)

    def next(self, done: dict) -> Segment | None:
        return None

    def metrics(self, segments: list[dict]) -> dict:
        return {}


class ScheduledBatch:
    """A batch-size schedule's segments, one after another (batch_schedule.BatchSchedule)."""

    def __init__(self, schedule, learning_rate_fn: Callable[[int], float] | None = None,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.schedule, self.lr, self.log = schedule, learning_rate_fn, log
        self.index = 0

    def _segment(self, i: int) -> Segment:
        seg = self.schedule.segments[i]
        info = {"lr_at_start": float(self.lr(seg.start_step))} if self.lr is not None else {}
        self.log(f"distbatch: segment from epoch {seg.start_epoch}: global batch "
                 f"{seg.plan.global_batch_size} ({seg.plan.per_replica_batch_size} per replica), "
                 f"{seg.plan.steps_per_epoch} steps/epoch, steps {seg.start_step}..{seg.end_step}")
        return Segment(seg.plan, seg.start_step, seg.end_step, seg.start_epoch, info)

    def first(self) -> Segment:
        return self._segment(0)

    def next(self, done: dict) -> Segment | None:
        self.index += 1
        return self._segment(self.index) if self.index < len(self.schedule.segments) else None

    def metrics(self, segments: list[dict]) -> dict:
        return {"segments": segments}


class GoodputBatch:
    """One data epoch per segment; after each, the candidate with the best predicted goodput
    (Pollux) from the measured step times and AdaScale's noise scale. The decision uses values
    identical on every rank (all-reduced statistics, the slowest rank's times), so every rank
    changes batch at the same step."""

    def __init__(self, backend, *, adascale, candidates: list[int], probe: Callable[[int], float],
                 num_train_examples: int, total_steps: int, accumulation_steps: int = 1,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.backend, self.adascale, self.candidates = backend, adascale, candidates
        self.probe, self.n_train, self.total = probe, num_train_examples, total_steps
        self.accumulation, self.log = accumulation_steps, log
        self.measured: dict[int, float] = {}

    def _segment(self, batch: int, step: int, epoch: int) -> Segment:
        plan = BatchPlan.derive(global_batch_size=batch, replicas=self.backend.num_replicas,
                                accumulation_steps=self.accumulation, num_train_examples=self.n_train)
        self.adascale.set_scale(batch / self.adascale.base_batch_size)
        return Segment(plan, step, min(self.total, step + plan.steps_per_epoch), epoch)

    def first(self) -> Segment:
        self.measured = {b: self.probe(b) for b in self.candidates}
        self.log("distbatch: goodput probe (seconds/step): "
                 + ", ".join(f"{b}: {t * 1e3:.2f} ms" for b, t in self.measured.items()))
        return self._segment(self.candidates[0], 0, 0)

    def next(self, done: dict) -> Segment | None:
        step, seg = done["step"], done["segment"]
        b_noise = self.adascale.noise_scale()
        done["info"]["b_noise"] = b_noise
        if step >= self.total or bool(self.adascale.finished()):
            return None
        batch = seg.plan.global_batch_size
        if done.get("samples_per_sec"):  # a real measurement replaces the probe's
            self.measured[batch] = backend_slowest(self.backend, batch / done["samples_per_sec"])
        new = choose_batch(self.candidates, ThroughputModel.fit(self.measured), b_noise,
                           self.adascale.base_batch_size, batch)
        epoch = int(seg.start_epoch) + 1
        self.log(f"distbatch: epoch {epoch}: B_noise "
                 f"{b_noise if b_noise is None else round(b_noise, 1)}, goodput-best batch {new} "
                 f"(was {batch})")
        return self._segment(new, step, epoch)

    def metrics(self, segments: list[dict]) -> dict:
        return {"segments": segments, "batch_trajectory": batch_trajectory(segments)}


def segment_record(seg: Segment, steps: int, samples_per_sec) -> dict:
    """One entry of metrics["segments"]."""
    return {"start_epoch": seg.start_epoch, "start_step": seg.start_step, "steps": steps,
            "global_batch_size": seg.plan.global_batch_size,
            "per_replica_batch_size": seg.plan.per_replica_batch_size,
            "steps_per_epoch": seg.plan.steps_per_epoch, "samples_per_sec": samples_per_sec,
            **seg.info}

