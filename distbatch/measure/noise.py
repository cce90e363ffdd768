"""The gradient noise scale: its estimator lives with the training step that feeds it
(distbatch/training/noise_scale.py); importable from here too."""
from distbatch.training.noise_scale import NoiseScaleTracker, unbiased_estimates  # noqa: F401
