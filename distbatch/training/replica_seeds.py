"""Independent random draws on every replica (Dropout, GaussianNoise, random augmentation).

Keras layers draw their masks from a SeedGenerator whose state is a variable. Every replica
holds the same state (a mirrored variable; Horovod broadcasts rank 0's), so every replica drew
the SAME mask for its own slice of the batch: measured on mirrored, 2 replicas, Dropout(0.5),
the two replicas' masks agreed on 100% of the entries. Correlated masks weaken the
regularisation a replica layout should not change. Here each draw of a layer on replica r uses
the layer's seed plus (r * REPLICA_STRIDE, 0): the state still advances identically everywhere
(replicas stay in sync), the draws differ. One device (r = 0) draws exactly as before.

R replicas still do not draw one device's masks for the same examples (masks are drawn per
replica batch, not per example), so a Dropout model equals one device only in distribution
(docs/correctness.md).
"""
from __future__ import annotations

import tensorflow as tf
from keras.src.random.seed_generator import SeedGenerator  # private: Keras has no public name for it

REPLICA_STRIDE = 1_000_003  # a prime: replica r's seeds never meet replica 0's next draws


def decorrelate_replicas(model, backend) -> int:
    """Offset every SeedGenerator of `model`'s layers by the replica's global index; returns
    how many generators were changed (0 on one replica). Idempotent."""
    if backend.num_replicas == 1:
        return 0
    changed = 0
    for layer in model._flatten_layers(include_self=False):
        for gen in _seed_generators(layer):
            if getattr(gen, "_distbatch_offset", False):
                continue
            gen.next = _offset_next(gen.next, backend)
            gen._distbatch_offset = True
            changed += 1
    return changed


def _seed_generators(layer) -> list:
    return [v for v in vars(layer).values() if isinstance(v, SeedGenerator)]


def _offset_next(next_seed, backend):
    def next(ordered=True):
        seed = next_seed(ordered)
        r = tf.cast(backend.replica_index(), seed.dtype)
        return seed + tf.stack([r * REPLICA_STRIDE, tf.zeros_like(r)])
    return next
