"""TensorFlow's "Distributed training with Keras" tutorial (MirroredStrategy,
tensorflow/docs site/en/tutorials/distribute/keras.ipynb) as a script, ported to
distbatch. docs/porting.md shows the original, this port and the diff.

    python examples/tf_distribute_keras.py                                  # one device
    python examples/tf_distribute_keras.py --backend mirrored --cpu-replicas 2
    distbatch launch multiworker --workers 2 -- python examples/tf_distribute_keras.py

Offline: the data are scikit-learn's bundled 8x8 digits (distbatch.load_dataset("digits"),
as a tf.data.Dataset of single examples), not MNIST from tensorflow_datasets, which the
tutorial downloads.

What changed: no strategy object and no strategy.scope() (the backend opens its scope
around model_fn and the optimizer); the dataset is NOT batched (distbatch batches it to
the global batch and shards it); the batch is the GLOBAL batch, not 64 x
num_replicas_in_sync, so the run does not change with the number of devices; the
learning-rate decay is a schedule on the optimizer instead of a LearningRateScheduler
callback (callbacks run on the chief only, so a callback that changed the optimizer
would change the chief's alone); evaluation uses the exact validation metrics distbatch
reports.
"""
from __future__ import annotations

import argparse
import os

import keras
import tensorflow as tf

import distbatch


def scale(image, label):
    return tf.cast(image, tf.float32), label  # digits are already in [0, 1]; MNIST: / 255


def build_model():
    return keras.Sequential([
        keras.Input((8, 8, 1)),  # MNIST: (28, 28, 1)
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


class PrintLR(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        print(f"Learning rate for epoch {epoch + 1} is {logs['lr']:.0e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--global-batch-size", type=int, default=64,
                   help="examples per step over all replicas (the tutorial: 64 per replica)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="tf_distribute_keras_out", help="checkpoints and TensorBoard logs")
    p.add_argument("--backend", default="auto")
    p.add_argument("--cpu-replicas", type=int)
    args = p.parse_args(argv)
    # First, before any TensorFlow op: logical CPU devices can only be made before TF starts.
    backend, _ = distbatch.create_backend(args.backend, cpu_replicas=args.cpu_replicas)
    print(f"Number of devices: {backend.num_replicas}")

    data = distbatch.load_dataset("digits")
    train_dataset = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).map(scale)
    eval_dataset = tf.data.Dataset.from_tensor_slices((data.x_val, data.y_val)).map(scale)

    # The tutorial's decay(epoch): 1e-3 for epochs 0-2, 1e-4 for 3-6, 1e-5 after, by step.
    steps_per_epoch = data.train_size // args.global_batch_size
    decay = keras.optimizers.schedules.PiecewiseConstantDecay(
        [3 * steps_per_epoch, 7 * steps_per_epoch], [1e-3, 1e-4, 1e-5])

    checkpoint_prefix = os.path.join(args.out, "training_checkpoints", "ckpt_{epoch}.weights.h5")
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=os.path.join(args.out, "logs")),
        keras.callbacks.ModelCheckpoint(filepath=checkpoint_prefix, save_weights_only=True),
        PrintLR(),
    ]
    result = distbatch.fit(
        model_fn=build_model,
        optimizer_fn=lambda: keras.optimizers.Adam(decay),
        data=train_dataset, validation_data=eval_dataset,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], callbacks=callbacks,
        global_batch_size=args.global_batch_size, epochs=args.epochs, backend=backend)
    if backend.is_chief:
        print(f"Eval loss: {result.metrics['val_loss']}, Eval Accuracy: {result.metrics['val_accuracy']}")
    return result


if __name__ == "__main__":
    main()
