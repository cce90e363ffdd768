"""The Python front door: plug in any Keras 3 model, loss and optimizer.

    import distbatch, keras
    result = distbatch.fit(
        model_fn=lambda: keras.Sequential([...]),
        optimizer_fn=lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        data=distbatch.load_dataset("mnist1d"),
        global_batch_size=256, epochs=5, backend="auto")

model_fn and optimizer_fn are called inside the backend's scope, so variables
are mirrored where they must be; the optimizer's slots are built before the
first step; Horovod broadcasts the initial state from rank 0. loss_fn(y, out)
must return PER-EXAMPLE losses (e.g. keras.losses.SparseCategoricalCrossentropy(
from_logits=True, reduction=None)); distbatch averages over the global batch.
"""
from __future__ import annotations

from typing import Callable

from distbatch.training.trainer import LoopOptions, RunResult


def fit(*, model_fn: Callable, optimizer_fn: Callable, data, global_batch_size: int,
        epochs: float | None = None, steps: int | None = None, backend="auto",
        cpu_replicas: int | None = None, loss_fn: Callable | None = None, seed: int = 0,
        accumulation_steps: int = 1, **loop_options) -> RunResult:
    """Train model_fn() with optimizer_fn() on data at a GLOBAL batch size; return the result.

    `backend` is a name (see distbatch.backends.BACKENDS) or a Backend instance.
    Extra keyword arguments go to LoopOptions (evals_per_epoch, noise_scale,
    target_accuracy, early_stopping_metric, checkpoint_dir, tensorboard_dir, ...).
    The trained model is result.model.
    """
    import keras

    from distbatch.backends import create_backend
    from distbatch.training.plan import BatchPlan
    from distbatch.training.trainer import Trainer

    if isinstance(backend, str):
        backend, _ = create_backend(backend, cpu_replicas=cpu_replicas)
    plan = BatchPlan.derive(global_batch_size=global_batch_size, replicas=backend.num_replicas,
                            accumulation_steps=accumulation_steps,
                            num_train_examples=len(data.x_train))
    total = plan.total_steps(epochs=epochs, steps=steps)
    keras.utils.set_random_seed(seed)
    with backend.scope():
        model = model_fn()
        optimizer = optimizer_fn()
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    loop_options.setdefault("verbose", False)
    options = LoopOptions(total_steps=total, seed=seed, **loop_options)
    result = Trainer(backend, model, optimizer, plan, data, options, loss_fn=loss_fn).run()
    result.model = model
    return result
