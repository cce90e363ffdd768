"""A global batch that adapts while training: maximise goodput (Pollux, Qiao et al., OSDI 2021).

    GOODPUT(B)    = THROUGHPUT(B) x EFFICIENCY(B)
    EFFICIENCY(B) = (B_noise + B0) / (B_noise + B)

B0 is the base batch (the one the schedule was written for), B_noise the
gradient noise scale B_simple (McCandlish et al. 2018), read from AdaScale's
moving averages; EFFICIENCY(B) is AdaScale's gain divided by S = B / B0: the
progress one example makes at batch B relative to the base batch. The
learning rate follows AdaScale's gain, so each candidate batch trains with the
rate it needs.

THROUGHPUT(B) comes from a model of the step time fitted to measurements,
t(B) = alpha + beta x B (a fixed cost per step: synchronisation, dispatch;
plus a cost per example), first from a short probe of every candidate on a
throwaway copy of the model, then from the real segments as they run (a
measured batch replaces its probe point).

distbatch decides at data-epoch boundaries (the example order is one
permutation per epoch, as for fixed batches and batch-size schedules), and
switches only when the predicted goodput gain is at least MIN_GAIN (Pollux:
~5%). The decision is a pure function of values that are identical on every
rank (all-reduced statistics and the slowest rank's step times), so every
rank changes batch at the same step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from distbatch.data.inputs import num_train_examples
from distbatch.training.plan import BatchPlan
from distbatch.training.step import StepOptions, make_train_step, noise_splits_for


MIN_GAIN = 0.05


def efficiency(batch: float, b_noise: float, base_batch: float) -> float:
    """(B_noise + B0) / (B_noise + B): 1 at the base batch, B0/B when there is no noise."""
    if b_noise is None or not math.isfinite(b_noise):
        return 1.0 if batch == base_batch else base_batch / batch
    b_noise = max(0.0, b_noise)
    return (b_noise + base_batch) / (b_noise + batch)


@dataclass(frozen=True)
class ThroughputModel:
    """Step time t(B) = alpha + beta * B (seconds), least squares over measured points."""
    alpha: float
    beta: float

    @classmethod
    def fit(cls, step_seconds: dict[int, float]) -> "ThroughputModel":
        pts = [(float(b), float(t)) for b, t in step_seconds.items() if t > 0 and math.isfinite(t)]
        if not pts:
            raise ValueError("step_seconds: need at least one measured (batch, seconds) point")
        if len({b for b, _ in pts}) == 1:  # one batch size: all of it per example
            b, t = pts[0]
            return cls(0.0, t / b)
        n = len(pts)
        mb, mt = sum(b for b, _ in pts) / n, sum(t for _, t in pts) / n
        beta = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
        beta = max(beta, 1e-12)
        alpha = max(0.0, mt - beta * mb)
        return cls(alpha, beta)

    def step_seconds(self, batch: float) -> float:
        return self.alpha + self.beta * batch

    def samples_per_sec(self, batch: float) -> float:
        return batch / self.step_seconds(batch)


def goodput(batch: int, model: ThroughputModel, b_noise: float | None, base_batch: int) -> float:
    return model.samples_per_sec(batch) * efficiency(batch, b_noise, base_batch)


def choose_batch(candidates: Sequence[int], model: ThroughputModel, b_noise: float | None,
                 base_batch: int, current: int, min_gain: float = MIN_GAIN) -> int:
    """The candidate with the highest goodput; `current` unless that beats it by min_gain."""
    best = max(candidates, key=lambda b: (goodput(b, model, b_noise, base_batch), -b))
    if goodput(best, model, b_noise, base_batch) > (1 + min_gain) * goodput(current, model, b_noise, base_batch):
        return best
    return current


def candidate_batches(base_batch: int, max_batch: int, *, units: int, num_examples: int) -> list[int]:
    """base, 2 x base, 4 x base, ... up to max_batch: a bounded set (each compiles one step),
    each a multiple of units = replicas x accumulation steps and at most the training set."""
    if max_batch < base_batch:
        raise ValueError(f"max_global_batch_size {max_batch} is below the base batch {base_batch}")
    if base_batch > num_examples:  # no candidate at all, whatever the replicas
        raise ValueError(f"the base batch {base_batch} is larger than the training set "
                         f"({num_examples} examples)")
    out, b = [], base_batch
    while b <= min(max_batch, num_examples):
        if b % units == 0:
            out.append(b)
        b *= 2
    if not out:
        raise ValueError(f"no batch from {base_batch} to {max_batch} (doubling) is a multiple of "
                         f"replicas x accumulation steps = {units}")
    return out


def backend_slowest(backend, seconds: float) -> float:
    """The slowest rank's value, identical everywhere (so every rank makes the same choice)."""
    if backend.num_workers == 1:
        return seconds
    return max(backend.gather_from_workers(seconds))


def probe_step_seconds(backend, make_model: Callable, optimizer_fn: Callable, example, batch: int,
                       *, task=None, accumulation_steps: int = 1, steps: int = 30,
                       repeats: int = 3) -> float:
    """Seconds per train step at `batch` (the slowest rank's), on a throwaway model from
    make_model() with the real step (noise statistics on, as in the adaptive run) on copies
    of one example (x, y) of the data; the model being trained is not touched. Compilation
    is not timed; the fastest of `repeats` timed calls counts (other load on the machine
    only ever slows a call)."""
    plan = BatchPlan.derive(global_batch_size=batch, replicas=backend.num_replicas,
                            accumulation_steps=accumulation_steps, num_train_examples=batch)
    with backend.scope():
        model = make_model()
        optimizer = optimizer_fn()
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    per_worker = batch // backend.num_workers // backend.local_replicas
    x, y = tf.nest.map_structure(
        lambda t: np.repeat(np.asarray(t)[:1], per_worker, axis=0), tuple(example))
    step = make_train_step(backend, model, optimizer, plan, task=task,
                           options=StepOptions(noise_scale=True, noise_splits=noise_splits_for(plan)))
    it = backend.iterator(lambda w, L: tf.data.Dataset.from_tensors((x, y)).repeat())
    n = tf.constant(steps, tf.int32)
    with backend.waiting(f"timing batch {batch}: compile"):
        step.multi(it, tf.constant(1, tf.int32))["loss_sum"].numpy()
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        with backend.waiting(f"timing batch {batch}: repeat {r + 1}"):
            step.multi(it, n)["loss_sum"].numpy()
        best = min(best, time.perf_counter() - t0)
    return backend_slowest(backend, best / steps)
