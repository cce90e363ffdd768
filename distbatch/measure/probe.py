"""The largest per-replica batch that fits in device memory (`distbatch probe-batch`,
distbatch/cli/probe.py, is its command).

Search (PyTorch Lightning's batch-size finder, "power" then "binsearch" mode):
double the batch from `start` while one training step fits, then binary-search
between the last batch that fitted and the first that did not. With a monotone
`fits` this costs about 2*log2(answer) trial steps and returns the exact
largest fitting batch. Each trial is one forward + backward + optimizer step of
the real model on random inputs at that per-replica batch (with gradient
accumulation the step holds one micro-batch in memory at a time, so K does not
change what fits; it multiplies the global batch the answer allows):

    global batch allowed = per_replica_batch * replicas * accumulation_steps

A trial "does not fit" when TensorFlow raises ResourceExhaustedError (device
OOM) or Python raises MemoryError. On machines where real memory must not be
exhausted (CPU test boxes), ``max_batch`` caps the search and
``memory_limit_mb`` SIMULATES a device: a trial whose estimated step memory
(`estimate_step_bytes`) exceeds the limit counts as out of memory without
running.
"""
from __future__ import annotations

import gc
import math
from typing import Callable, Sequence

import tensorflow as tf

from distbatch.backends import create_backend
from distbatch.data.datasets import load_dataset
from distbatch.errors import UsageError
from distbatch.measure.batch_search import DEFAULT_MAX_BATCH, find_max_batch  # noqa: F401
from distbatch.models import build_model
from distbatch.recipes.optimizers import build_optimizer
from distbatch.training.assembly import set_precision
from distbatch.training.oom import OutOfMemory, is_out_of_memory, oom_message  # noqa: F401
from distbatch.training.plan import BatchPlan
from distbatch.training.step import make_train_step


# ----------------------------------------------------------------- memory estimate

def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # nested model
            yield from _layers(layer)
        else:
            yield layer


def activation_elements_per_example(model) -> int:
    """Sum over layers of the output size per example (floats kept for the backward pass)."""
    total = 0
    for layer in _layers(model):
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for t in outputs:
            dims = [d for d in t.shape[1:]]
            if any(d is None for d in dims):
                raise UsageError(f"cannot estimate memory: layer {layer.name} has an unknown "
                                 f"output shape {tuple(t.shape)}")
            total += math.prod(dims)
    return int(total)


def estimate_step_bytes(model, per_replica_batch: int, *, optimizer_slots: int = 1,
                        bytes_per_float: int = 4) -> int:
    """Rough memory of one training step on one replica (a model, not a measurement).

        params  P = model.count_params()
        weights: P * (1 weight + 1 gradient + 1 accumulator + optimizer_slots)
        activations: 2 * A * b   (A = activation floats per example: forward outputs
                                  kept for backward, plus their gradients)

    times `bytes_per_float`. It ignores workspace and framework overhead, so a
    real device holds somewhat less; it is what ``memory_limit_mb`` compares with.
    """
    P = int(model.count_params())
    A = activation_elements_per_example(model)
    return bytes_per_float * (P * (3 + optimizer_slots) + 2 * A * per_replica_batch)


def probe(*, model_name: str, input_shape: Sequence[int], num_classes: int,
          backend_name: str = "auto", cpu_replicas: int | None = None, accumulation_steps: int = 1,
          start: int = 1, max_batch: int = DEFAULT_MAX_BATCH, memory_limit_mb: float | None = None,
          optimizer_name: str = "momentum", mixed_precision: str = "off",
          log: Callable[[str], None] | None = None) -> dict:
    """Run the search with real training steps; returns the result as a dict."""
    backend, _ = create_backend(backend_name, cpu_replicas=cpu_replicas)
    R, K = backend.num_replicas, 1  # K=1: accumulation runs one micro-batch at a time
    set_precision(mixed_precision)
    with backend.scope():
        model = build_model(model_name, input_shape, num_classes)
        optimizer = build_optimizer(optimizer_name, 1e-6)
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    # Optimizer state per parameter (momentum: 1, Adam: 2), from its non-scalar variables.
    P = max(1, int(model.count_params()))
    slots = round(sum(math.prod(v.shape) for v in optimizer.variables if len(v.shape)) / P)
    limit_bytes = None if memory_limit_mb is None else memory_limit_mb * 2**20
    shape = tuple(int(d) for d in input_shape)
    tries: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        ok = True
        if limit_bytes is not None and estimate_step_bytes(model, b, optimizer_slots=slots) > limit_bytes:
            ok = False
        else:
            plan = BatchPlan.derive(global_batch_size=b * R, replicas=R, accumulation_steps=K,
                                    num_train_examples=b * R)

            def make_dataset(worker_index, local_replicas):
                def example(_):
                    x = tf.random.uniform((b,) + shape, dtype=tf.float32)
                    y = tf.random.uniform((b,), maxval=num_classes, dtype=tf.int32)
                    return x, y
                return tf.data.Dataset.range(local_replicas).map(example)

            try:
                step = make_train_step(backend, model, optimizer, plan)
                out = step(backend.iterator(make_dataset))
                float(out["loss_sum"].numpy())  # wait for the step to finish
            except Exception as e:  # noqa: BLE001 - only out-of-memory is a "no"
                if not is_out_of_memory(e):
                    raise
                ok = False
            gc.collect()
        tries.append((b, ok))
        if log:
            log(f"  per-replica batch {b:6d}: {'fits' if ok else 'out of memory'}")
        return ok

    best = find_max_batch(fits, start=start, max_batch=max_batch)
    estimated = estimate_step_bytes(model, best, optimizer_slots=slots)
    return {"model": model_name, "input_shape": list(shape), "backend": backend.name,
            "replicas": R, "accumulation_steps": accumulation_steps, "per_replica_batch": best,
            "global_batch": best * R * accumulation_steps, "capped": best == max_batch,
            "tries": len(tries), "trace": tries, "memory_limit_mb": memory_limit_mb,
            "optimizer_slots": slots, "estimated_mb": estimated / 2**20}


def dataset_shape(spec: str) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a dataset named or given by path, as train loads it."""
    data = load_dataset(spec)
    return data.input_shape, data.num_classes
