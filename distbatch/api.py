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

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from distbatch.backends import create_backend
from distbatch.data.indices import eval_indices
from distbatch.data.inputs import ArraySource, _leaves, _map, array_sources, as_source
from distbatch.errors import ParameterError, UsageError
from distbatch.fileio import atomic_write_json
from distbatch.measure.sweep import DEFAULT_BATCH_SIZES, run_sweep, sweep_config
from distbatch.models import MODELS, build_model
# distbatch's schedules and optimizers register with Keras on import (load_model needs them)
import distbatch.recipes.adascale  # noqa: E402,F401
import distbatch.recipes.optimizers  # noqa: E402,F401
import distbatch.recipes.schedules  # noqa: E402,F401
from distbatch.recipes.recipe import Recipe
from distbatch.training import assembly, fit_resume
from distbatch.training.assembly import (check_data, compile_model, example_output,  # noqa: F401
                                         resolve_task)
from distbatch.training.batch_schedule import parse_batch_schedule
from distbatch.training.evaluation import eval_iterator, run_evaluation
from distbatch.training.job import load_named_data
from distbatch.training.plan import BatchPlan
from distbatch.training.step import make_eval_step
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


def _check_batch(global_batch_size, max_global_batch_size, batch_size_schedule) -> None:
    if global_batch_size in ("auto", "ramp"):
        if max_global_batch_size is None:
            raise ValueError(f"global_batch_size={global_batch_size!r} needs max_global_batch_size "
                             "(the largest batch it may choose)")
        _check_positive_int("max_global_batch_size", max_global_batch_size)
        return
    if max_global_batch_size is not None:
        raise ValueError(f"max_global_batch_size={max_global_batch_size} only applies to "
                         f"global_batch_size='auto' or 'ramp', got global_batch_size="
                         f"{global_batch_size!r}")
    if global_batch_size is None:
        if batch_size_schedule is None:
            raise TypeError("global_batch_size is required: an int, 'auto', 'ramp', or None with "
                            "batch_size_schedule=[(epoch, global batch), ...]")
        return
    if isinstance(global_batch_size, str):
        raise ValueError(f"global_batch_size must be an int, 'auto' or 'ramp', got {global_batch_size!r}")
    _check_positive_int("global_batch_size", global_batch_size)


def _named_model(name: str, data):
    """model_fn given as a built-in model name: built for the data's input shape and classes."""
    if name not in MODELS:
        raise ValueError(f"model_fn: unknown built-in model {name!r}; expected a function returning "
                         f"a keras.Model or one of {', '.join(MODELS)}")
    if data is None:
        raise TypeError(f"model_fn={name!r} needs data with a known input shape and classes")
    shape, classes = data
    return lambda: build_model(name, shape, classes)


def _shape_and_classes(train_src, num_classes):
    """(input shape, classes) of array data for a built-in model: classes = max label + 1."""
    if not isinstance(train_src, ArraySource) or len(_leaves(train_src.x)) != 1:
        return None
    x, y = np.asarray(_leaves(train_src.x)[0]), np.asarray(_leaves(train_src.y)[0])
    classes = num_classes if num_classes is not None else int(y.max()) + 1 if y.size else 2
    return tuple(x.shape[1:]), classes


def fit(*, model_fn: Callable | str, optimizer_fn: Callable | None = None, recipe=None, data,
        validation_data=None, loss=None, metrics=None, loss_weights=None, callbacks=None,
        global_batch_size: int | str | None = None, max_global_batch_size: int | None = None,
        batch_size_schedule=None, epochs: float | None = None, steps: int | None = None,
        backend="auto", cpu_replicas: int | None = None, seed: int = 0,
        accumulation_steps: int = 1, steps_per_epoch: int | None = None,
        shuffle_buffer: int = 10_000, mixed_precision: str | None = None,
        num_classes: int | None = None, train_size: int | None = None,
        val_size: int | None = None, data_seed: int = 0, loss_fn: Callable | None = None,
        stall_timeout: float | None = None, sync_batchnorm: bool = False,
        deterministic: bool = False, **loop_options) -> FitResult:
    """Train model_fn() on `data` at a GLOBAL batch size; return a FitResult.

    model_fn: () -> a NEW keras.Model (called inside the backend's scope), or a built-in
    model name ("mlp", "convnet", ... the names `distbatch train` takes).
    data / validation_data: (x, y) or (x, y, sample_weight) NumPy arrays (x, y may be
    dicts/tuples for several inputs/outputs); a tf.data.Dataset of SINGLE examples (x, y)
    or (x, y, sample_weight), batched and sharded by distbatch (seeded shuffle buffer of
    `shuffle_buffer`); dataset_fn(ctx: tf.distribute.InputContext) returning the per-worker
    dataset batched to ctx.get_per_replica_batch_size(global_batch_size) (its batches per
    epoch, or `steps_per_epoch`, set the epoch); distbatch.data.files(pattern, parse_fn);
    a distbatch ArrayDataset (validation included); or a dataset spec string as `distbatch
    train` takes it (a built-in name or a path; with data_seed, train_size, val_size,
    num_classes as the CLI's flags), whose validation split is used unless validation_data
    is given.
    loss: a Keras loss object or name (any reduction: distbatch takes per-example values),
    a per-example function, or one per output; loss_weights: one number per output (list or
    {output name: weight}), as Keras compile takes them. Default loss: sparse categorical
    cross-entropy from logits, with metrics ["accuracy"] when neither is given.
    callbacks: keras.callbacks.Callback objects (EarlyStopping, ModelCheckpoint, CSVLogger,
    TerminateOnNaN, TensorBoard, ReduceLROnPlateau, your own); they run on the chief with
    global metrics, and their lr and stop decisions reach every rank.
    Exactly one of optimizer_fn (() -> keras optimizer) and recipe (distbatch.Recipe; AdaScale
    with Recipe(scaling="adascale")).
    global_batch_size: an int; "auto" (chosen by goodput at each epoch, up to
    max_global_batch_size, with an AdaScale recipe); "ramp" (from the recipe's base batch,
    raised at each epoch end to the largest base x 2^k <= max_global_batch_size not above 2 x
    the measured noise scale B_simple, never lowered; the lr follows the recipe's scaling rule;
    docs/batch_ramp.md); or None with batch_size_schedule
    [(epoch, global batch), ...] (or "0:64,10:128"), which raises the batch at whole epochs.
    mixed_precision: "off" | "float16" (loss scaling) | "bfloat16"; None (default) keeps
    Keras's global dtype policy as it is.
    `backend` is a name (see distbatch.backends.BACKENDS) or a Backend instance.
    deterministic: TensorFlow's op determinism on top of the seeds: two runs on the same
    backend end bit-identical (distbatch/training/seeding.py).
    sync_batchnorm: BatchNormalization layers normalise with the moments of the GLOBAL batch
    on every backend (distbatch/training/sync_batchnorm.py); default: each replica's own.
    stall_timeout: Horovod: seconds a rank waits for the others in a collective before the
    job ends with one line naming the ranks that did not arrive (default: derived from the
    measured call time, see distbatch/backends/arrivals.py). Extra keyword arguments go to
    LoopOptions (evals_per_epoch, noise_scale, target_accuracy, steps_per_execution,
    early_stopping_metric, checkpoint_dir, resume, tensorboard_dir, verbose, ...);
    verbose=True prints the CLI's start line and progress.
    """


    if isinstance(model_fn, keras.Model):
        raise TypeError(f"model_fn must be a function returning a NEW keras.Model (called inside "
                        f"the backend's scope), got a built {type(model_fn).__name__} model; wrap the "
                        f"code that builds it: model_fn=lambda: keras.Sequential([...])")
    if not callable(model_fn) and not isinstance(model_fn, str):
        raise TypeError(f"model_fn must be a function returning a keras.Model or a built-in model "
                        f"name, got {type(model_fn).__name__}")
    if data is None:
        raise TypeError("data is required: (x, y) arrays, a tf.data.Dataset of single examples, a "
                        "dataset_fn(ctx), distbatch.data.files(...) or a dataset name or path; got None")
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
    if loss is None and loss_fn is not None and metrics is None:
        metrics = ["accuracy"]  # loss_fn= kept the classification default's metrics
    loss = loss if loss is not None else loss_fn
    _check_batch(global_batch_size, max_global_batch_size, batch_size_schedule)
    _check_positive_int("accumulation_steps", accumulation_steps)
    for name, flag in (("sync_batchnorm", sync_batchnorm), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if mixed_precision is not None and mixed_precision not in assembly.MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(assembly.MIXED_PRECISION)} "
                         f"(or None: Keras's global policy), got {mixed_precision!r}")
    for name, value in (("num_classes", num_classes), ("train_size", train_size), ("val_size", val_size)):
        if value is not None:
            _check_positive_int(name, value)
    if not isinstance(data, str) and (train_size, val_size) != (None, None):
        raise ValueError("train_size and val_size apply to data given as a dataset name or path")
    if batch_size_schedule is not None:
        parse_batch_schedule(batch_size_schedule)
    _check_length(epochs, steps)
    unknown = sorted(set(loop_options) - set(LoopOptions.__dataclass_fields__) | (
        set(loop_options) & {"total_steps", "seed", "step_offset", "epoch_offset"}))
    if unknown:
        raise TypeError(f"fit() got unexpected keyword arguments {unknown}")
    _check_resume_dir(loop_options.get("checkpoint_dir"), loop_options.get("resume"))
    if callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise TypeError("callbacks must be a list of keras.callbacks.Callback objects")

    reason = "given"
    if isinstance(backend, str):
        backend, reason = create_backend(backend, cpu_replicas=cpu_replicas, stall_timeout=stall_timeout)
    shape_classes = None
    if isinstance(data, str):
        try:
            data = load_named_data(data, seed=data_seed, train_size=train_size, val_size=val_size,
                                   num_classes=num_classes)
        except ParameterError:
            raise
        except UsageError as e:  # the dataset's own line, said of the parameter
            raise ParameterError(f"{{data}}: {e}", "data") from None
        shape_classes = (data.input_shape, data.num_classes)
    if hasattr(data, "x_train"):  # an ArrayDataset: training and validation arrays
        train_src, val_src = array_sources(data)
    elif hasattr(data, "train_source"):  # files streamed
        train_src, val_src = data.train_source, data.val_source
    else:
        train_src, val_src = as_source(data, "data", shuffle_buffer=shuffle_buffer), None
    if validation_data is not None or val_src is None:
        val_src = as_source(validation_data, "validation_data", shuffle_buffer=shuffle_buffer)
    if isinstance(model_fn, str):
        model_fn = _named_model(model_fn, shape_classes or _shape_and_classes(train_src, num_classes))
    if steps_per_epoch is not None:
        _check_positive_int("steps_per_epoch", steps_per_epoch)
    spec = assembly.RunSpec(
        model_fn=model_fn, train_source=train_src, val_source=val_src, recipe=recipe,
        optimizer_fn=optimizer_fn, global_batch_size=global_batch_size,
        max_global_batch_size=max_global_batch_size, batch_size_schedule=batch_size_schedule,
        epochs=epochs, steps=steps, accumulation_steps=accumulation_steps,
        steps_per_epoch=steps_per_epoch, seed=seed, deterministic=deterministic,
        mixed_precision=mixed_precision, sync_batchnorm=sync_batchnorm,
        noise_scale=bool(loop_options.get("noise_scale")), loss=loss, metrics=metrics,
        loss_weights=loss_weights, early_stopping=bool(loop_options.get("early_stopping_metric")),
        resume=bool(loop_options.get("resume")))
    if loop_options.get("resume") and loop_options.get("checkpoint_dir"):
        spec = fit_resume.resplit_for_resume(spec, backend, loop_options["checkpoint_dir"])
    rp = assembly.plan_run(spec, backend)
    loop_options.setdefault("verbose", False)
    options = LoopOptions(total_steps=rp.total_steps, seed=seed, **loop_options)
    settings = fit_resume.resume_settings(spec, rp, backend)
    if options.checkpoint_dir and options.resume:  # before anything is built or written
        fit_resume.check_resume_settings(settings, options.checkpoint_dir)
    policy = keras.mixed_precision.dtype_policy()
    try:
        run = assembly.build_run(spec, backend, rp)
        if options.checkpoint_dir and backend.is_chief:
            os.makedirs(options.checkpoint_dir, exist_ok=True)
            atomic_write_json(os.path.join(options.checkpoint_dir, fit_resume.FIT_SETTINGS), settings)
        if options.verbose and backend.is_chief:
            for line in run.start_lines(reason):
                print(line, file=sys.stderr, flush=True)
        result: RunResult = run.train(options, callbacks=callbacks, log=(
            lambda m: print(m, file=sys.stderr, flush=True)) if options.verbose and backend.is_chief
            else None)
        if getattr(backend, "strategy", None) is not None:
            # (after the last collective: releasing is local to each worker)
            assembly.release_from_strategy(run.model, run.optimizer)
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    return FitResult(history=history_dict(result.history), model=run.model, metrics=result.metrics,
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
    x_example, example = example_output(model, source, plan)
    check_data(loss, example, x_example, source, None)
    task = resolve_task(model, loss, metrics, example)
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


def sweep(*, out: str, batch_sizes=None, scalings=None, seeds=1, recipe=None,
          **settings) -> list[dict]:
    """`distbatch sweep` from Python: train every (scaling rule, global batch, seed) point,
    write the same files as the CLI into `out` (results.jsonl/.csv, config.json, TensorBoard,
    report.md with its plots) and return the rows (one dict per point).

    batch_sizes: the global batch sizes (default the CLI's, 32 to 1024); scalings: rules to
    compare, e.g. ["linear", "adascale"] (default the recipe's); seeds: a count or the seeds.
    recipe: a distbatch.Recipe replacing the sweep's default recipe fields it sets.
    settings: TrainConfig fields as `distbatch sweep` takes them (model, dataset, epochs,
    steps, train_size, val_size, target_accuracy, evals_per_epoch, backend, cpu_replicas,
    resume, overwrite, progress, ... and any Recipe field, e.g. base_lr); the defaults are
    the CLI's (distbatch.measure.sweep.SWEEP_DEFAULTS). Errors name the parameters.
    """

    if recipe is not None:
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a distbatch.Recipe, got {type(recipe).__name__}")
        settings = {**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)},
                    **settings}
    try:
        base = sweep_config(**settings)
    except TypeError as e:  # an unknown field: name it as fit does
        raise TypeError(f"sweep() got an unexpected setting: {e}") from None
    return run_sweep(base, batch_sizes=batch_sizes or DEFAULT_BATCH_SIZES, scalings=scalings,
                     seeds=seeds, out=out)


def load_model(path: str, **kwargs):
    """keras.models.load_model with distbatch's schedules and optimizers registered (a plain
    keras.models.load_model works too once distbatch.recipes.schedules/optimizers are imported)."""
    return keras.models.load_model(path, **kwargs)
