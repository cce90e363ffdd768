"""The names the CLI offers as flag choices, in a module without TensorFlow.

Building the argument parser (and so the CLI's help) imports only this;
the implementations (distbatch/recipes/optimizers.py, distbatch/recipes/schedules.py) import
their names from here, so the two cannot drift apart.
"""
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "lars")
# The Adam family: the ones adaptive-sqrt rescales and AdaScale scales by gain ** 0.5.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "lamb")
SCALING_RULES = ("linear", "sqrt", "adaptive-sqrt", "none")
WARMUP_MODES = ("gradual", "constant", "none")
DECAYS = ("constant", "cosine", "step", "linear")
# Gradient types on the wire (training/step.py checks them against the backend).
GRAD_COMPRESSION = ("none", "fp16", "bf16")
