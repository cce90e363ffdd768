"""The one distributed train step, shared by every backend.

Per replica, for each of its K micro-batches (gradient accumulation):

    loss_k = sum(per_example_loss) / global_batch        (tf.nn.compute_average_loss)
    g     += d loss_k / d w

then ONE all-reduce SUM across replicas (backend.all_reduce_sum: a
tf.distribute replica-context all_reduce, or hvd.grouped_allreduce) gives
d(mean loss over the global batch)/dw, and the optimizer applies it. Dividing by
the GLOBAL batch before summing (not by the per-replica batch) is what makes R
replicas equal one device at the same global batch (Goyal et al. 2017, sec. 3:
"normalize the per-worker loss by the total minibatch size").

The same all-reduce carries the metric sums (loss, correct predictions) and,
with the gradient noise scale on, the per-micro-batch squared gradient norms
(McCandlish et al. 2018, appendix A.1): B_small = per-micro-batch size,
B_big = global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import keras
import tensorflow as tf

from distbatch.backends.base import Backend
from distbatch.backends.single import SingleBackend
from distbatch.errors import ParameterError
from distbatch.training.plan import BatchPlan
from distbatch.training.replica_seeds import decorrelate_replicas
from distbatch.training.task import Task


@dataclass(frozen=True)
class StepOptions:
    noise_scale: bool = False
    # Micro-batches per replica used for the noise scale's small batch when the
    # plan itself has only one (1 replica, no accumulation).
    noise_splits: int = 1
    # XLA-compile the per-replica forward/backward pass (tf.function(jit_compile=True)).
    jit_compile: bool = False
    # Gradient buckets of about this many MB, each all-reduced on its own, in reverse layer
    # order (the order backprop produces them); 0 = one all-reduce of every gradient;
    # "auto" = the backend's choice (resolve_bucket_mb).
    bucket_mb: float | str = "auto"
    # Cast gradients to this type for the all-reduce only: "none", "fp16" or "bf16".
    grad_compression: str = "none"


from distbatch.choices import GRAD_COMPRESSION  # noqa: E402 (re-exported)


def bucket_partition(nbytes: Sequence[int], bucket_bytes: float) -> list[list[int]]:
    """Group tensor indices into all-reduce buckets, in the order they are issued.

    Backprop produces the gradients of the LAST layers first, so buckets are
    filled from the last index down: a bucket closes once it holds at least
    `bucket_bytes` (one tensor larger than that is a bucket on its own), and
    its all-reduce can start while earlier layers are still being
    differentiated (PyTorch DDP's bucket_cap_mb, Horovod's per-tensor
    all-reduce plus tensor fusion). bucket_bytes <= 0: one bucket holding
    every index in its original order (one grouped all-reduce, as before).
    Every index lands in exactly one bucket.
    """
    n = len(nbytes)
    if bucket_bytes <= 0 or n == 0:
        return [list(range(n))] if n else []
    buckets, current, size = [], [], 0
    for i in reversed(range(n)):
        current.append(i)
        size += nbytes[i]
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def resolve_bucket_mb(value: float | str, backend: Backend | None = None) -> float:
    """`bucket_mb` as a number: "auto" is the backend's `auto_bucket_mb` (Horovod: one
    all-reduce per tensor; the tf.distribute backends and one device: one all-reduce)."""
    if value == "auto":
        return float(getattr(backend, "auto_bucket_mb", 0.0))
    return float(value)


def check_comm_options(options: "StepOptions", backend: Backend | None = None) -> None:
    """ParameterError for a bucket size or compression this backend cannot do (one line each)."""
    b = options.bucket_mb
    if b != "auto" and (isinstance(b, (bool, str)) or not b >= 0):
        raise ParameterError(f"{{bucket_mb}} must be a number >= 0 (0 = one all-reduce) or 'auto', "
                             f"got {b!r}", "bucket_mb")
    if options.grad_compression not in GRAD_COMPRESSION:
        raise ParameterError(f"{{grad_compression}} must be one of {', '.join(GRAD_COMPRESSION)}, "
                             f"got {options.grad_compression!r}", "grad_compression")
    allowed = getattr(backend, "grad_compressions", GRAD_COMPRESSION)
    if backend is not None and options.grad_compression not in allowed:
        raise ParameterError(f"{{grad_compression}} {options.grad_compression} is not supported by "
                             f"the {backend.name} backend (it supports {', '.join(allowed)})",
                             "grad_compression")


def noise_splits_for(plan: BatchPlan) -> int:
    """Micro-batches per replica the noise scale needs: 2 on one replica without
    accumulation (to get a second, smaller batch size), else 1."""
    return 2 if plan.replicas * plan.accumulation_steps == 1 else 1


def check_noise_scale(plan: BatchPlan, splits: int) -> None:
    """ParameterError unless the noise scale can see two batch sizes with equal micro-batches."""
    gb, splits = plan.global_batch_size, max(1, splits)
    if plan.replicas * plan.accumulation_steps * splits == 1:
        raise ParameterError("{noise_scale} needs two batch sizes: more than one replica, "
                             "{accumulation_steps} > 1, or noise_splits > 1 (got 1 of each)",
                             "noise_scale", "accumulation_steps")
    if plan.per_replica_batch_size % splits:
        b, units = plan.per_replica_batch_size, splits * plan.replicas * plan.accumulation_steps
        raise ParameterError(f"{{noise_scale}} splits each replica's batch of {b} into {splits} equal "
                             f"micro-batches; {b} is not divisible by {splits} (global batch {gb}); "
                             f"try {{global_batch_size}} {gb - gb % units}",
                             "noise_scale", "global_batch_size")


def _sq_norm(tensors):
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, tf.float32))) for t in tensors])


def default_task(loss_fn=None):
    """sparse categorical cross-entropy from logits (or `loss_fn`, per example) + accuracy."""
    return Task(loss=loss_fn, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def with_weights(batch, mask: bool = False) -> tuple:
    """(x, y, sample_weight[, mask]) from an element with or without weights: (x, y) gets
    weights of 1; an eval (x, y, mask) of distbatch <= 0.1 gets weights of 1."""
    batch = tuple(batch)
    want = 4 if mask else 3
    if len(batch) == want:
        return batch
    ones = tf.ones([tf.shape(tf.nest.flatten(batch[1])[0])[0]], tf.float32)
    if mask and len(batch) == 3:  # (x, y, mask)
        return batch[0], batch[1], ones, batch[2]
    return (*batch, ones) if not mask else (*batch, ones, ones)


def _nest_slice(nest, lo, hi):
    return tf.nest.map_structure(lambda t: t[lo:hi], nest)


def wire_compression(backend, requested: str) -> str:
    """The gradients' type on the wire: `requested`, except on the single backend, whose
    all-reduce returns its input: nothing travels, so a cast there would only round the
    gradients (the cast is for the all-reduce only, docs/scaling.md)."""
    return "none" if isinstance(backend, SingleBackend) else requested


def _all_reduce_buckets(backend: Backend, grads: list, packed, options: StepOptions) -> tuple:
    """All-reduce `grads` (each exactly once) and the float32 metrics tensor `packed`.

    Gradients are cast to the compression type just before their all-reduce and
    back to their own type right after. Each bucket's all-reduce depends only on
    its own gradients, so inside the tf.function TensorFlow's executor can run it
    while the backward pass of earlier layers is still computing; on Horovod each
    grouped_allreduce is enqueued to its background thread as soon as its inputs
    are ready. The metrics ride in the LAST bucket (the first layers' gradients,
    produced last): no extra collective when all tensors share one type. Horovod
    and tf.distribute refuse mixed types in one call, so a compressed bucket
    sends its float32 metrics as a second call of the same bucket.
    """
    wire = {"none": None, "fp16": tf.float16,
            "bf16": tf.bfloat16}[wire_compression(backend, options.grad_compression)]
    sizes = [int(g.shape.num_elements() or 0) * (2 if wire is not None else g.dtype.size)
             for g in grads]
    buckets = bucket_partition(sizes, resolve_bucket_mb(options.bucket_mb, backend) * 2 ** 20)
    out: list = [None] * len(grads)
    for k, idx in enumerate(buckets):
        sent = [grads[i] if wire is None else tf.cast(grads[i], wire) for i in idx]
        last = k == len(buckets) - 1
        if last and all(t.dtype == packed.dtype for t in sent):
            reduced = backend.all_reduce_sum(sent + [packed], name=f"distbatch_grads_{k}")
            sent_back, packed_sum = reduced[:-1], reduced[-1]
        else:
            sent_back = backend.all_reduce_sum(sent, name=f"distbatch_grads_{k}")
            packed_sum = (backend.all_reduce_sum([packed], name="distbatch_step_sums")[0]
                          if last else None)
            if last:
                # The update must wait for the metrics' own all-reduce too: otherwise the next
                # step of a multi-step loop can issue it again while it is still in flight
                # (Horovod refuses a second tensor of the same name in flight).
                with tf.control_dependencies([packed_sum]):
                    sent_back = [tf.identity(t) for t in sent_back]
        for i, r in zip(idx, sent_back):
            out[i] = r if r.dtype == grads[i].dtype else tf.cast(r, grads[i].dtype)
        if last:
            packed = packed_sum
    if not buckets:  # a model without trainable variables: only the metrics
        packed = backend.all_reduce_sum([packed], name="distbatch_step_sums")[0]
    return out, packed


def _learning_rate(optimizer):
    """The learning rate the optimizer applies at its current step, read inside the graph
    (a schedule is evaluated at optimizer.iterations; LossScaleOptimizer delegates)."""
    return tf.cast(optimizer.learning_rate, tf.float32)


def _multi_step(one_step, keys: dict, finished=None):
    """A tf.function running `one_step(iterator)` up to n times in ONE call (a tf.while_loop,
    as Keras's steps_per_execution does); every output comes back stacked, shape [steps run].
    `finished()` (AdaScale: tau reached its budget) ends the call early."""
    finished = finished or (lambda: tf.constant(False))
    @tf.function
    def steps(iterator, n):
        arrays = {k: tf.TensorArray(dtype, size=0, dynamic_size=True) for k, dtype in keys.items()}
        i = tf.constant(0)
        while i < n and not finished():
            # One step at a time: a while_loop may otherwise start iterations in parallel, and
            # Horovod refuses two in-flight all-reduces of the same (op-named) tensor.
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            out = one_step(iterator)
            arrays = {k: arrays[k].write(i, out[k]) for k in keys}
            i += 1
        return {k: a.stack() for k, a in arrays.items()}
    return steps


def make_train_step(backend: Backend, model, optimizer, plan: BatchPlan, loss_fn=None,
                    options: StepOptions = StepOptions(), adascale=None, task=None):
    """Return a tf.function step(iterator) -> dict of global sums (identical on every rank).

    The iterator yields per-replica (x, y, sample_weight) batches (distbatch.data.inputs).
    `task` (distbatch.training.task.Task) gives the per-example loss and the metrics;
    default: `loss_fn` (per-example; default sparse cross-entropy from logits) + accuracy.
    `step.multi(iterator, n)` runs n steps in one call and returns each output
    stacked over the n steps; `step.keys` names the outputs. Outputs:
    loss_sum (sum of weighted per-example losses), metrics (the summed metric state
    update, Task.metric_update), lr (the learning rate this step applied) and, with the
    noise scale on, small_sq and big_sq; with `adascale`
    (distbatch.recipes.adascale.AdaScaleState) also its gain and tau after the step.
    """

    task = task or default_task(loss_fn)
    decorrelate_replicas(model, backend)  # each replica its own Dropout masks
    variables = model.trainable_variables
    gb = plan.global_batch_size
    micro = plan.accumulation_steps * max(1, options.noise_splits)
    units = plan.replicas * micro  # micro-batches in one global batch
    b_small = gb // units
    if adascale is not None and adascale.needs_statistics and not options.noise_scale:
        raise ValueError("adascale with scale > 1 needs StepOptions(noise_scale=True): its gain "
                         "comes from the noise-scale statistics")
    if options.noise_scale:
        check_noise_scale(plan, options.noise_splits)
    check_comm_options(options, backend)
    scale_loss = getattr(optimizer, "scale_loss", None) if hasattr(optimizer, "inner_optimizer") else None

    def loss_scale_sq():
        if not scale_loss:
            return 1.0
        return tf.square(tf.cast(optimizer.dynamic_scale, tf.float32))

    def grads_of(x, y, w):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            per_example = task.per_example_loss(y, out)
            loss = tf.nn.compute_average_loss(per_example, sample_weight=w, global_batch_size=gb)
            if model.losses:  # regularizers: counted once per global batch
                loss += tf.add_n(model.losses) / units
            target = scale_loss(loss) if scale_loss else loss
        grads = tape.gradient(target, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                 for g, v in zip(grads, variables)]
        return grads, tf.reduce_sum(per_example * w), task.metric_update(y, out, w)

    if options.jit_compile:
        # XLA compiles the forward and backward pass of one micro-batch; the all-reduce and
        # the optimizer update stay outside (Horovod's ops and tf.distribute's collectives
        # have no XLA kernels on CPU).
        grads_of = tf.function(grads_of, jit_compile=True)

    def replica_step(x, y, w):
        if micro == 1:
            grads, loss_sum, metrics = grads_of(x, y, w)
            small_sq = _sq_norm(grads) if options.noise_scale else tf.constant(0.0)
        elif micro == 2 and plan.accumulation_steps == 1:
            # The noise scale's split of one batch (the whole batch is in memory anyway):
            # unrolled, without a while_loop's per-step overhead.
            half = tf.shape(w)[0] // 2
            g0, l0, m0 = grads_of(*_nest_slice((x, y, w), 0, half))
            g1, l1, m1 = grads_of(*_nest_slice((x, y, w), half, None))
            grads = [a + b for a, b in zip(g0, g1)]
            loss_sum, metrics = l0 + l1, m0 + m1
            small_sq = (_sq_norm(g0) + _sq_norm(g1) if options.noise_scale
                        else tf.constant(0.0))
        else:
            split = lambda t: tf.reshape(t, tf.concat([[micro, -1], tf.shape(t)[1:]], 0))  # noqa: E731
            xs, ys, ws = tf.nest.map_structure(split, (x, y, w))
            grads = [tf.zeros_like(v, dtype=v.dtype) for v in variables]
            loss_sum = small_sq = tf.constant(0.0)
            metrics = tf.zeros([task.state_size])
            for k in tf.range(micro):  # a tf.while_loop: one micro-batch in memory at a time
                g, l, m = grads_of(*tf.nest.map_structure(lambda t: t[k], (xs, ys, ws)))
                grads = [a + b for a, b in zip(grads, g)]
                loss_sum, metrics = loss_sum + l, metrics + m
                if options.noise_scale:
                    small_sq += _sq_norm(g)
        if options.noise_scale:
            # g above is d(sum loss)/dw / global_batch; the micro-batch MEAN gradient is units x it.
            small_sq = small_sq * float(units) ** 2 / loss_scale_sq()
        # The metric sums ride in the gradients' all-reduce, packed into one float32 tensor.
        # small_sq above comes from the local, UNcompressed gradients; big_sq below from
        # the reduced ones, after any compression's round trip (what the optimizer applies).
        grads, packed = _all_reduce_buckets(backend, list(grads),
                                            tf.concat([tf.stack([loss_sum, small_sq]), metrics], 0),
                                            options)
        loss_sum, small_sq, metrics = packed[0], packed[1], packed[2:]
        # float16: gradients stay loss-scaled up to here; LossScaleOptimizer unscales them,
        # and skips the update (lowering the scale) when they are not finite.
        big_sq = _sq_norm(grads) / loss_scale_sq() if options.noise_scale else tf.constant(0.0)
        small_sq = small_sq / units
        if adascale is not None:  # the gain of THIS step, before its lr is read
            gain = adascale.update_gain(small_sq, big_sq, b_small, gb)
        lr = _learning_rate(optimizer)  # before apply_gradients advances the step counter
        optimizer.apply_gradients(zip(grads, variables))
        out = {"loss_sum": loss_sum, "metrics": metrics, "lr": lr}
        if options.noise_scale:
            out.update(small_sq=small_sq, big_sq=big_sq)
        if adascale is not None:
            out.update(gain=gain, tau=adascale.advance())
        return out

    def one_step(iterator):
        # (x, y) batches get unit weights inside the replica function (per-replica values)
        out = backend.run(lambda *b: replica_step(*with_weights(b)), tuple(next(iterator)))
        return {k: backend.local_value(v) for k, v in out.items()}

    keys = dict.fromkeys(("loss_sum", "metrics", "lr"), tf.float32)
    if options.noise_scale:
        keys.update(small_sq=tf.float32, big_sq=tf.float32)
    if adascale is not None:
        keys.update(gain=tf.float32, tau=tf.float64)
    step = tf.function(one_step)
    step.multi = _multi_step(one_step, keys, adascale.finished if adascale is not None else None)
    step.keys = keys
    step.b_small = b_small
    step.task = task
    return step


def make_eval_step(backend: Backend, model, loss_fn=None, task=None):
    """Return a tf.function eval_step(iterator, n) -> dict of global masked sums over n batches
    (all of an evaluation in one call): loss_sum, count (examples), metrics (summed state)."""
    task = task or default_task(loss_fn)

    def replica_eval(x, y, w, mask):
        out = model(x, training=False)
        weight = w * mask
        per_example = task.per_example_loss(y, out)
        sums = tf.concat([tf.stack([tf.reduce_sum(per_example * weight), tf.reduce_sum(mask)]),
                          task.metric_update(y, out, weight)], 0)
        return backend.all_reduce_sum([sums], name="distbatch_eval_sums")[0]

    @tf.function
    def eval_step(iterator, n):
        total = tf.zeros([2 + task.state_size])
        for _ in tf.range(n):
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)  # see _multi_step
            total += backend.local_value(backend.run(
                lambda *b: replica_eval(*with_weights(b, mask=True)), tuple(next(iterator))))
        return {"loss_sum": total[0], "count": total[1], "metrics": total[2:]}

    eval_step.task = task
    return eval_step
