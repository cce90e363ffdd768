"""distbatch: data-parallel TensorFlow training, large-batch recipes, and
throughput-vs-generalization measurement per global batch size.

The names below are re-exported lazily, so `import distbatch` stays cheap
(TensorFlow loads only when a name that needs it is used).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "distbatch.api",
    "evaluate": "distbatch.api",
    "predict": "distbatch.api",
    "sweep": "distbatch.api",
    "load_model": "distbatch.api",
    "FitResult": "distbatch.api",
    "BatchPlan": "distbatch.training.plan",
    "create_backend": "distbatch.backends",
    "Trainer": "distbatch.training.trainer",
    "LoopOptions": "distbatch.training.trainer",
    "make_train_step": "distbatch.training.step",
    "make_eval_step": "distbatch.training.step",
    "scaled_learning_rate": "distbatch.recipes.schedules",
    "build_lr_schedule": "distbatch.recipes.schedules",
    "WarmupSchedule": "distbatch.recipes.schedules",
    "Recipe": "distbatch.recipes.recipe",
    "build_optimizer": "distbatch.recipes.optimizers",
    "LARS": "distbatch.recipes.optimizers",
    "load_dataset": "distbatch.data.datasets",
    "build_model": "distbatch.models",
    "NoiseScaleTracker": "distbatch.training.noise_scale",
    "UsageError": "distbatch.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distbatch' has no attribute {name!r}")
