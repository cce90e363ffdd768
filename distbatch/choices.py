"""The names the CLI offers as flag choices, in a module without TensorFlow.

Building the argument parser (and so the CLI's help) imports only this;
the implementations (distbatch/recipes/optimizers.py, distbatch/recipes/schedules.py,
distbatch/backends/, distbatch/models.py) import their names from here, so the two cannot
drift apart, and they are free to import TensorFlow at the top.
"""
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "lars")
# The Adam family: the ones adaptive-sqrt rescales and AdaScale scales by gain ** 0.5.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "lamb")
SCALING_RULES = ("linear", "sqrt", "adaptive-sqrt", "none")
WARMUP_MODES = ("gradual", "constant", "none")
DECAYS = ("constant", "cosine", "step", "linear")
# Gradient types on the wire (training/step.py checks them against the backend).
GRAD_COMPRESSION = ("none", "fp16", "bf16")
# Backends by name (distbatch/backends/; "auto" picks one: backends.choose_backend).
BACKENDS = ("auto", "single", "mirrored", "multiworker", "horovod")
# Named models (distbatch/models.py); the keras.applications ones need images of at least 32x32.
APPLICATIONS = ("ResNet50", "ResNet101", "MobileNetV2", "EfficientNetB0", "VGG16", "DenseNet121")
MODELS = ("mlp", "mlp-wide", "convnet", "resnet") + APPLICATIONS
