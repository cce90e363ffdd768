"""One run, whichever door it came through.

`distbatch.fit` (distbatch/api.py) and `distbatch train` (distbatch/training/job.py)
each describe a run as a :class:`RunSpec` and hand it here:

    plan_run(spec, backend)      batch arithmetic, the batch policy (fixed, schedule,
                                 goodput "auto", the noise-scale "ramp"), AdaScale's
                                 base plan, the length,
                                 the recipe checked against the run: a RunPlan,
                                 before any model or file exists
    build_run(spec, backend, rp) seeds, precision, model and optimizer in the backend's
                                 scope, the data checked against the model, the task
                                 (loss and metrics), the backend prepared: a Run
    Run.train(options)           the loop: one Trainer, a batch schedule's segments, the
                                 goodput-adaptive batch or the batch ramp

Each rule lives here once: the AdaScale base plan, the recipe build, the precision
policy, the loss-scale wrapper, the start line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from distbatch.data import checks
from distbatch.data.inputs import ArraySource, DatasetSource, FnSource, _leaves
from distbatch.errors import ParameterError, require_param
from distbatch.recipes.adascale import AdaScaleState
from distbatch.training import batch_ramp
from distbatch.training.batch_policy import FixedBatch, GoodputBatch, ScheduledBatch
from distbatch.training.batch_ramp import RampBatch, RampLR, RampSchedule, check_ramp_run
from distbatch.training.batch_schedule import (check_schedule_run, plan_schedule,
                                               schedule_recipe)
from distbatch.training.goodput import candidate_batches, probe_step_seconds
from distbatch.training.plan import BatchPlan
from distbatch.training.seeding import seed_everything
from distbatch.training.step import check_noise_scale, noise_splits_for
from distbatch.training.sync_batchnorm import apply_sync_batchnorm
from distbatch.training.task import Task
from distbatch.training.trainer import Trainer

MIXED_PRECISION = ("off", "float16", "bfloat16")
PRECISION_POLICIES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is made of, in Python values.

    model_fn: () -> keras.Model, called inside the backend's scope.
    train_source / val_source: distbatch.data.inputs sources.
    Exactly one of recipe (distbatch.Recipe) and optimizer_fn (() -> keras optimizer).
    global_batch_size: an int, "auto" (goodput-adaptive, with max_global_batch_size and an
    AdaScale recipe), "ramp" (grows with the noise scale up to max_global_batch_size,
    distbatch.training.batch_ramp) or None with batch_size_schedule [(epoch, global batch), ...].
    mixed_precision: "off" | "float16" | "bfloat16", or None to keep Keras's global policy.
    loss / metrics / loss_weights: as distbatch.fit takes them (None: sparse categorical
    cross-entropy from logits with accuracy).
    steps_per_epoch: only for a dataset_fn source (its batches per epoch otherwise).
    early_stopping / resume: what the batch policy must know of the loop.
    """
    model_fn: Callable
    train_source: Any
    val_source: Any = None
    recipe: Any = None
    optimizer_fn: Callable | None = None
    global_batch_size: int | str | None = None
    max_global_batch_size: int | None = None
    batch_size_schedule: tuple | None = None
    epochs: float | None = None
    steps: int | None = None
    accumulation_steps: int = 1
    steps_per_epoch: int | None = None
    seed: int = 0
    deterministic: bool = False
    mixed_precision: str | None = "off"
    sync_batchnorm: bool = False
    noise_scale: bool = False
    loss: Any = None
    metrics: Any = None
    loss_weights: Any = None
    early_stopping: bool = False
    resume: bool = False
    batch_param: str = "global_batch_size"   # how errors name the global batch


@dataclass(frozen=True)
class RunPlan:
    plan: BatchPlan                   # the (first) global batch
    total_steps: int                  # AdaScale: the base batch's budget (an upper bound)
    num_train_examples: int
    batch_schedule: Any = None        # batch_schedule.BatchSchedule
    recipe: Any = None                # the recipe to build (the schedule's, or the spec's)
    recipe_plan: BatchPlan | None = None  # the batch the lr schedule is written for
    adascale_scale: float | None = None
    candidates: list | None = None    # global_batch_size "auto"
    ramp: list | None = None          # global_batch_size "ramp": its candidate batches


# What a run may change when it resumes on another number of workers or replicas: the
# global batch stays, so these only change how it is split (the same sums).
WORLD_KEYS = frozenset({"backend", "cpu_replicas", "replicas", "accumulation_steps",
                        "mwms_implementation", "bytes_per_pack", "collective_timeout",
                        "plan.replicas", "plan.per_replica_batch_size", "plan.accumulation_steps"})


def resume_accumulation(global_batch_size: int, replicas: int, accumulation_steps: int, *,
                        was: int | None = None, param: str = "global_batch_size") -> int:
    """Accumulation steps for resuming a run at `global_batch_size` on `replicas`: the run's
    own when they still divide the batch, else the largest k below them that does (the
    micro-batches stay at most as large as before); ParameterError when no split exists."""
    for k in range(accumulation_steps, 0, -1):
        if global_batch_size % (replicas * k) == 0:
            return k
    raise ParameterError(
        f"{{resume}}: the run's {{{param}}} {global_batch_size} cannot be split across {replicas} "
        f"replicas{f' (it ran on {was})' if was else ''}: {global_batch_size} is not a multiple of "
        f"{replicas} x k for any accumulation k <= {accumulation_steps}; resume on a number of "
        f"replicas that divides it", "resume", param)


def train_examples(spec: RunSpec, backend) -> int:
    """Examples in one epoch of the training data as this backend reads them."""
    src = spec.train_source
    if not isinstance(src, FnSource):
        return src.num_examples(backend.num_workers)
    gb = spec.global_batch_size
    require_param(isinstance(gb, int), f"a dataset_fn takes a fixed {{{spec.batch_param}}}, got {gb!r}",
                  spec.batch_param)
    if spec.steps_per_epoch is not None:
        per_epoch = spec.steps_per_epoch
    else:
        per_epoch = src.batches_per_epoch(worker_index=backend.worker_index,
                                          num_workers=backend.num_workers,
                                          num_replicas=backend.num_replicas,
                                          global_batch=gb) // backend.local_replicas
    require_param(per_epoch >= 1, "{data}: dataset_fn(ctx) gave fewer batches than local replicas",
                  "data")
    return per_epoch * gb


def plan_run(spec: RunSpec, backend) -> RunPlan:
    """Every check that needs the backend and the data, before a model or a file exists:
    batch arithmetic, the batch policy, the length, AdaScale's base plan, the recipe."""
    n_train = train_examples(spec, backend)
    recipe, schedule, gb = spec.recipe, None, spec.global_batch_size
    units = backend.num_replicas * spec.accumulation_steps
    ramp = None
    if gb == "ramp":  # the batch ramp starts at the smallest candidate (the base batch)
        ramp = check_ramp_run(spec, recipe, units, n_train)
        gb = ramp[0]
    if spec.batch_size_schedule:
        check_schedule_run(spec.batch_size_schedule, global_batch_size=gb, steps=spec.steps,
                           epochs=spec.epochs, early_stopping=spec.early_stopping,
                           resume=spec.resume, recipe=recipe)
        schedule = plan_schedule(spec.batch_size_schedule, epochs=spec.epochs,
                                 replicas=backend.num_replicas,
                                 accumulation_steps=spec.accumulation_steps, num_train_examples=n_train)
        gb = schedule.first_plan.global_batch_size
        if recipe is not None:
            recipe = schedule_recipe(recipe, schedule)
    candidates = None
    if gb == "auto":  # the goodput-adaptive batch starts at the smallest candidate
        require_param(recipe is not None and recipe.scaling == "adascale",
                      "{global_batch_size} auto follows AdaScale's gain: give a recipe with scaling "
                      "'adascale'", "global_batch_size")
        require_param(recipe.base_batch_size <= n_train,
                      f"{{base_batch_size}} {recipe.base_batch_size} is larger than the training set "
                      f"({n_train} examples); {{global_batch_size}} auto starts at the base batch",
                      "base_batch_size", "global_batch_size")
        try:
            candidates = candidate_batches(recipe.base_batch_size, spec.max_global_batch_size,
                                           units=units, num_examples=n_train)
        except ValueError as e:
            raise ParameterError(f"{{global_batch_size}} auto: {e}", "global_batch_size") from None
        gb = candidates[0]
    plan = BatchPlan.derive(global_batch_size=gb, replicas=backend.num_replicas,
                            accumulation_steps=spec.accumulation_steps, num_train_examples=n_train,
                            param=spec.batch_param)
    total = schedule.total_steps if schedule else plan.total_steps(epochs=spec.epochs, steps=spec.steps)
    recipe_plan, scale = plan, None
    if ramp is not None and recipe.scaling != "adascale":
        # The recipe's schedule is the base batch's; the ramp scales its lr (batch_ramp.RampLR).
        recipe_plan = BatchPlan.derive(global_batch_size=recipe.base_batch_size, replicas=1,
                                       num_train_examples=n_train, param="base_batch_size")
        total = recipe_plan.total_steps(epochs=spec.epochs, steps=spec.steps)
    if recipe is not None and recipe.scaling == "adascale":
        require_param(schedule is None, "{scaling} adascale adapts the lr to a fixed global batch; "
                                        "it does not combine with {batch_size_schedule}",
                      "scaling", "batch_size_schedule")
        require_param(plan.global_batch_size >= recipe.base_batch_size,
                      f"{{scaling}} adascale needs {{{spec.batch_param}}} >= {{base_batch_size}} "
                      f"({recipe.base_batch_size}), got {plan.global_batch_size}",
                      "scaling", spec.batch_param, "base_batch_size")
        # The length is the BASE batch's; the run ends when tau reaches it (at most that many steps).
        recipe_plan = BatchPlan.derive(global_batch_size=recipe.base_batch_size, replicas=1,
                                       num_train_examples=n_train, param="base_batch_size")
        total = recipe_plan.total_steps(epochs=spec.epochs, steps=spec.steps)
        scale = plan.global_batch_size / recipe.base_batch_size
    if spec.noise_scale or (scale or 1) > 1 or ramp is not None:
        check_noise_scale(plan, noise_splits_for(plan))
    if recipe is not None:
        # Only to validate the recipe against the run (e.g. warmup longer than training);
        # build_run builds the real optimizer in the backend's scope. AdaScale's schedule is
        # the base batch's plain one.
        check = recipe.replace(scaling="none") if scale is not None else recipe
        check.build(global_batch_size=recipe_plan.global_batch_size,
                    steps_per_epoch=recipe_plan.steps_per_epoch, total_steps=total)
    return RunPlan(plan, total, n_train, schedule, recipe, recipe_plan, scale, candidates, ramp)


@dataclass
class Run:
    """A built run: model and optimizer in the backend's scope, ready to train."""
    spec: RunSpec
    backend: Any
    rp: RunPlan
    model: Any
    optimizer: Any
    task: Any
    recipe: dict = field(default_factory=dict)   # summary.json's recipe fields ({} with optimizer_fn)
    schedule: Any = None                         # the lr schedule (recipes)
    adascale: Any = None
    example: tuple | None = None                 # (x, y) of one example
    ramp_lr: Any = None                          # batch_ramp.RampLR (global_batch_size "ramp")

    @property
    def plan(self) -> BatchPlan:
        return self.rp.plan

    def start_lines(self, reason: str) -> list[str]:
        """What a run says when it starts: backend and why, the global batch as per replica x
        replicas x accumulation, steps, peak lr; the batch policy when it is not fixed."""
        plan, rp = self.rp.plan, self.rp
        lr = (f"peak lr {self.recipe['peak_lr']:.4g}, warmup {self.recipe['warmup_steps']} steps"
              if self.recipe else f"lr {_optimizer_lr(self.optimizer)}")
        lines = [f"distbatch: {self.backend.describe()} ({reason}); global batch "
                 f"{plan.global_batch_size} = {plan.per_replica_batch_size} per replica x "
                 f"{plan.replicas} replicas x {plan.accumulation_steps} accumulation; "
                 f"{plan.steps_per_epoch} steps/epoch, {rp.total_steps} steps; {lr}"]
        if self.recipe and self.recipe.get("scaling_capped") is not None:  # adaptive-sqrt
            r = self.recipe
            capped = ", ".join(r["scaling_capped"]) or "nothing"
            lines[0] += (f"; beta_1 {r['beta_1']:.4g}, beta_2 {r['beta_2']:.4g}, epsilon "
                         f"{r['epsilon']:.3g} (capped: {capped})")
        if rp.ramp is not None:
            lr = ("AdaScale lr" if self.adascale is not None else
                  f"lr by the {rp.recipe.scaling} rule at each batch")
            lines.append(f"distbatch: global batch ramp: from {rp.ramp[0]}, at each epoch end the "
                         f"largest of {rp.ramp} not above {batch_ramp.RAMP_FACTOR:g} x B_simple (never lower); "
                         f"{lr}")
        elif rp.candidates is not None:
            lines.append(f"distbatch: global batch auto: chosen by goodput at each epoch among "
                         f"{rp.candidates}; AdaScale lr; ends when tau reaches {rp.total_steps} "
                         f"base-batch steps")
        elif self.adascale is not None:
            a = self.adascale
            lines.append(f"distbatch: AdaScale at S = {a.scale:g} x base batch {a.base_batch_size}: "
                         f"lr = gain x schedule(tau); ends when tau reaches {rp.total_steps} base-batch "
                         f"steps (between {math.ceil(rp.total_steps / a.scale)} and {rp.total_steps} "
                         f"steps)")
        elif rp.batch_schedule is not None:
            lines.append("distbatch: global batch schedule: " + ", ".join(
                f"{s.plan.global_batch_size} from epoch {s.start_epoch}" for s in rp.batch_schedule.segments))
        return lines

    def batch_policy(self, options, log: Callable[[str], None]):
        """(the batch policy, the loop options it needs): fixed, the batch-size schedule, the
        goodput-adaptive batch ("auto") or the batch ramp (batch_policy.py, batch_ramp.py)."""
        rp, spec, backend = self.rp, self.spec, self.backend
        if rp.ramp is not None:  # the ramp follows the measured noise scale
            policy = RampBatch(candidates=rp.ramp, base_batch=rp.recipe.base_batch_size,
                               rule=rp.recipe.scaling, replicas=backend.num_replicas,
                               num_train_examples=rp.num_train_examples, epochs=spec.epochs,
                               total_steps=options.total_steps,
                               accumulation_steps=spec.accumulation_steps, lr_state=self.ramp_lr,
                               adascale=self.adascale, max_global_batch_size=spec.max_global_batch_size,
                               optimizer=self.optimizer, log=log)
            return policy, replace(options, noise_scale=True)
        if rp.candidates is not None:
            return GoodputBatch(backend, adascale=self.adascale, candidates=rp.candidates,
                                probe=self.probe, num_train_examples=rp.num_train_examples,
                                total_steps=options.total_steps,
                                accumulation_steps=spec.accumulation_steps, log=log), options
        if rp.batch_schedule is not None:
            lr = (lambda s: float(self.schedule(s))) if self.schedule is not None else None
            # options.total_steps is rp.total_steps (job.py, api.py): the schedule's own length
            return ScheduledBatch(rp.batch_schedule, lr, log=log), options
        return FixedBatch(rp.plan, options.total_steps), options

    def train(self, options, *, callbacks=None, log: Callable[[str], None] | None = None):
        """Train with `options` (trainer.LoopOptions) on ONE Trainer consulting the run's batch
        policy; returns a trainer.RunResult."""
        policy, options = self.batch_policy(options, log or (lambda m: None))
        return Trainer(self.backend, self.model, self.optimizer, self.rp.plan, self.spec.train_source,
                       options, adascale=self.adascale, task=self.task,
                       validation_data=self.spec.val_source, callbacks=callbacks, policy=policy).run()

    def probe(self, batch: int) -> float:
        """Seconds per step at `batch` (the slowest rank's) on a throwaway copy of the model,
        for the goodput-adaptive batch."""

        return probe_step_seconds(self.backend, self.spec.model_fn,
                                  lambda: keras.optimizers.SGD(0.01, momentum=0.9), self.example,
                                  batch, task=self.task, accumulation_steps=self.spec.accumulation_steps)


def _optimizer_lr(optimizer) -> str:
    try:
        return f"{float(np.asarray(optimizer.learning_rate)):.4g}"
    except (TypeError, ValueError):
        return type(optimizer.learning_rate).__name__


def set_precision(policy: str | None) -> None:
    """Keras's global dtype policy for "off" | "float16" | "bfloat16"; None leaves it."""
    if policy is None:
        return
    keras.mixed_precision.set_dtype_policy(PRECISION_POLICIES[policy])


def build_run(spec: RunSpec, backend, rp: RunPlan) -> Run:
    """Seeds, precision, then model and optimizer inside the backend's scope (slots built
    before the first step), the data checked against the model's output, the backend
    prepared (Horovod broadcasts rank 0's state), the model compiled."""

    seed_everything(spec.seed, spec.deterministic)
    set_precision(spec.mixed_precision)
    adascale = schedule = ramp_lr = None
    recipe: dict = {}
    with backend.scope():
        model = spec.model_fn()
        if not isinstance(model, keras.Model):
            raise TypeError(f"model_fn must return a keras.Model, got {type(model).__name__}")
        if spec.sync_batchnorm:
            apply_sync_batchnorm(model, backend)
        x_example, example = example_output(model, spec.train_source, rp.plan)  # builds it
        check_data(spec.loss, example, x_example, spec.train_source, spec.val_source)
        if spec.recipe is not None:
            if rp.adascale_scale is not None:
                adascale = AdaScaleState(scale=rp.adascale_scale,
                                         base_batch_size=spec.recipe.base_batch_size,
                                         total_base_steps=rp.total_steps,
                                         always_measure=rp.candidates is not None
                                         or rp.ramp is not None)
            optimizer, schedule, recipe = rp.recipe.build(
                global_batch_size=rp.recipe_plan.global_batch_size,
                steps_per_epoch=rp.recipe_plan.steps_per_epoch, total_steps=rp.total_steps,
                adascale=adascale)
            if rp.ramp is not None and adascale is None:  # the lr follows the batch
                ramp_lr = RampLR()
                schedule = RampSchedule(schedule, ramp_lr)
                optimizer.learning_rate = schedule
        else:
            optimizer = spec.optimizer_fn()
            if not isinstance(optimizer, keras.optimizers.Optimizer):
                raise TypeError(f"optimizer_fn must return a keras optimizer (e.g. "
                                f"keras.optimizers.SGD(0.1)), got {type(optimizer).__name__} "
                                f"{optimizer!r}")
        if spec.mixed_precision == "float16" and not isinstance(
                optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    task = resolve_task(model, spec.loss, spec.metrics, example, spec.loss_weights)
    # Compiled before training: Keras callbacks find the metrics' directions (EarlyStopping,
    # ModelCheckpoint with mode="auto"); the saved model.keras is compiled.
    compile_model(model, optimizer, spec.loss, task, example, spec.loss_weights)
    return Run(spec, backend, rp, model, optimizer, task, recipe, schedule, adascale,
               (x_example, example[0]), ramp_lr)


# -- the model against the data ---------------------------------------------------------

def example_output(model, source, plan) -> tuple:
    """(x, (y, model(x))) of one example: what the loss and metrics are resolved against,
    and the input the validation data's shapes are compared with."""
    x, y = example_batch(source, plan)
    return x, (y, model(x, training=False))


def example_batch(source, plan):
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


def check_data(loss, example, x_example, train_src, val_src) -> None:
    """Before any step: validation shapes match training; with the default loss, logits of
    shape (batch, classes) and class-index labels in range (distbatch/data/checks.py)."""
    y, pred = example
    if val_src is not None and hasattr(val_src, "example_batch"):
        checks.check_same_shapes("validation_data", (x_example, y), val_src.example_batch())
    if not is_sparse_classification(loss) or len(_leaves(y)) != 1 or len(_leaves(pred)) != 1:
        return
    for name, src in (("data", train_src), ("validation_data", val_src)):
        if src is None:
            continue
        labels = (np.asarray(_leaves(src.y)[0]) if isinstance(src, ArraySource) else
                  checks.dataset_labels(src.ds) if isinstance(src, DatasetSource) else None)
        checks.check_classification(name, labels, tuple(np.shape(_leaves(y)[0])),
                                    tuple(_leaves(pred)[0].shape))


def is_sparse_classification(loss) -> bool:
    """The default loss, or sparse categorical cross-entropy given by name or object."""
    return (loss is None or loss == "sparse_categorical_crossentropy"
            or isinstance(loss, keras.losses.SparseCategoricalCrossentropy))


def resolve_task(model, loss, metrics, example, loss_weights=None):
    """Resolve loss and metrics against the model's outputs and one example's targets.

    Called OUTSIDE the backend's scope: metric variables made inside a strategy's scope are
    sync-on-read, and reading one under MultiWorkerMirroredStrategy is a collective (a chief
    reading alone, e.g. a Keras callback saving the model, would wait for the others)."""

    y, pred = example
    if loss is None and metrics is None:  # the classification default
        metrics = ["accuracy"]
    names = list(getattr(model, "output_names", None) or [])
    n_out = len(tf.nest.flatten(pred))
    if len(names) != n_out:
        names = [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
    return Task(loss=loss, metrics=metrics, output_names=names, y_example=y, pred_example=pred,
                loss_weights=loss_weights)


def compile_model(model, optimizer, loss, task, example=None, loss_weights=None) -> None:
    """Compile the model with its optimizer (and schedule), loss and metrics, so a saved
    model.keras continues with keras.models.load_model(path).fit(...). `example` (y, y_pred)
    builds the compiled metrics now (Keras builds them at the first fit step)."""
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = None
    if task.metrics:
        metrics = ([s.metric for s in task.slots] if task.n_outputs == 1 else
                   {n: [s.metric for s in task.slots if s.output == i]
                    for i, n in enumerate(task.output_names)})
    # Outside the backend's scope (see resolve_task): the compiled metrics' variables stay
    # plain, so a callback saving the model on the chief alone does not start a collective.
    # weighted_metrics: distbatch weights its metrics by the sample weights (as Keras's
    # weighted_metrics do); without weights both are the same.
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics,
                  loss_weights=loss_weights)
    compiled = getattr(model, "_compile_metrics", None)  # Keras 3's CompileMetrics
    if example is not None and compiled is not None and not compiled.built:
        compiled.build(*example)


def release_from_strategy(model, optimizer) -> None:
    """Make a model trained under a tf.distribute strategy a plain Keras model again, so the
    user can compile, evaluate, predict and fit it outside any scope (Keras otherwise refuses:
    "Mixing different tf.distribute.Strategy objects"): every model and optimizer variable
    gets a plain tf.Variable with its current value, and both forget the strategy."""
    seen: set = set()
    opt = getattr(optimizer, "inner_optimizer", None)
    optimizers = [o for o in (optimizer, opt) if o is not None]
    for v in [*model.variables, *(w for o in optimizers for w in o.variables)]:
        inner = getattr(v, "_value", None)
        if id(v) in seen or not isinstance(inner, tf.distribute.DistributedValues):
            continue
        seen.add(id(v))
        v._value = tf.Variable(tf.convert_to_tensor(inner), trainable=inner.trainable,
                               name=inner.name.split(":")[0])
    model._distribute_strategy = None
    for o in optimizers:
        if hasattr(o, "_distribution_strategy"):
            o._distribution_strategy = tf.distribute.get_strategy()
