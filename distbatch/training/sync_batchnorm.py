"""BatchNormalization over the GLOBAL batch on every backend (`sync_batchnorm=True`,
or the CLI flag).

Without it each replica normalises with the moments of its own slice (B / R examples), so R
replicas do not train the model one device trains at B. With it every BatchNormalization
layer in training mode uses the moments of the whole global batch:
- MirroredStrategy / MultiWorkerMirroredStrategy: Keras's own synchronized BatchNormalization
  (`layer.synchronized = True`: sum, sum of squares and count all-reduced across replicas);
- Horovod: the same three sums through Horovod's all-reduce (backend.all_reduce_sum, named
  by the layer's position), as Keras does under a strategy;
- one device: nothing to do.
Masked inputs keep the layer's own (local) moments.
"""
from __future__ import annotations

import keras
import tensorflow as tf


def batchnorm_layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def apply_sync_batchnorm(model, backend) -> int:
    """Make every BatchNormalization layer of `model` use global-batch moments on `backend`;
    returns how many layers it changed. Call before the first step is traced."""
    layers = batchnorm_layers(model)
    if backend.num_replicas == 1:
        return len(layers)
    if hasattr(backend, "strategy"):
        for layer in layers:
            layer.synchronized = True
        return len(layers)
    for k, layer in enumerate(layers):
        layer._moments = _global_moments(layer, layer._moments, backend, f"distbatch_bn_{k}")
    return len(layers)


def _global_moments(layer, local_moments, backend, name: str):
    """layer._moments(inputs, mask) with the sums all-reduced across ranks (Keras's
    _compute_moments_sync, with the backend's all-reduce instead of a replica context's)."""
    def moments(inputs, mask):
        if mask is not None:
            return local_moments(inputs, mask)
        axes = layer._reduction_axes
        x = tf.convert_to_tensor(inputs)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        s, sq, n = backend.all_reduce_sum(
            [tf.reduce_sum(x, axis=axes), tf.reduce_sum(tf.square(x), axis=axes),
             tf.reshape(count, [1])], name=name)
        mean = tf.math.divide_no_nan(s, n)
        variance = tf.maximum(tf.math.divide_no_nan(sq, n) - tf.square(mean), 0.0)
        return mean, variance
    return moments
