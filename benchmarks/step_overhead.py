"""Step overhead: the distbatch train step against a minimal hand-written loop.

Issue 3's performance item: at the same model, batch and strategy, the
distbatch step (distbatch.training.step.make_train_step) should reach >= 0.97x the
throughput of the smallest loop a user would write by hand:

  single / mirrored:  @tf.function: strategy.run(step) where step does
                      GradientTape, tf.nn.compute_average_loss(global_batch_size=B),
                      optimizer.apply_gradients (Keras 3 all-reduces the
                      gradients itself under a strategy); returns the loss.
  horovod:            @tf.function: GradientTape on the LOCAL mean loss,
                      hvd.grouped_allreduce(grads, op=hvd.Average),
                      optimizer.apply_gradients; returns the loss.

Both loops train their own copy of the same model (MLP 40-256-256-10 on
MNIST-1D-shaped random data), with the same SGD settings, fed by identically
built distributed datasets of the same in-memory tensors. They run
interleaved in ONE process (blocks of --steps steps, order A B B A A B ...
so a linear drift in machine load hits both equally), each block ended by
fetching a result. Reported: median samples/s of each, the ratio of medians
and the median of the per-pair ratios, with the load average.

--ladder adds intermediate loops that go from the minimal loop to the
distbatch step one feature at a time, to say what each costs:
  own_reduce:  gradients summed by backend.all_reduce_sum (Keras's reduction off)
  + metrics:   loss sum and argmax-correct count in the same all-reduce
  + dict:      the three-scalar dict output through backend.local_value, as distbatch

Run (2 CPU cores, see docs/benchmarks.md):
  .venv/bin/python benchmarks/step_overhead.py --backend single
  .venv/bin/python benchmarks/step_overhead.py --backend mirrored --cpu-replicas 2
  PATH=.venv/bin:$PATH horovodrun -np 2 -H localhost:2 --gloo \
      python benchmarks/step_overhead.py --backend horovod
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def minimal_step(backend, model, optimizer, global_batch: int):
    """The hand-written loop (see the module docstring)."""
    import keras
    import tensorflow as tf
    variables = model.trainable_variables

    if backend.name == "horovod":
        hvd = backend.hvd

        @tf.function
        def step(iterator):
            x, y = next(iterator)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True))
            grads = hvd.grouped_allreduce(tape.gradient(loss, variables), op=hvd.Average)
            optimizer.apply_gradients(zip(grads, variables))
            return loss
        return step

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))  # Keras sums across replicas
        return loss

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        return backend.local_value(backend.run(replica_step, (x, y)))
    return step


def ladder_step(backend, model, optimizer, global_batch: int, *, metrics: bool, as_dict: bool):
    """Minimal loop with distbatch's own reduction, optionally its metrics and dict output."""
    import keras
    import tensorflow as tf
    variables = model.trainable_variables

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, variables)
        extra = []
        if metrics:
            correct = tf.reduce_sum(tf.cast(tf.equal(
                tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32))
            extra = [tf.reduce_sum(per_example), correct, tf.constant(0.0)]
        reduced = backend.all_reduce_sum(list(grads) + extra)
        optimizer.apply_gradients(zip(reduced[:len(grads)], variables))
        if not metrics:
            return loss
        out = dict(zip(("loss_sum", "correct", "small_sq"), reduced[len(grads):]))
        return out if as_dict else out["loss_sum"]

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        out = backend.run(replica_step, (x, y))
        if isinstance(out, dict):
            return {k: backend.local_value(v) for k, v in out.items()}
        return backend.local_value(out)
    return step


def _sync(out) -> None:
    (out["loss_sum"] if isinstance(out, dict) else out).numpy()


def build(backend, plan, seed: int, own_reduce: bool):
    """A fresh MLP 40-256-256-10 + SGD, built like `distbatch train` builds them."""
    import keras

    from distbatch.models import build_model
    keras.utils.set_random_seed(seed)
    with backend.scope():
        model = build_model("mlp", (40,), 10)
        optimizer = keras.optimizers.SGD(learning_rate=0.01)
        optimizer.build(model.trainable_variables)
    if own_reduce:
        backend.prepare(model, optimizer)  # also turns Keras's own gradient sum off
    elif backend.name == "horovod":
        backend.prepare(model, optimizer)  # broadcast only; Horovod never touches Keras's reduction
    return model, optimizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="single", choices=("single", "mirrored", "horovod"))
    p.add_argument("--cpu-replicas", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=15, help="timed blocks per loop")
    p.add_argument("--ladder", action="store_true", help="also time the intermediate loops")
    p.add_argument("--json", default=None, help="append the result as one JSON line to FILE")
    args = p.parse_args(argv)
    if args.backend == "mirrored" and args.cpu_replicas is None:
        args.cpu_replicas = 2

    import tensorflow as tf

    from distbatch.backends import create_backend
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import make_train_step

    backend, _ = create_backend(args.backend, cpu_replicas=args.cpu_replicas)
    B = args.global_batch_size
    plan = BatchPlan.derive(global_batch_size=B, replicas=backend.num_replicas, num_train_examples=B)
    b = plan.per_replica_batch_size
    rng = np.random.default_rng(backend.worker_index)
    x = rng.standard_normal((b, 40)).astype(np.float32)
    y = rng.integers(0, 10, size=b).astype(np.int32)

    def make_iterator():
        return iter(backend.distribute(
            lambda w, L: tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(tf.data.AUTOTUNE)))

    loops = {}
    model, opt = build(backend, plan, 0, own_reduce=True)
    loops["distbatch"] = (make_train_step(backend, model, opt, plan), make_iterator())
    model, opt = build(backend, plan, 0, own_reduce=False)
    loops["minimal"] = (minimal_step(backend, model, opt, B), make_iterator())
    if args.ladder and backend.name != "horovod":
        for name, kw in (("own_reduce", dict(metrics=False, as_dict=False)),
                         ("own_reduce+metrics", dict(metrics=True, as_dict=False)),
                         ("own_reduce+metrics+dict", dict(metrics=True, as_dict=True))):
            model, opt = build(backend, plan, 0, own_reduce=True)
            loops[name] = (ladder_step(backend, model, opt, B, **kw), make_iterator())

    for fn, it in loops.values():  # compile + warm-up, untimed
        for _ in range(args.steps):
            out = fn(it)
        _sync(out)

    load_before = os.getloadavg()
    rates = {name: [] for name in loops}
    names = list(loops)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):  # A B, B A, A B, ...
            fn, it = loops[name]
            t = time.perf_counter()
            for _ in range(args.steps):
                out = fn(it)
            _sync(out)
            rates[name].append(B * args.steps / (time.perf_counter() - t))
    load_after = os.getloadavg()
    backend.shutdown()
    if not backend.is_chief:
        return 0

    med = {k: float(np.median(v)) for k, v in rates.items()}
    paired = np.asarray(rates["distbatch"]) / np.asarray(rates["minimal"])
    result = {
        "backend": backend.name, "replicas": backend.num_replicas, "global_batch_size": B,
        "steps_per_block": args.steps, "repeats": args.repeats,
        "median_samples_per_sec": med,
        "ratio_of_medians": med["distbatch"] / med["minimal"],
        "median_paired_ratio": float(np.median(paired)),
        "paired_ratio_iqr": [float(np.percentile(paired, 25)), float(np.percentile(paired, 75))],
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
    }
    for name in names:
        if name != "minimal":
            result.setdefault("ratio_to_minimal", {})[name] = med[name] / med["minimal"]
    print(f"step overhead, backend {backend.name} ({backend.num_replicas} replicas), global batch "
          f"{B}, {args.repeats} interleaved blocks x {args.steps} steps")
    for name in names:
        print(f"  {name:<26} median {med[name]:>10,.0f} samples/s   "
              f"ratio to minimal {med[name] / med['minimal']:.3f}")
    print(f"  distbatch/minimal: ratio of medians {result['ratio_of_medians']:.3f}, median paired "
          f"ratio {result['median_paired_ratio']:.3f} (IQR {result['paired_ratio_iqr'][0]:.3f}-"
          f"{result['paired_ratio_iqr'][1]:.3f})")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
