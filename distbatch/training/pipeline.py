"""Input pipelines: one shuffle per epoch, split across workers and replicas.

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

import numpy as np

from distbatch.training.plan import BatchPlan


def epoch_permutation(tf, n: int, seed: int, epoch):
    """A permutation of range(n), a pure function of (seed, epoch), equal on every worker."""
    keys = tf.random.stateless_uniform([n], seed=tf.stack([tf.cast(seed, tf.int64),
                                                           tf.cast(epoch, tf.int64)]))
    return tf.argsort(keys, stable=True)


def train_dataset(x: np.ndarray, y: np.ndarray, plan: BatchPlan, *, seed: int, worker_index: int,
                  local_replicas: int, start_step: int = 0, total_steps: int,
                  epoch_offset: int = 0):
    """Per-worker dataset: element i is the [K*b] batch of local replica i % L.

    Epoch e of this dataset uses the permutation of absolute epoch `epoch_offset + e`,
    so a batch-size schedule segment starting at epoch E sees the same example order
    as any other run at epoch E (steps count from the segment's start).
    """
    import tensorflow as tf
    n, B, R, K = plan.num_train_examples, plan.global_batch_size, plan.replicas, plan.accumulation_steps
    b, L, S = plan.per_replica_batch_size, local_replicas, plan.steps_per_epoch
    xs, ys = tf.constant(x), tf.constant(y)
    epochs_needed = math.ceil(total_steps / S)

    def epoch_indices(e):
        perm = epoch_permutation(tf, n, seed, e)[: S * B]
        perm = tf.reshape(perm, [S, K, R, b])[:, :, worker_index * L:(worker_index + 1) * L, :]
        perm = tf.reshape(tf.transpose(perm, [0, 2, 1, 3]), [S * L, K * b])
        return tf.data.Dataset.from_tensor_slices(perm)

    ds = (tf.data.Dataset.range(epoch_offset, epoch_offset + epochs_needed).flat_map(epoch_indices)
          .skip(start_step * L).take((total_steps - start_step) * L))
    ds = ds.map(lambda idx: (tf.gather(xs, idx), tf.gather(ys, idx)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batch_size(plan: BatchPlan, num_val: int) -> int:
    """Per-replica evaluation batch: at least the training one, at most what the set needs."""
    return max(1, min(max(plan.per_replica_batch_size * plan.accumulation_steps, 256),
                      math.ceil(num_val / plan.replicas)))


def eval_dataset(x: np.ndarray, y: np.ndarray, plan: BatchPlan, *, worker_index: int,
                 local_replicas: int):
    """Per-worker validation dataset of (x, y, mask); padded entries have mask 0."""
    import tensorflow as tf
    n, R, L = len(x), plan.replicas, local_replicas
    eb = eval_batch_size(plan, n)
    steps = math.ceil(n / (R * eb))
    idx = np.full(steps * R * eb, -1, dtype=np.int64)
    idx[:n] = np.arange(n)
    idx = idx.reshape(steps, R, eb)[:, worker_index * L:(worker_index + 1) * L, :].reshape(steps * L, eb)
    xs, ys = tf.constant(x), tf.constant(y)

    def gather(i):
        mask = tf.cast(i >= 0, tf.float32)
        i = tf.maximum(i, 0)
        return tf.gather(xs, i), tf.gather(ys, i), mask

    return tf.data.Dataset.from_tensor_slices(idx).map(gather).prefetch(tf.data.AUTOTUNE)


def eval_steps(plan: BatchPlan, num_val: int) -> int:
    return math.ceil(num_val / (plan.replicas * eval_batch_size(plan, num_val)))
