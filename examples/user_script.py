"""A user's own training script: TFRecords, a regression model, sample weights, a callback.

The same file runs unchanged on one device, on several local devices and on several
processes; only the launcher changes:

    python examples/user_script.py --data-dir DATA --out OUT                        # one device
    python examples/user_script.py --data-dir DATA --out OUT --backend mirrored --cpu-replicas 2
    horovodrun -np 2 -H localhost:2 --gloo python examples/user_script.py --data-dir DATA --out OUT
    distbatch launch multiworker --workers 2 -- python examples/user_script.py --data-dir DATA --out OUT

DATA holds train-*.tfrecord and val-*.tfrecord files of tf.train.Example records with
features x (float list of length --features), y (float), w (float: the example's
sample weight) and id (int). `python examples/user_script.py --write-demo-data DATA`
writes a small synthetic set there. --global-batch-size is the batch of ONE step over
all replicas, whatever the launcher.

Every rank writes OUT/rank<i>.json (its backend, history, the callback's logs, final
metrics) and OUT/rank<i>.npz (its final weights), so ranks can be compared; the
callback runs on the chief only (rank 0), with the global metrics.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

FEATURES = 8


def parse_fn(serialized):
    """One record -> (x, y, sample_weight)."""
    import tensorflow as tf
    ex = tf.io.parse_single_example(serialized, {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "y": tf.io.FixedLenFeature([1], tf.float32),
        "w": tf.io.FixedLenFeature([], tf.float32),
        "id": tf.io.FixedLenFeature([], tf.int64),  # not a model input; handy for checking coverage
    })
    return ex["x"], ex["y"], ex["w"]


def build_model():
    import keras
    return keras.Sequential([keras.Input((FEATURES,)),
                             keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(1)])


def make_callback():
    import keras

    class EpochLogs(keras.callbacks.Callback):
        """Keeps what Keras passes to on_epoch_end."""

        def __init__(self):
            super().__init__()
            self.logs = []

        def on_epoch_end(self, epoch, logs=None):
            self.logs.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})

    return EpochLogs()


def write_demo_data(directory, *, train_files=4, per_file=48, val=40, seed=0):
    """Synthetic regression records: y = x . v + noise, weights in {0.5, 1, 2}."""
    import tensorflow as tf
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    v = rng.normal(size=FEATURES).astype(np.float32)
    names = [f"train-{f:03d}.tfrecord" for f in range(train_files)] + ["val-000.tfrecord"]
    sizes = [per_file] * train_files + [val]
    next_id = 0
    for name, n in zip(names, sizes):
        with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
            for _ in range(n):
                x = rng.normal(size=FEATURES).astype(np.float32)
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                    "y": tf.train.Feature(float_list=tf.train.FloatList(
                        value=[float(x @ v + 0.1 * rng.normal())])),
                    "w": tf.train.Feature(float_list=tf.train.FloatList(
                        value=[float(rng.choice([0.5, 1.0, 2.0]))])),
                    "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[next_id])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                             .SerializeToString())
                next_id += 1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder with train-*.tfrecord and val-*.tfrecord")
    p.add_argument("--out", default="user_script_out", help="folder for rank<i>.json/.npz")
    p.add_argument("--backend", default="auto", help="auto, single, mirrored, multiworker, horovod")
    p.add_argument("--cpu-replicas", type=int, help="mirrored on CPU: this many logical devices")
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="0: the plain file order (runs on different layouts then see the same batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-demo-data", metavar="DIR", help="write a small synthetic data set and exit")
    args = p.parse_args(argv)
    if args.write_demo_data:
        write_demo_data(args.write_demo_data)
        return {}
    if not args.data_dir:
        p.error("--data-dir is required (or --write-demo-data DIR first)")

    import keras

    import distbatch
    from distbatch.data import files

    backend, _ = distbatch.create_backend(args.backend, cpu_replicas=args.cpu_replicas)
    logger = make_callback()
    result = distbatch.fit(
        model_fn=build_model,
        optimizer_fn=lambda: keras.optimizers.SGD(args.lr, momentum=0.9),
        data=files(os.path.join(args.data_dir, "train-*.tfrecord"), parse_fn,
                   shuffle_buffer=args.shuffle_buffer),
        validation_data=files(os.path.join(args.data_dir, "val-*.tfrecord"), parse_fn, shuffle_buffer=0),
        loss=keras.losses.MeanSquaredError(), metrics=["mae"], callbacks=[logger],
        global_batch_size=args.global_batch_size, epochs=args.epochs, backend=backend, seed=args.seed)

    # Every rank writes its own report (a real script would write on backend.is_chief only).
    rank = backend.worker_index
    report = {"rank": rank, "backend": backend.name, "num_replicas": backend.num_replicas,
              "num_workers": backend.num_workers, "history": result.history,
              "callback_logs": logger.logs, "metrics": result.metrics}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), *result.model.get_weights())
    if backend.is_chief:
        print(f"{backend.name} x{backend.num_replicas}: " + ", ".join(
            f"{k}={result.history[k][-1]:.4f}" for k in ("loss", "mae", "val_loss", "val_mae")))
    return report


if __name__ == "__main__":
    main()
