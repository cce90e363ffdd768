"""Reference training programs that benchmarks/loop_overhead.py times against `distbatch train`.

Each is what a user would write instead of distbatch, as one whole process:

  minimal      a one-step-per-call tf.function loop (Keras 3), no strategy or a
               MirroredStrategy over 2 logical CPU devices (--strategy)
  fit          Keras 3 model.compile + model.fit under the same strategy
               (--steps-per-execution 1 is Keras's default)
  hvd-minimal  Horovod's core API with Keras 3 (under horovodrun or `distbatch launch
               horovod`): hvd.init, broadcast of the initial weights,
               hvd.grouped_allreduce(grads, op=hvd.Average) inside the tf.function
  hvd-keras    Horovod's documented Keras workflow on tf_keras (Keras 2): run with
               TF_USE_LEGACY_KERAS=1 in the peer venv (scripts/peer_venv.sh), under
               horovodrun; hvd.DistributedOptimizer plus the callbacks in --callbacks

All train distbatch's --model mlp, mlp-wide or convnet (the same layers, rebuilt here so that
the tf_keras venv needs no distbatch) with sparse categorical cross-entropy from
logits, SGD with momentum and a CONSTANT learning rate (--lr), on the arrays of
--data (an .npz as `distbatch train --dataset` reads it), for exactly --steps steps
of global batch --global-batch-size, one shuffle per epoch, and one pass over the
whole validation set per epoch (every steps_per_epoch = N // global_batch steps)
and after the last step, as distbatch does. Horovod ranks each train on their own
1/size of the training set and evaluate their own part of the validation set.

Every rank prints one line `LOOP_REFS {json}`: steps run (optimizer.iterations),
evaluations, last validation metrics and a checksum of the final weights (equal
on all ranks when the gradients really were averaged).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

CALLBACKS = ("broadcast", "metric_average", "lr_warmup", "lr_schedule")


def build_model(keras, name: str, input_shape: tuple, num_classes: int):
    """distbatch.models.mlp / convnet for 1-D inputs, layer for layer."""
    inputs = keras.Input(input_shape)
    if name in ("mlp", "mlp-wide"):  # mlp-wide: 3 x Dense 2048, ~8.5M parameters (compute-bound)
        x = inputs
        width, depth = (256, 2) if name == "mlp" else (2048, 3)
        for i in range(depth):
            x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    elif name == "convnet":
        x = keras.layers.Reshape((input_shape[0], 1))(inputs)
        for i, filters in enumerate((32, 64, 64)):
            x = keras.layers.Conv1D(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
            if i < 2:
                x = keras.layers.MaxPooling1D(2)(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(128, activation="relu", name="dense_0")(x)
    else:
        raise SystemExit(f"--model must be mlp, mlp-wide or convnet, got {name!r}")
    x = keras.layers.Dense(num_classes, name="logits")(x)
    x = keras.layers.Activation("linear", dtype="float32", name="logits_f32")(x)
    return keras.Model(inputs, x, name=name)


def load(path: str):
    import numpy as np
    with np.load(path) as f:
        return f["x_train"], f["y_train"], f["x_val"], f["y_val"], int(f["y_train"].max()) + 1


def train_dataset(tf, x, y, batch: int, steps: int, seed: int):
    """`steps` batches, reshuffled every epoch; the remainder of an epoch is dropped."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    return ds.batch(batch, drop_remainder=True).repeat().take(steps).prefetch(tf.data.AUTOTUNE)


def make_strategy(tf, name: str):
    if name == "single":
        return tf.distribute.get_strategy()  # the default strategy: no distribution
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    # ReductionToOneDevice is MirroredStrategy's choice on CPUs anyway; distbatch names it too.
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def report(args, *, rank: int, steps: int, evals: int, val_loss, val_acc, weights, **extra) -> None:
    import numpy as np
    checksum = float(sum(np.sum(np.asarray(w, np.float64)) for w in weights))
    row = {"program": args.program, "rank": rank, "steps": steps, "evals": evals,
           "val_loss": float(val_loss), "val_accuracy": float(val_acc), "weights_sum": checksum, **extra}
    print("LOOP_REFS " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------- Keras 3

def run_minimal(args) -> None:
    import keras
    import tensorflow as tf
    strategy = make_strategy(tf, args.strategy)
    x, y, xv, yv, classes = load(args.data)
    B, spe = args.global_batch_size, len(x) // args.global_batch_size
    with strategy.scope():
        model = build_model(keras, args.model, x.shape[1:], classes)
        opt = keras.optimizers.SGD(args.lr, momentum=args.momentum)
        opt.build(model.trainable_variables)  # slots before the first distributed step
    train = iter(strategy.experimental_distribute_dataset(train_dataset(tf, x, y, B, args.steps, args.seed)))
    val = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((xv, yv)).batch(args.val_batch_size * strategy.num_replicas_in_sync))
    sce = keras.losses.sparse_categorical_crossentropy

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(sce(y, model(x, training=True), from_logits=True),
                                              global_batch_size=B)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))  # Keras sums over replicas
        return loss

    def replica_eval(x, y):
        logits = model(x, training=False)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        return tf.reduce_sum(sce(y, logits, from_logits=True)), tf.reduce_sum(correct)

    @tf.function
    def train_step(iterator):
        return strategy.reduce("SUM", strategy.run(replica_step, next(iterator)), axis=None)

    @tf.function
    def eval_step(batch):
        return strategy.reduce("SUM", strategy.run(replica_eval, batch), axis=None)

    evals = 0
    for step in range(1, args.steps + 1):
        train_step(train)
        if step % spe == 0 or step == args.steps:
            sums = [eval_step(batch) for batch in val]
            val_loss, val_acc = (float(sum(s[i] for s in sums)) / len(xv) for i in (0, 1))
            evals += 1
    report(args, rank=0, steps=int(opt.iterations.numpy()), evals=evals, val_loss=val_loss, val_acc=val_acc,
           weights=model.get_weights())


def run_fit(args) -> None:
    import keras
    import tensorflow as tf
    strategy = make_strategy(tf, args.strategy)
    x, y, xv, yv, classes = load(args.data)
    B, spe = args.global_batch_size, len(x) // args.global_batch_size
    with strategy.scope():
        model = build_model(keras, args.model, x.shape[1:], classes)
        model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=args.momentum),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], steps_per_execution=args.steps_per_execution)
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(args.val_batch_size * strategy.num_replicas_in_sync)
    # The data holds exactly --steps batches: the last epoch ends when it runs out (then validates).
    hist = model.fit(train_dataset(tf, x, y, B, args.steps, args.seed), epochs=math.ceil(args.steps / spe),
                     steps_per_epoch=spe, validation_data=val, verbose=0)
    h = hist.history
    report(args, rank=0, steps=int(model.optimizer.iterations.numpy()), evals=len(h["val_loss"]),
           val_loss=h["val_loss"][-1], val_acc=h["val_accuracy"][-1], weights=model.get_weights(),
           steps_per_execution=args.steps_per_execution)


def run_hvd_minimal(args) -> None:
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    x, y, xv, yv, classes = load(args.data)
    B, spe = args.global_batch_size, len(x) // args.global_batch_size
    model = build_model(keras, args.model, x.shape[1:], classes)
    opt = keras.optimizers.SGD(args.lr, momentum=args.momentum)
    opt.build(model.trainable_variables)
    variables = model.trainable_variables
    # Keras 3 variables are not tf.Variables: broadcast their .value.
    hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
    train = iter(train_dataset(tf, x[rank::size], y[rank::size], B // size, args.steps, args.seed))
    val = tf.data.Dataset.from_tensor_slices((xv[rank::size], yv[rank::size])).batch(args.val_batch_size)
    sce = keras.losses.sparse_categorical_crossentropy

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(sce(y, model(x, training=True), from_logits=True))
        grads = hvd.grouped_allreduce(tape.gradient(loss, variables), op=hvd.Average)
        opt.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def eval_step(x, y):
        logits = model(x, training=False)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        return tf.stack([tf.reduce_sum(sce(y, logits, from_logits=True)), tf.reduce_sum(correct)])

    evals = 0
    for step in range(1, args.steps + 1):
        train_step(train)
        if step % spe == 0 or step == args.steps:
            local = tf.add_n([eval_step(bx, by) for bx, by in val])
            val_loss, val_acc = (hvd.allreduce(local, op=hvd.Sum).numpy() / len(xv)).tolist()
            evals += 1
    report(args, rank=rank, steps=int(opt.iterations.numpy()), evals=evals, val_loss=val_loss, val_acc=val_acc,
           weights=model.get_weights())


# --------------------------------------------------------------------------- tf_keras

def horovod_callbacks(hvd, names, lr: float) -> list:
    """Horovod's Keras callbacks by name, as its docs and examples use them."""
    make = {
        "broadcast": lambda: hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        "metric_average": lambda: hvd.callbacks.MetricAverageCallback(),
        "lr_warmup": lambda: hvd.callbacks.LearningRateWarmupCallback(initial_lr=lr, warmup_epochs=1),
        "lr_schedule": lambda: hvd.callbacks.LearningRateScheduleCallback(initial_lr=lr, multiplier=1.0),
    }
    return [make[n]() for n in names]


def run_hvd_keras(args) -> None:
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise SystemExit("hvd-keras needs TF_USE_LEGACY_KERAS=1 (tf_keras, the peer venv)")
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf
    hvd.init()
    keras, rank, size = tf.keras, hvd.rank(), hvd.size()
    x, y, xv, yv, classes = load(args.data)
    B, spe = args.global_batch_size, len(x) // args.global_batch_size
    model = build_model(keras, args.model, x.shape[1:], classes)
    # --lr is the rate for the GLOBAL batch, i.e. Horovod's "lr x hvd.size()" for B // size per rank.
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(args.lr, momentum=args.momentum))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    val = tf.data.Dataset.from_tensor_slices((xv[rank::size], yv[rank::size])).batch(args.val_batch_size)
    train = train_dataset(tf, x[rank::size], y[rank::size], B // size, args.steps, args.seed)
    hist = model.fit(train, epochs=math.ceil(args.steps / spe), steps_per_epoch=spe, validation_data=val,
                     callbacks=horovod_callbacks(hvd, args.callbacks, args.lr), verbose=0)
    h = hist.history
    # Steps from fit's own counter: tf_keras also bumps optimizer.iterations in the call that
    # finds the data exhausted (the last epoch is partial), without applying an update.
    report(args, rank=rank, steps=int(model._train_counter.numpy()), evals=len(h["val_loss"]),
           val_loss=h["val_loss"][-1], val_acc=h["val_accuracy"][-1], weights=model.get_weights(),
           callbacks=list(args.callbacks), optimizer_iterations=int(model.optimizer.iterations.numpy()))


PROGRAMS = {"minimal": run_minimal, "fit": run_fit, "hvd-minimal": run_hvd_minimal,
            "hvd-keras": run_hvd_keras}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("program", choices=sorted(PROGRAMS))
    p.add_argument("--data", required=True, help=".npz with x_train, y_train, x_val, y_val")
    p.add_argument("--model", default="mlp", choices=("mlp", "mlp-wide", "convnet"))
    p.add_argument("--strategy", default="single", choices=("single", "mirrored"))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--val-batch-size", type=int, default=256, help="per replica, as distbatch")
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--steps-per-execution", type=int, default=1, help="fit only")
    p.add_argument("--callbacks", default="broadcast,metric_average",
                   type=lambda s: tuple(n for n in s.split(",") if n),
                   help=f"hvd-keras only, comma-separated, of {','.join(CALLBACKS)}; '' for none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = sorted(set(args.callbacks) - set(CALLBACKS))
    if unknown:
        p.error(f"--callbacks: unknown {','.join(unknown)}; expected some of {','.join(CALLBACKS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf
    tf.keras.utils.set_random_seed(args.seed)  # tf.keras: Keras 3, or tf_keras under TF_USE_LEGACY_KERAS=1
    PROGRAMS[args.program](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
