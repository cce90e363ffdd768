"""Horovod's Keras MNIST example (horovod/examples/tensorflow2/tensorflow2_keras_mnist.py),
ported to distbatch. docs/porting.md shows the original, this port and the diff.

    python examples/horovod_keras_mnist.py                                   # one device
    horovodrun -np 2 -H localhost:2 --gloo python examples/horovod_keras_mnist.py
    distbatch launch multiworker --workers 2 -- python examples/horovod_keras_mnist.py

Offline: the data are scikit-learn's bundled 8x8 digits (distbatch.load_dataset("digits"),
1437 training and 360 validation images), not MNIST, which the original downloads.

What changed: no hvd.init, GPU pinning, DistributedOptimizer, broadcast or metric-average
callbacks (the backend does all of that, and metrics are exact global values); the batch
is the GLOBAL batch (Horovod's is per rank: 128 x hvd.size()), so the learning rate is
scaled by global batch / 128, not by hvd.size(), and the run is the same on any number of
processes; the warm-up is a learning-rate schedule (a pure function of the step) instead
of a callback; ModelCheckpoint and printing happen on the chief only, without an
`if hvd.rank() == 0`.
"""
from __future__ import annotations

import argparse
import os

import keras
import tensorflow as tf

import distbatch
from distbatch.recipes.schedules import ConstantSchedule


def build_model():
    return keras.Sequential([
        keras.Input((8, 8, 1)),  # MNIST: (28, 28, 1)
        keras.layers.Conv2D(32, [3, 3], activation="relu"),
        keras.layers.Conv2D(64, [3, 3], activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Dropout(0.25),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--global-batch-size", type=int, default=128,
                   help="examples per step over ALL processes (Horovod's example: 128 per rank)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the training set")
    p.add_argument("--warmup-epochs", type=float, default=1)
    p.add_argument("--out", default="horovod_keras_mnist_out", help="checkpoints go here")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    # First, before any TensorFlow op: MultiWorkerMirroredStrategy (a TF_CONFIG launch)
    # must be created at program start-up.
    backend, _ = distbatch.create_backend(args.backend)

    data = distbatch.load_dataset("digits")  # offline; the original downloads MNIST
    mnist_images, mnist_labels = data.x_train, data.y_train
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.cast(mnist_images, tf.float32),
                 tf.cast(mnist_labels, tf.int64))
    )  # single examples: distbatch shuffles (10,000-example buffer) and batches

    batch_size = args.global_batch_size  # GLOBAL: all processes together
    # The linear scaling rule (Goyal et al. 2017): 0.001 per 128 examples in a step.
    scaled_lr = 0.001 * batch_size / 128
    steps_per_epoch = data.train_size // batch_size
    warmup = distbatch.WarmupSchedule(ConstantSchedule(scaled_lr), start_lr=0.001,
                                      warmup_steps=max(1, round(args.warmup_epochs * steps_per_epoch)))

    os.makedirs(args.out, exist_ok=True)
    callbacks = [
        keras.callbacks.ModelCheckpoint(os.path.join(args.out, "checkpoint-{epoch}.keras")),
    ]
    result = distbatch.fit(
        model_fn=build_model, optimizer_fn=lambda: keras.optimizers.Adam(warmup),
        data=dataset, validation_data=(data.x_val, data.y_val),
        loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"],
        callbacks=callbacks, global_batch_size=batch_size, epochs=args.epochs,
        backend=backend, verbose=True)
    return result


if __name__ == "__main__":
    main()
