"""distbatch: data-parallel TensorFlow training, large-batch recipes, and
throughput-vs-generalization measurement per global batch size.

The names below are re-exported lazily, so `import distbatch` stays cheap
(TensorFlow loads only when a name that needs it is used).
"""
__version__ = "0.1.0"

_EXPORTS = {
    "fit": "distbatch.api",
    "BatchPlan": "distbatch.plan",
    "create_backend": "distbatch.backends",
    "Trainer": "distbatch.trainer",
    "LoopOptions": "distbatch.trainer",
    "make_train_step": "distbatch.step",
    "make_eval_step": "distbatch.step",
    "scaled_learning_rate": "distbatch.schedules",
    "build_lr_schedule": "distbatch.schedules",
    "WarmupSchedule": "distbatch.schedules",
    "build_optimizer": "distbatch.optimizers",
    "LARS": "distbatch.optimizers",
    "load_dataset": "distbatch.data",
    "build_model": "distbatch.models",
    "NoiseScaleTracker": "distbatch.noise",
    "UsageError": "distbatch.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distbatch' has no attribute {name!r}")
