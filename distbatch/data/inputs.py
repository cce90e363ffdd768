"""Input sources: what the Trainer reads, whatever the user brought.

Every source implements the same three methods (duck-typed):

    num_examples(num_workers) -> int
        examples per epoch usable for training across all workers; the batch plan
        takes steps_per_epoch = num_examples // global_batch_size.
    train_dataset(plan, *, seed, worker_index, num_workers, local_replicas,
                  start_step, total_steps, epoch_offset=0) -> tf.data.Dataset
        per-worker dataset; element i is the (x, y, sample_weight) batch of local
        replica i % L for step start_step + i // L, leading dimension K*b.
    eval_dataset(plan, *, worker_index, num_workers, local_replicas) -> (dataset, n)
        (x, y, sample_weight, mask) per-replica batches, n of them per local replica
        (the same n on every worker); padding has mask 0; every example once.

Sources here:
- ArraySource: NumPy arrays (x may be a dict or tuple of arrays, y too), one
  seeded permutation per epoch, identical on every worker, split by worker then
  replica (distbatch's exact global-batch semantics; data/indices.py).
- DatasetSource: a tf.data.Dataset of SINGLE examples (x, y) or (x, y, w):
  every worker reads it, shuffles it in seeded blocks of shuffle_buffer examples
  (block_shuffle; the same on every worker), batches it to
  the GLOBAL batch and keeps its own replicas' slices, so R replicas see what
  one device sees at the same global batch.
- FnSource: dataset_fn(ctx: tf.distribute.InputContext) returning the per-worker
  dataset already batched to ctx.get_per_replica_batch_size(global_batch_size):
  the tf.distribute convention, the user's sharding and shuffling.
- distbatch.data.files(...) streams from files (distbatch/data/files.py).

`as_source(data, name)` turns whatever the user passed into a source.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from distbatch.data.checks import batched_in, check_arrays, check_element_spec
from distbatch.data.indices import eval_batch_size, eval_indices, train_indices
from distbatch.errors import UsageError

# One graph constant holds the in-memory arrays; TensorFlow refuses constants over 2 GB.
MAX_IN_MEMORY_BYTES = int(1.5 * 2**30)


def _leaves(nest) -> list:
    if isinstance(nest, dict):
        return [leaf for k in sorted(nest) for leaf in _leaves(nest[k])]
    if isinstance(nest, (list, tuple)):
        return [leaf for item in nest for leaf in _leaves(item)]
    return [nest]


def _map(fn, nest):
    if isinstance(nest, dict):
        return {k: _map(fn, v) for k, v in nest.items()}
    if isinstance(nest, (list, tuple)):
        return type(nest)(_map(fn, v) for v in nest)
    return fn(nest)


def _as_float_weight(tf, w, batch):
    return tf.ones([batch], tf.float32) if w is None else tf.cast(tf.reshape(w, [-1]), tf.float32)


def _split_to_local_replicas(tf, plan, worker_index: int, local_replicas: int):
    """fn(nest of [B, ...] global batch) -> nest of [L, K*b, ...]: this worker's replicas' parts,
    the same layout as indices.train_dataset ([K, R, b] -> worker's L -> [L, K*b])."""
    K, R, b, L = plan.accumulation_steps, plan.replicas, plan.per_replica_batch_size, local_replicas
    lo, hi = worker_index * L, (worker_index + 1) * L

    def split(t):
        rest = tf.shape(t)[1:]
        t = tf.reshape(t, tf.concat([[K, R, b], rest], 0))[:, lo:hi]
        perm = [1, 0, 2] + list(range(3, 3 + t.shape.rank - 3))
        return tf.reshape(tf.transpose(t, perm), tf.concat([[L, K * b], rest], 0))

    return lambda nest: _map(split, nest)


class ArraySource:
    """In-memory arrays: x (an array, or a dict/tuple of arrays), y (likewise), optional weights."""

    def __init__(self, x, y, sample_weight=None, *, name: str = "data") -> None:
        check_arrays(name, _leaves(x), _leaves(y), sample_weight)
        n = {len(a) for a in _leaves(x) + _leaves(y)}
        if len(n) != 1:
            raise ValueError(f"{name}: x and y must have the same number of examples, got "
                             f"lengths {sorted(n)}")
        self.n = n.pop()
        if self.n == 0:
            raise ValueError(f"{name}: no examples")
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float32).reshape(-1)
            if len(sample_weight) != self.n:
                raise ValueError(f"{name}: sample_weight has {len(sample_weight)} entries for "
                                 f"{self.n} examples")
        nbytes = sum(np.asarray(a).nbytes for a in _leaves(x) + _leaves(y))
        if nbytes > MAX_IN_MEMORY_BYTES:
            raise UsageError(f"{name} is {nbytes / 2**30:.1f} GB: the in-memory path holds it in one "
                             f"graph constant (TensorFlow's limit is 2 GB); stream it from files "
                             f"with distbatch.data.files(pattern, parse_fn)")
        self.x, self.y, self.sample_weight, self.name = x, y, sample_weight, name

    def num_examples(self, num_workers: int = 1) -> int:
        return self.n

    def head(self, n: int) -> "ArraySource":
        """The first n examples (the final train-set evaluation of the generalization gap)."""
        cut = lambda a: a[:n]  # noqa: E731
        sw = None if self.sample_weight is None else self.sample_weight[:n]
        return ArraySource(_map(cut, self.x), _map(cut, self.y), sw, name=self.name)

    def example_batch(self):
        """(x, y) of the first example, with a batch axis of 1."""
        return _map(lambda a: np.asarray(a[:1]), self.x), _map(lambda a: np.asarray(a[:1]), self.y)

    def _constants(self, tf):
        w = self.sample_weight if self.sample_weight is not None else np.ones(self.n, np.float32)
        return _map(tf.constant, self.x), _map(tf.constant, self.y), tf.constant(w)

    def train_dataset(self, plan, *, seed: int, worker_index: int, num_workers: int = 1,
                      local_replicas: int, start_step: int = 0, total_steps: int,
                      epoch_offset: int = 0):
        xs, ys, ws = self._constants(tf)
        idx = train_indices(plan, seed=seed, worker_index=worker_index, local_replicas=local_replicas,
                            start_step=start_step, total_steps=total_steps, epoch_offset=epoch_offset)
        gather = lambda i: (_map(lambda a: tf.gather(a, i), xs),  # noqa: E731
                            _map(lambda a: tf.gather(a, i), ys), tf.gather(ws, i))
        return idx.map(gather, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, plan, *, worker_index: int, num_workers: int = 1, local_replicas: int):
        xs, ys, ws = self._constants(tf)
        idx, steps = eval_indices(plan, self.n, worker_index=worker_index,
                                  local_replicas=local_replicas)

        def gather(i):
            mask = tf.cast(i >= 0, tf.float32)
            i = tf.maximum(i, 0)
            return (_map(lambda a: tf.gather(a, i), xs), _map(lambda a: tf.gather(a, i), ys),
                    tf.gather(ws, i) * mask, mask)

        return idx.map(gather).prefetch(tf.data.AUTOTUNE), steps


def without_autotune_thread(ds):
    """`ds` with tf.data's autotuning model thread off, unless the pipeline set
    `options().autotune.enabled` itself.

    Destroying an iterator waits out that thread's current sleep, which grows with the
    iterator's age: measured here 2 s after an 8-s loop and about 10 s after a 10-s,
    260-step run, paid at the end of every run, sweep point and evaluation (docs/benchmarks.md).
    Without the model thread, AUTOTUNE map parallelism is one call per core and
    prefetch(AUTOTUNE) buffers still grow on demand (tf.data's prefetch autotuner).
    """
    if ds.options().autotune.enabled is not None:
        return ds
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def block_shuffle(tf, ds, block: int, seed, epoch):
    """Shuffle `ds` within consecutive blocks of `block` elements; block k's permutation is a
    pure function of (seed, epoch, k) (stateless random keys), so any epoch's order can be
    rebuilt without replaying earlier ones, and every worker builds the same one.

    Used instead of Dataset.shuffle: its seed must be a Python int for the per-epoch order
    (a tensor seed fails inside TensorFlow's get_seed when the global seed is 0). Memory:
    one block. Elements must have fixed shapes (they are batched into a block)."""
    seed = tf.cast(seed, tf.int64)
    epoch = tf.cast(epoch, tf.int64)

    def permute(k, batch):
        n = tf.shape(tf.nest.flatten(batch)[0])[0]
        keys = tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch * 1_000_003 + k]))
        order = tf.argsort(keys, stable=True)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), batch)

    return ds.batch(block).enumerate().map(permute).unbatch()


def _split_example(tf, element):
    """(x, y) or (x, y, w) of one example -> (x, y, w or None)."""
    if not isinstance(element, tuple) or len(element) not in (2, 3):
        raise ValueError("a dataset's elements must be (x, y) or (x, y, sample_weight) tuples, "
                         f"got {type(element).__name__}")
    return element if len(element) == 3 else (*element, None)


def count_examples(ds, name: str) -> int:
    """len(ds): its cardinality when TensorFlow knows it, else one pass over it."""
    n = int(ds.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError(f"{name} is infinite (e.g. .repeat()): pass a finite dataset of single "
                         "examples; distbatch repeats it per epoch")
    if n < 0:
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
    return n


class DatasetSource:
    """A finite tf.data.Dataset of single examples (x, y) or (x, y, sample_weight)."""

    def __init__(self, ds, *, shuffle_buffer: int = 10_000, name: str = "data") -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        spec = ds.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(f"{name}: a dataset's elements must be (x, y) or (x, y, sample_weight) "
                             f"tuples of ONE example, got {spec}")
        check_element_spec(name, spec)
        first = _leaves(spec[0])[0]
        batch = batched_in(ds)
        if batch is not None or (first.shape.rank >= 1 and first.shape[0] is None):
            what = (f".batch({batch}) in its chain" if batch is not None and batch > 0 else
                    f"x has shape {first.shape}")
            raise ValueError(f"{name}: the dataset is batched ({what}); pass single examples "
                             "(distbatch batches them to the global batch, e.g. ds.unbatch()) or a "
                             "dataset_fn(ctx) that batches to ctx.get_per_replica_batch_size(B)")
        self.ds, self.shuffle_buffer, self.name = ds, shuffle_buffer, name
        self.n = count_examples(ds, name)
        self._tf = tf

    def num_examples(self, num_workers: int = 1) -> int:
        return self.n

    def head(self, n: int) -> "DatasetSource":
        return DatasetSource(self.ds.take(n), shuffle_buffer=self.shuffle_buffer, name=self.name)

    def example_batch(self):
        x, y, _ = _split_example(self._tf, next(iter(self.ds.batch(1))))
        return x, y

    def _with_weight(self, ds):
        tf = self._tf
        def add(*element):
            x, y, w = _split_example(tf, element)
            return x, y, tf.constant(1.0) if w is None else tf.cast(w, tf.float32)
        return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train_dataset(self, plan, *, seed: int, worker_index: int, num_workers: int = 1,
                      local_replicas: int, start_step: int = 0, total_steps: int,
                      epoch_offset: int = 0):
        tf = self._tf
        S, B, L = plan.steps_per_epoch, plan.global_batch_size, local_replicas
        base = self._with_weight(self.ds)
        split = _split_to_local_replicas(tf, plan, worker_index, L)
        first_epoch = epoch_offset + start_step // S
        last_epoch = epoch_offset + math.ceil(total_steps / S)

        def epoch(e):
            # The same seeded shuffle on every worker: (seed, absolute epoch) decide the order.
            shuffled = block_shuffle(tf, base, self.shuffle_buffer, seed, e)
            return shuffled.batch(B, drop_remainder=True).take(S)

        ds = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch)
        ds = ds.skip(start_step % S).take(total_steps - start_step)
        ds = ds.map(lambda x, y, w: split((x, y, w)), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        return ds.unbatch().prefetch(tf.data.AUTOTUNE) if L > 1 else ds.map(
            lambda x, y, w: _map(lambda t: t[0], (x, y, w))).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, plan, *, worker_index: int, num_workers: int = 1, local_replicas: int):
        tf = self._tf
        R, L = plan.replicas, local_replicas
        eb = eval_batch_size(plan, self.n)
        steps = math.ceil(self.n / (R * eb))
        lo, hi = worker_index * L, (worker_index + 1) * L
        full = R * eb

        def pad_and_split(x, y, w):
            m = tf.shape(w)[0]
            mask = tf.concat([tf.ones([m]), tf.zeros([full - m])], 0)

            def pad(t):
                paddings = tf.concat([[[0, full - m]], tf.zeros([tf.rank(t) - 1, 2], tf.int32)], 0)
                t = tf.pad(t, paddings)
                return tf.reshape(t, tf.concat([[R, eb], tf.shape(t)[1:]], 0))[lo:hi]

            return _map(pad, (x, y, w)) + (tf.reshape(mask, [R, eb])[lo:hi],)

        ds = self._with_weight(self.ds).batch(full).map(pad_and_split)
        return ds.unbatch().prefetch(tf.data.AUTOTUNE), steps


class FnSource:
    """dataset_fn(ctx) -> per-worker dataset of per-replica batches (x, y) or (x, y, w).

    The number of steps per epoch is the dataset's length in batches divided by the
    local replicas (counted once on this worker), or `steps_per_epoch` when given. Every
    worker must produce that many batches per epoch; distbatch repeats the dataset for
    later epochs (reshuffling is the dataset's own, e.g. shuffle(reshuffle_each_iteration=True)).
    """

    def __init__(self, dataset_fn: Callable, *, steps_per_epoch: int | None = None,
                 name: str = "data") -> None:
        self.fn, self.name, self._steps = dataset_fn, name, steps_per_epoch
        self._cache: dict = {}

    def _dataset(self, *, worker_index: int, num_workers: int, num_replicas: int, global_batch: int):
        key = (worker_index, num_workers, num_replicas, global_batch)
        if key not in self._cache:
            ctx = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                             input_pipeline_id=worker_index,
                                             num_replicas_in_sync=num_replicas)
            ds = self.fn(ctx)
            if not isinstance(ds, tf.data.Dataset):
                raise TypeError(f"{self.name}: dataset_fn(ctx) must return a tf.data.Dataset, got "
                                f"{type(ds).__name__}")
            self._cache[key] = ds
        return self._cache[key]

    def example_batch(self):
        spec = self._dataset(worker_index=0, num_workers=1, num_replicas=1, global_batch=1).element_spec
        zeros = lambda s: tf.zeros([1] + [d or 1 for d in s.shape[1:]], s.dtype)  # noqa: E731
        return tf.nest.map_structure(zeros, spec[0]), tf.nest.map_structure(zeros, spec[1])

    def batches_per_epoch(self, **kw) -> int:
        return self._steps if self._steps is not None else count_examples(self._dataset(**kw), self.name)

    def num_examples(self, num_workers: int = 1) -> int:
        raise TypeError("a dataset_fn source has no example count before the batch plan; "
                        "distbatch.fit derives steps per epoch from its batches")

    def _with_weight(self, ds, with_mask: bool = False):

        def add(*element):
            x, y, w = _split_example(tf, element)
            n = tf.shape(_leaves(y)[0])[0]
            w = _as_float_weight(tf, w, n)
            return (x, y, w, tf.ones([n])) if with_mask else (x, y, w)

        return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train_dataset(self, plan, *, seed: int, worker_index: int, num_workers: int = 1,
                      local_replicas: int, start_step: int = 0, total_steps: int,
                      epoch_offset: int = 0):
        ds = self._dataset(worker_index=worker_index, num_workers=num_workers,
                           num_replicas=plan.replicas, global_batch=plan.global_batch_size)
        L, S = local_replicas, plan.steps_per_epoch
        ds = self._with_weight(ds).take(S * L).repeat()
        return ds.skip(start_step * L).take((total_steps - start_step) * L).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, plan, *, worker_index: int, num_workers: int = 1, local_replicas: int):
        ds = self._dataset(worker_index=worker_index, num_workers=num_workers,
                           num_replicas=plan.replicas, global_batch=plan.global_batch_size)
        n = count_examples(ds, self.name)
        return self._with_weight(ds, with_mask=True), n // local_replicas


def as_source(data: Any, name: str = "data", *, shuffle_buffer: int = 10_000):
    """A source for what a user passed as `data` / `validation_data` (see distbatch.fit)."""
    if data is None:
        return None
    if hasattr(data, "train_dataset") and hasattr(data, "eval_dataset"):
        return data  # ArraySource, DatasetSource, FnSource, distbatch.data.files(...)
    if isinstance(data, tf.data.Dataset):
        return DatasetSource(data, shuffle_buffer=shuffle_buffer, name=name)
    if callable(data):
        return FnSource(data, name=name)
    if isinstance(data, tuple) and len(data) in (2, 3):
        return ArraySource(*data, name=name)
    if isinstance(data, list):
        raise TypeError(f"{name} must be a tuple (x, y) or (x, y, sample_weight), a tf.data.Dataset, "
                        f"a dataset_fn(ctx) or distbatch.data.files(...); got a list")
    raise TypeError(f"{name} must be (x, y) arrays, a tf.data.Dataset of single examples, a "
                    f"dataset_fn(ctx), distbatch.data.files(...) or an ArrayDataset; got "
                    f"{type(data).__name__}")


def array_sources(data) -> tuple[ArraySource, ArraySource]:
    """(train, validation) sources of a distbatch ArrayDataset."""
    return (ArraySource(data.x_train, data.y_train, name="data"),
            ArraySource(data.x_val, data.y_val, name="validation_data"))


class SourceDataset:
    """A named dataset made of sources (what the CLI streams instead of an ArrayDataset):
    the job reads name, input_shape, num_classes, and the train/validation sources."""

    def __init__(self, name: str, train_source, val_source, input_shape, num_classes: int) -> None:
        self.name, self.train_source, self.val_source = name, train_source, val_source
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)


def num_train_examples(data, num_workers: int = 1) -> int:
    """Examples per epoch of an ArrayDataset, a SourceDataset or a training source (on
    `num_workers` workers)."""
    if hasattr(data, "x_train"):
        return len(data.x_train)
    if hasattr(data, "train_source"):
        return data.train_source.num_examples(num_workers)
    return data.num_examples(num_workers)
