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
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--warmup-epochs", type=float, default=1)
    p.add_argument("--out", default="horovod_keras_mnist_out", help="checkpoints go here")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)

    data = distbatch.load_dataset("digits")
    B = args.global_batch_size
    # The linear scaling rule (Goyal et al. 2017): 0.001 per 128 examples in a step.
    lr = 0.001 * B / 128
    steps_per_epoch = data.train_size // B
    schedule = distbatch.WarmupSchedule(ConstantSchedule(lr), start_lr=0.001,
                                        warmup_steps=max(1, round(args.warmup_epochs * steps_per_epoch)))
    os.makedirs(args.out, exist_ok=True)
    result = distbatch.fit(
        model_fn=build_model,
        optimizer_fn=lambda: keras.optimizers.Adam(schedule),
        data=(data.x_train, data.y_train),
        validation_data=(data.x_val, data.y_val),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        callbacks=[keras.callbacks.ModelCheckpoint(os.path.join(args.out, "checkpoint-{epoch}.keras"))],
        global_batch_size=B, epochs=args.epochs, backend=args.backend, verbose=True)
    return result


if __name__ == "__main__":
    main()
