"""Seeds, and bit-identical runs on request."""
from __future__ import annotations

import keras
import tensorflow as tf


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, TensorFlow and Keras (keras.utils.set_random_seed); with
    `deterministic` (`deterministic=True`, or the CLI flag) also TensorFlow's op
    determinism, so two runs of the same configuration on the same backend and hardware end
    bit-identical; an op without a deterministic kernel then raises instead of varying. The
    data order is already a function of the seed (distbatch/data)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
