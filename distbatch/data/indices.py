"""Which examples each replica reads: one shuffle per epoch, split across workers and replicas.

distbatch shards data itself, identically on every backend, so that 2 replicas
at global batch B see exactly the examples 1 replica sees at global batch B:

  epoch e:   perm = a permutation of the N training examples, seeded by (seed, e),
             the SAME on every worker (Goyal et al. 2017: one shuffle per epoch,
             split across workers);
  step t:    global batch = perm[t*B : (t+1)*B], laid out as
             [accumulation_steps K, replicas R, per_replica_batch b];
  replica r of worker w (r = w*L + l) gets its K micro-batches, concatenated.

Examples past steps_per_epoch * B are dropped (every replica runs the same
number of steps; nobody hangs in a collective). Validation pads the last batch
and carries a 0/1 mask, so metrics cover the WHOLE validation set exactly once.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from distbatch.training.plan import BatchPlan


def epoch_permutation(tf, n: int, seed: int, epoch):
    """A permutation of range(n), a pure function of (seed, epoch), equal on every worker."""
    keys = tf.random.stateless_uniform([n], seed=tf.stack([tf.cast(seed, tf.int64),
                                                           tf.cast(epoch, tf.int64)]))
    return tf.argsort(keys, stable=True)


def train_indices(plan: BatchPlan, *, seed: int, worker_index: int, local_replicas: int,
                  start_step: int = 0, total_steps: int, epoch_offset: int = 0):
    """Per-worker dataset of example indices: element i is the [K*b] index batch of local
    replica i % L (distbatch.data.inputs.ArraySource gathers the examples).

    Epoch e of this dataset uses the permutation of absolute epoch `epoch_offset + e`,
    so a batch-size schedule segment starting at epoch E sees the same example order
    as any other run at epoch E (steps count from the segment's start).
    """
    n, B, R, K = plan.num_train_examples, plan.global_batch_size, plan.replicas, plan.accumulation_steps
    b, L, S = plan.per_replica_batch_size, local_replicas, plan.steps_per_epoch
    epochs_needed = math.ceil(total_steps / S)

    def epoch_indices(e):
        perm = epoch_permutation(tf, n, seed, e)[: S * B]
        perm = tf.reshape(perm, [S, K, R, b])[:, :, worker_index * L:(worker_index + 1) * L, :]
        perm = tf.reshape(tf.transpose(perm, [0, 2, 1, 3]), [S * L, K * b])
        return tf.data.Dataset.from_tensor_slices(perm)

    return (tf.data.Dataset.range(epoch_offset, epoch_offset + epochs_needed).flat_map(epoch_indices)
            .skip(start_step * L).take((total_steps - start_step) * L))


def train_dataset(x: np.ndarray, y: np.ndarray, plan: BatchPlan, *, seed: int, worker_index: int,
                  local_replicas: int, start_step: int = 0, total_steps: int,
                  epoch_offset: int = 0):
    """Per-worker dataset of (x, y) batches from arrays (train_indices, gathered)."""
    xs, ys = tf.constant(x), tf.constant(y)
    ds = train_indices(plan, seed=seed, worker_index=worker_index, local_replicas=local_replicas,
                       start_step=start_step, total_steps=total_steps, epoch_offset=epoch_offset)
    ds = ds.map(lambda idx: (tf.gather(xs, idx), tf.gather(ys, idx)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batch_size(plan: BatchPlan, num_val: int) -> int:
    """Per-replica evaluation batch: at least the training one, at most what the set needs."""
    return max(1, min(max(plan.per_replica_batch_size * plan.accumulation_steps, 256),
                      math.ceil(num_val / plan.replicas)))


def eval_indices(plan: BatchPlan, num_val: int, *, worker_index: int, local_replicas: int):
    """(per-worker dataset of [eb] index batches, batches per local replica); -1 marks padding."""
    R, L = plan.replicas, local_replicas
    eb = eval_batch_size(plan, num_val)
    steps = math.ceil(num_val / (R * eb))
    idx = np.full(steps * R * eb, -1, dtype=np.int64)
    idx[:num_val] = np.arange(num_val)
    idx = idx.reshape(steps, R, eb)[:, worker_index * L:(worker_index + 1) * L, :].reshape(steps * L, eb)
    return tf.data.Dataset.from_tensor_slices(idx), steps
