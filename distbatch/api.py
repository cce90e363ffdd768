"""The Python front door: your model, data, loss, metrics and callbacks, at a GLOBAL batch.

    import distbatch, keras
    result = distbatch.fit(
        model_fn=lambda: keras.Sequential([...]),        # called inside the backend's scope
        recipe=distbatch.Recipe(optimizer="momentum", base_lr=0.1, base_batch_size=256,
                                scaling="linear", warmup="gradual", warmup_epochs=5,
                                decay="cosine"),           # or optimizer_fn=lambda: keras.optimizers.SGD(...)
        data=(x_train, y_train),                         # or a tf.data.Dataset of single examples,
        validation_data=(x_val, y_val),                  #    dataset_fn(ctx), distbatch.data.files(...)
        loss="mse", metrics=["mae"], callbacks=[keras.callbacks.CSVLogger("log.csv")],
        global_batch_size=256, epochs=5, backend="auto")
    result.history["val_mae"]; result.model.save("model.keras"); result.metrics

model_fn and optimizer_fn are called inside the backend's scope, so variables are
mirrored where they must be; the optimizer's slots are built before the first step;
Horovod broadcasts the initial state from rank 0. The loss is divided by the GLOBAL
batch (sample weights multiply the per-example losses); metrics are aggregated exactly
across replicas and workers (distbatch/training/task.py). Callbacks run on the chief
with global metrics (distbatch/training/trainer.py, CallbackHooks).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from distbatch.recipes.recipe import Recipe
from distbatch.training.seeding import seed_everything
from distbatch.training.trainer import LoopOptions, RunResult


@dataclass
class FitResult:
    """What distbatch.fit returns.

    history: dict of lists like keras History.history (loss, <metric>, val_loss,
    val_<metric>, lr, plus step and epoch), one entry per evaluation.
    model: the trained model, compiled (optimizer with its schedule, loss, metrics):
    model.save("model.keras"), keras.models.load_model(...).fit(...) continues.
    metrics: the final summary (what summary.json holds).
    records: the history as one dict per evaluation (distbatch's own names).
    """
    history: dict
    model: Any
    metrics: dict
    records: list = field(default_factory=list)


def history_dict(records: list) -> dict:
    """[{step, epoch, train_loss, train_<m>, val_<m>, lr}, ...] -> {loss: [...], <m>: [...], ...}."""
    out: dict = {}
    for rec in records:
        for k, v in rec.items():
            name = k[len("train_"):] if k.startswith("train_") else k
            out.setdefault(name, []).append(v)
    return out


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_resume_dir(checkpoint_dir, resume) -> None:
    """resume=True with a checkpoint_dir that does not exist is most likely a typo: training
    would silently start from scratch instead of continuing the run that was meant."""
    if resume and checkpoint_dir and not os.path.isdir(checkpoint_dir):
        from distbatch.errors import ParameterError
        raise ParameterError(f"{{checkpoint_dir}} {str(checkpoint_dir)!r} does not exist, so resume=True "
                             "found no checkpoint there; expected the checkpoint_dir of an earlier run "
                             "(or resume=False to start a new one)", "checkpoint_dir")


def _check_length(epochs, steps) -> None:
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs or steps, got epochs={epochs!r}, steps={steps!r}")
    if steps is not None:
        _check_positive_int("steps", steps)
    elif isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (
            math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")


def fit(*, model_fn: Callable, optimizer_fn: Callable | None = None, recipe=None, data,
        validation_data=None, loss=None, metrics=None, callbacks=None, global_batch_size: int,
        epochs: float | None = None, steps: int | None = None, backend="auto",
        cpu_replicas: int | None = None, seed: int = 0, accumulation_steps: int = 1,
        steps_per_epoch: int | None = None, shuffle_buffer: int = 10_000,
        loss_fn: Callable | None = None, stall_timeout: float | None = None,
        sync_batchnorm: bool = False, deterministic: bool = False,
        **loop_options) -> FitResult:
    """Train model_fn() on `data` at a GLOBAL batch size; return a FitResult.

    data / validation_data: (x, y) or (x, y, sample_weight) NumPy arrays (x, y may be
    dicts/tuples for several inputs/outputs); a tf.data.Dataset of SINGLE examples (x, y)
    or (x, y, sample_weight), batched and sharded by distbatch (seeded shuffle buffer of
    `shuffle_buffer`); dataset_fn(ctx: tf.distribute.InputContext) returning the per-worker
    dataset batched to ctx.get_per_replica_batch_size(global_batch_size) (its batches per
    epoch, or `steps_per_epoch`, set the epoch); distbatch.data.files(pattern, parse_fn);
    or a distbatch ArrayDataset (validation included).
    loss: a Keras loss object or name (any reduction: distbatch takes per-example values),
    a per-example function, or one per output; default: sparse categorical cross-entropy
    from logits. metrics default: ["accuracy"] when loss is not given (or given as loss_fn,
    its older name), else none. metrics: Keras metrics or names.
    callbacks: keras.callbacks.Callback objects (EarlyStopping, ModelCheckpoint, CSVLogger,
    TerminateOnNaN, TensorBoard, your own).
    Exactly one of optimizer_fn (() -> keras optimizer) and recipe (distbatch.Recipe).
    `backend` is a name (see distbatch.backends.BACKENDS) or a Backend instance.
    deterministic: TensorFlow's op determinism on top of the seeds: two runs on the same
    backend end bit-identical (distbatch/training/seeding.py).
    sync_batchnorm: BatchNormalization layers normalise with the moments of the GLOBAL batch
    on every backend (distbatch/training/sync_batchnorm.py); default: each replica's own.
    stall_timeout: Horovod: seconds a rank waits for the others in a collective before the
    job ends with one line naming the ranks that did not arrive (default: derived from the
    measured call time, see distbatch/backends/arrivals.py). Extra
    keyword arguments go to LoopOptions (evals_per_epoch, noise_scale, steps_per_execution,
    early_stopping_metric, checkpoint_dir, resume, tensorboard_dir, verbose, ...).
    """
    import keras

    from distbatch.backends import create_backend
    from distbatch.data.inputs import FnSource, array_sources, as_source
    from distbatch.training.plan import BatchPlan
    from distbatch.training.trainer import Trainer

    if isinstance(model_fn, keras.Model):
        raise TypeError(f"model_fn must be a function returning a NEW keras.Model (called inside "
                        f"the backend's scope), got a built {type(model_fn).__name__} model; wrap the "
                        f"code that builds it: model_fn=lambda: keras.Sequential([...])")
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a function returning a keras.Model, got {type(model_fn).__name__}")
    if data is None:
        raise TypeError("data is required: (x, y) arrays, a tf.data.Dataset of single examples, a "
                        "dataset_fn(ctx) or distbatch.data.files(...); got None")
    if (optimizer_fn is None) == (recipe is None):
        raise ValueError("give exactly one of optimizer_fn and recipe")
    if recipe is not None and not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a distbatch.Recipe (e.g. distbatch.Recipe(optimizer="
                        f"\"momentum\", base_lr=0.1, base_batch_size=256)), got "
                        f"{type(recipe).__name__} {recipe!r}")
    if optimizer_fn is not None and not callable(optimizer_fn):
        raise TypeError(f"optimizer_fn must be a function returning a keras optimizer, got "
                        f"{type(optimizer_fn).__name__}")
    if loss is not None and loss_fn is not None:
        raise ValueError("give loss or loss_fn (its older name), not both")
    if loss is None and metrics is None:  # the classification default (also for loss_fn=)
        metrics = ["accuracy"]
    loss = loss if loss is not None else loss_fn
    _check_positive_int("global_batch_size", global_batch_size)
    _check_positive_int("accumulation_steps", accumulation_steps)
    for name, flag in (("sync_batchnorm", sync_batchnorm), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    _check_length(epochs, steps)
    unknown = sorted(set(loop_options) - set(LoopOptions.__dataclass_fields__) | (
        set(loop_options) & {"total_steps", "seed"}))
    if unknown:
        raise TypeError(f"fit() got unexpected keyword arguments {unknown}")
    _check_resume_dir(loop_options.get("checkpoint_dir"), loop_options.get("resume"))
    if callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise TypeError("callbacks must be a list of keras.callbacks.Callback objects")

    if isinstance(backend, str):
        backend, _ = create_backend(backend, cpu_replicas=cpu_replicas, stall_timeout=stall_timeout)
    if hasattr(data, "x_train"):  # an ArrayDataset: training and validation arrays
        train_src, val_src = array_sources(data)
        if validation_data is not None:
            val_src = as_source(validation_data, "validation_data", shuffle_buffer=shuffle_buffer)
    else:
        train_src = as_source(data, "data", shuffle_buffer=shuffle_buffer)
        val_src = as_source(validation_data, "validation_data", shuffle_buffer=shuffle_buffer)
    if isinstance(train_src, FnSource):
        if steps_per_epoch is not None:
            _check_positive_int("steps_per_epoch", steps_per_epoch)
            per_epoch = steps_per_epoch
        else:
            per_epoch = train_src.batches_per_epoch(
                worker_index=backend.worker_index, num_workers=backend.num_workers,
                num_replicas=backend.num_replicas, global_batch=global_batch_size
            ) // backend.local_replicas
        if per_epoch < 1:
            raise ValueError("data: dataset_fn(ctx) gave fewer batches than local replicas")
        num_examples = per_epoch * global_batch_size
    else:
        num_examples = train_src.num_examples(backend.num_workers)
    plan = BatchPlan.derive(global_batch_size=global_batch_size, replicas=backend.num_replicas,
                            accumulation_steps=accumulation_steps,
                            num_train_examples=num_examples, flag="global_batch_size")
    total = plan.total_steps(epochs=epochs, steps=steps)
    adascale_scale = None
    if recipe is not None and getattr(recipe, "scaling", None) == "adascale":
        if global_batch_size < recipe.base_batch_size:
            raise ValueError(f"global_batch_size must be >= recipe.base_batch_size "
                             f"({recipe.base_batch_size}) with scaling='adascale', got {global_batch_size}")
        base_plan = BatchPlan.derive(global_batch_size=recipe.base_batch_size, replicas=1,
                                     num_train_examples=num_examples, flag="recipe.base_batch_size")
        total = base_plan.total_steps(epochs=epochs, steps=steps)
        adascale_scale = global_batch_size / recipe.base_batch_size
    else:
        base_plan = plan

    seed_everything(seed, deterministic)
    with backend.scope():
        model = model_fn()
        if not isinstance(model, keras.Model):
            raise TypeError(f"model_fn must return a keras.Model, got {type(model).__name__}")
        if sync_batchnorm:
            from distbatch.training.sync_batchnorm import apply_sync_batchnorm
            apply_sync_batchnorm(model, backend)
        x_example, example = _example_output(model, train_src, plan)  # builds a subclassed model
        _check_data(loss, example, x_example, train_src, val_src)
        adascale = None
        if recipe is not None:
            if adascale_scale is not None:
                from distbatch.recipes.adascale import AdaScaleState
                adascale = AdaScaleState(scale=adascale_scale, base_batch_size=recipe.base_batch_size,
                                         total_base_steps=total)
            optimizer, _, _ = recipe.build(global_batch_size=base_plan.global_batch_size,
                                           steps_per_epoch=base_plan.steps_per_epoch,
                                           total_steps=total, adascale=adascale)
        else:
            optimizer = optimizer_fn()
            if not isinstance(optimizer, keras.optimizers.Optimizer):
                raise TypeError(f"optimizer_fn must return a keras optimizer (e.g. "
                                f"keras.optimizers.SGD(0.1)), got {type(optimizer).__name__} "
                                f"{optimizer!r}")
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    task = _task(model, loss, metrics, example)
    # Compiled before training: Keras callbacks find the metrics' directions (EarlyStopping,
    # ModelCheckpoint with mode="auto"); the saved model.keras is compiled.
    compile_model(model, optimizer, loss, task, example)
    loop_options.setdefault("verbose", False)
    options = LoopOptions(total_steps=total, seed=seed, **loop_options)
    result: RunResult = Trainer(backend, model, optimizer, plan, train_src, options, task=task,
                                validation_data=val_src, callbacks=callbacks,
                                adascale=adascale).run()
    return FitResult(history=history_dict(result.history), model=model, metrics=result.metrics,
                     records=result.history)


def evaluate(model, data, *, global_batch_size: int, backend="auto", cpu_replicas: int | None = None,
             loss=None, metrics=None, stall_timeout: float | None = None) -> dict:
    """Exact {"loss", <metric>...} of `model` over ALL of `data` at a GLOBAL batch, on any
    backend: the code of fit's validation (every example once, the last batch padded and
    masked; metrics aggregated exactly across replicas and workers; every rank gets the
    same numbers).

    data: (x, y[, sample_weight]) arrays or a tf.data.Dataset of single examples.
    loss/metrics: default the model's compiled ones; an uncompiled model gets fit's default
    (sparse categorical cross-entropy from logits, with accuracy).
    """
    import keras

    from distbatch.backends import create_backend
    from distbatch.data.inputs import as_source
    from distbatch.training.evaluation import eval_iterator, run_evaluation
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import make_eval_step

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    if data is None or callable(data) and not hasattr(data, "eval_dataset"):
        raise TypeError(f"data must be (x, y) arrays or a tf.data.Dataset of single examples, got "
                        f"{type(data).__name__}")
    _check_positive_int("global_batch_size", global_batch_size)
    if loss is None and metrics is None and getattr(model, "compiled", False):
        loss = getattr(model, "loss", None)
        compiled = getattr(model, "_compile_metrics", None)
        metrics = (getattr(compiled, "_user_weighted_metrics", None)
                   or getattr(compiled, "_user_metrics", None)) if compiled is not None else None
    if loss is None and metrics is None:
        metrics = ["accuracy"]
    if isinstance(backend, str):
        backend, _ = create_backend(backend, cpu_replicas=cpu_replicas, stall_timeout=stall_timeout)
    source = as_source(data, "data")
    n = source.num_examples(1)
    plan = BatchPlan.derive(global_batch_size=global_batch_size, replicas=backend.num_replicas,
                            num_train_examples=max(n, global_batch_size), flag="global_batch_size")
    x_example, example = _example_output(model, source, plan)
    _check_data(loss, example, x_example, source, None)
    task = _task(model, loss, metrics, example)
    eval_fn = make_eval_step(backend, model, task=task)
    return run_evaluation(backend, eval_fn, task, source,
                          eval_iterator(backend, plan, source, repeat=False))


def predict(model, x, *, global_batch_size: int, backend="auto", cpu_replicas: int | None = None,
            stall_timeout: float | None = None):
    """`model`'s outputs for every example of `x`, in order, on every rank: the examples are
    split across all replicas and workers as fit's validation splits them (the last batch
    padded and masked), each replica writes its rows into a zero buffer and one all-reduce per
    batch sums the buffers, so every rank returns the same full array (exact: each row comes
    from one replica, all others add zeros). Returns what model.predict returns: an array, or
    the model's structure of arrays for several outputs."""
    import keras
    import tensorflow as tf

    from distbatch.backends import create_backend
    from distbatch.data.inputs import ArraySource, _leaves, _map
    from distbatch.training.pipeline import eval_indices
    from distbatch.training.plan import BatchPlan

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    _check_positive_int("global_batch_size", global_batch_size)
    if isinstance(x, tf.data.Dataset) or callable(x):
        raise TypeError(f"x must be an array (or a dict/tuple of arrays), got {type(x).__name__}")
    n = len(np.asarray(_leaves(x)[0])) if _leaves(x) else 0
    source = ArraySource(x, np.zeros(n, np.int32), name="x")  # the same checks as fit's data
    if isinstance(backend, str):
        backend, _ = create_backend(backend, cpu_replicas=cpu_replicas, stall_timeout=stall_timeout)
    plan = BatchPlan.derive(global_batch_size=global_batch_size, replicas=backend.num_replicas,
                            num_train_examples=max(n, global_batch_size), flag="global_batch_size")
    example = model(_map(lambda a: np.asarray(a[:1]), source.x), training=False)
    leaves = [tf.convert_to_tensor(t) for t in tf.nest.flatten(example)]
    xs, steps = _map(tf.constant, source.x), {}

    def make(w, L):
        idx, steps["n"] = eval_indices(plan, n, worker_index=w, local_replicas=L)
        return idx.map(lambda i: (_map(lambda a: tf.gather(a, tf.maximum(i, 0)), xs), i))
    iterator = backend.iterator(make)

    def replica(xb, i):
        keep = i >= 0
        rows = tf.expand_dims(tf.boolean_mask(i, keep), 1)
        parts = [tf.scatter_nd(rows, tf.cast(tf.boolean_mask(p, keep), tf.float32),
                               [n, *p.shape[1:]])
                 for p in tf.nest.flatten(model(xb, training=False))]
        return backend.all_reduce_sum(parts, name="distbatch_predict")

    @tf.function
    def predict_all(it, count):
        total = [tf.zeros([n, *t.shape[1:]]) for t in leaves]
        for _ in tf.range(count):
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            out = backend.run(replica, tuple(next(iterator)))
            total = [a + backend.local_value(b) for a, b in zip(total, out)]
        return total

    with backend.waiting("prediction"):
        outs = predict_all(iterator, tf.constant(steps["n"], tf.int32))
    arrays = [o.numpy().astype(t.dtype.as_numpy_dtype) for o, t in zip(outs, leaves)]
    return tf.nest.pack_sequence_as(example, arrays) if len(arrays) > 1 else arrays[0]


def _check_data(loss, example, x_example, train_src, val_src) -> None:
    """Before any step: validation shapes match training; with the default loss, logits of
    shape (batch, classes) and class-index labels in range (distbatch/data/checks.py)."""
    from distbatch.data import checks
    from distbatch.data.inputs import ArraySource, DatasetSource, _leaves
    y, pred = example
    if val_src is not None and hasattr(val_src, "example_batch"):
        checks.check_same_shapes("validation_data", (x_example, y), val_src.example_batch())
    if not _is_sparse_classification(loss) or len(_leaves(y)) != 1 or len(_leaves(pred)) != 1:
        return
    for name, src in (("data", train_src), ("validation_data", val_src)):
        if src is None:
            continue
        labels = (np.asarray(_leaves(src.y)[0]) if isinstance(src, ArraySource) else
                  checks.dataset_labels(src.ds) if isinstance(src, DatasetSource) else None)
        checks.check_classification(name, labels, tuple(np.shape(_leaves(y)[0])),
                                    tuple(_leaves(pred)[0].shape))


def _is_sparse_classification(loss) -> bool:
    """The default loss, or sparse categorical cross-entropy given by name or object."""
    import keras
    return (loss is None or loss == "sparse_categorical_crossentropy"
            or isinstance(loss, keras.losses.SparseCategoricalCrossentropy))


def _example_output(model, train_src, plan) -> tuple:
    """(x, (y, model(x))) of one example: what the loss and metrics are resolved against,
    and the input the validation data's shapes are compared with."""
    import tensorflow as tf
    x, y = _example_batch(tf, train_src, plan)
    return x, (y, model(x, training=False))


def _task(model, loss, metrics, example):
    """Resolve loss and metrics against the model's outputs and one example's targets.

    Called OUTSIDE the backend's scope: metric variables made inside a strategy's scope are
    sync-on-read, and reading one under MultiWorkerMirroredStrategy is a collective (a chief
    reading alone, e.g. a Keras callback saving the model, would wait for the others)."""
    import tensorflow as tf

    from distbatch.training.task import Task
    y, pred = example
    names = list(getattr(model, "output_names", None) or [])
    n_out = len(tf.nest.flatten(pred))
    if len(names) != n_out:
        names = [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
    return Task(loss=loss, metrics=metrics, output_names=names, y_example=y, pred_example=pred)


def compile_model(model, optimizer, loss, task, example=None) -> None:
    """Compile the model with its optimizer (and schedule), loss and metrics, so a saved
    model.keras continues with keras.models.load_model(path).fit(...). `example` (y, y_pred)
    builds the compiled metrics now (Keras builds them at the first fit step)."""
    import keras
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = None
    if task.metrics:
        metrics = ([s.metric for s in task.slots] if task.n_outputs == 1 else
                   {n: [s.metric for s in task.slots if s.output == i]
                    for i, n in enumerate(task.output_names)})
    # Outside the backend's scope (see _task): the compiled metrics' variables stay plain,
    # so a callback saving the model on the chief alone does not start a collective.
    # weighted_metrics: distbatch weights its metrics by the sample weights (as Keras's
    # weighted_metrics do); without weights both are the same.
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics)
    compiled = getattr(model, "_compile_metrics", None)  # Keras 3's CompileMetrics
    if example is not None and compiled is not None and not compiled.built:
        compiled.build(*example)


def _example_batch(tf, source, plan):
    """(x, y) of one example with a batch axis: what the model and metrics are resolved on."""
    example = getattr(source, "example_batch", None)
    if example is not None:
        return example()
    # one worker driving all the plan's replicas: a layout every source accepts for this plan
    spec = source.train_dataset(plan, seed=0, worker_index=0, num_workers=1,
                                local_replicas=plan.replicas, start_step=0, total_steps=1,
                                epoch_offset=0).element_spec
    zeros = lambda s: tf.zeros([1] + [d or 1 for d in s.shape[1:]], s.dtype)  # noqa: E731
    return tf.nest.map_structure(zeros, spec[0]), tf.nest.map_structure(zeros, spec[1])


def load_model(path: str, **kwargs):
    """keras.models.load_model with distbatch's schedules and optimizers registered (a plain
    keras.models.load_model works too once distbatch.recipes.schedules/optimizers are imported)."""
    import keras

    import distbatch.recipes.adascale  # noqa: F401  (registers with Keras on import)
    import distbatch.recipes.optimizers  # noqa: F401
    import distbatch.recipes.schedules  # noqa: F401
    return keras.models.load_model(path, **kwargs)
