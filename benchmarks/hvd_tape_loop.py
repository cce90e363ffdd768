"""The minimal Horovod training loop that benchmarks/scale_out.py compares distbatch with.

Two flavours of the loop Horovod's docs show (tensorflow2_synthetic_benchmark.py):
  --tape grouped : Keras 3; hvd.grouped_allreduce(grads, op=hvd.Average) of every gradient after
                   the backward pass, as DistributedGradientTape does internally (its own class
                   fails on Keras 3 variables, horovod issue 4290);
  --tape dgt     : the real horovod.tensorflow.DistributedGradientTape, on tf_keras
                   (run it in the peer venv with TF_USE_LEGACY_KERAS=1, scripts/peer_venv.sh).
Same model as `--model mlp-wide` (MNIST-1D shape: 40 inputs, 3 x Dense 2048, 10 classes),
SGD, a fixed random batch per rank, a 2-step warm-up call, then `--steps` steps in one timed
tf.function call, then exit: benchmarks/scale_out.py times the whole process at two step counts
and subtracts, and reads the timed call's rate (the in-process figure).
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tape", choices=("grouped", "dgt"), default="grouped")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=128, help="per-rank batch")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--depth", type=int, default=3)
    args = p.parse_args()
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    if args.tape == "dgt":
        assert os.environ.get("TF_USE_LEGACY_KERAS") == "1", "--tape dgt needs tf_keras"
        import tf_keras as keras
    else:
        import keras
    hvd.init()
    rng = np.random.default_rng(hvd.rank())
    x = tf.constant(rng.normal(size=(args.batch, 40)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=args.batch).astype("int32"))
    layers = [keras.layers.Dense(args.width, activation="relu") for _ in range(args.depth)]
    model = keras.Sequential([keras.Input((40,)), *layers, keras.layers.Dense(10)])
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        if args.tape == "dgt":
            grads = hvd.DistributedGradientTape(tape).gradient(loss, variables)
        else:
            grads = hvd.grouped_allreduce(tape.gradient(loss, variables), op=hvd.Average)
        opt.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def run(n):
        loss = tf.constant(0.0)
        for _ in tf.range(n):
            loss = step()
        return loss

    opt.build(variables) if hasattr(opt, "build") and args.tape == "grouped" else None
    # Keras 3 variables wrap a tf.Variable in .value; tf_keras variables are tf.Variables
    hvd.broadcast_variables([v if args.tape == "dgt" else v.value for v in model.variables], root_rank=0)
    run(tf.constant(2)).numpy()  # warm-up: tracing and the first all-reduces
    t0 = time.perf_counter()
    loss = float(run(tf.constant(args.steps)))
    seconds = time.perf_counter() - t0
    if hvd.rank() == 0:
        print(f"hvd_tape_loop {args.tape}: {args.steps} steps, size {hvd.size()}, loss {loss:.4f}; "
              f"timed {args.steps} steps in {seconds:.4f} s, {args.batch * hvd.size()} samples/step",
              flush=True)


if __name__ == "__main__":
    main()
