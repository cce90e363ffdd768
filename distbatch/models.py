"""Named models for the CLI. Any Keras 3 model works through the Python API.

Every model ends in float32 logits (also under a mixed-precision policy), so
the loss is computed in float32.

Keras is imported inside build_model: distbatch/cli/train.py's parser and
distbatch/training/config.py still read MODELS from here, and the CLI's help must not load
TensorFlow. It moves to the top once they read MODELS from distbatch/choices.py.
"""
from __future__ import annotations

from typing import Sequence

from distbatch import machine
from distbatch.choices import APPLICATIONS, MODELS  # noqa: F401 (importable from here too)
from distbatch.errors import ParameterError, UsageError


# Copies of the output layer alive while training: weights, gradients, up to 2 optimizer slots.
OUTPUT_LAYER_COPIES = 4


def check_output_layer(features: int | None, num_classes: int, memory: int | None = None) -> None:
    """ParameterError unless a (features + 1) x num_classes float32 output layer, times
    OUTPUT_LAYER_COPIES, fits in this machine's memory (`memory` bytes; default: its RAM).

    Without it an impossible class count (num_classes 50000001, or a label that large) ends
    in TensorFlow's ResourceExhaustedError traceback while the model is built. The limit is
    the RAM: a GPU holds less, so this refuses only what cannot work anywhere on the machine."""
    if features is None:  # an unknown width: Keras reports that itself
        return
    memory = machine.physical_memory() if memory is None else memory
    weights = (int(features) + 1) * int(num_classes)
    need = weights * 4 * OUTPUT_LAYER_COPIES
    if memory and need > memory:
        most = memory // (4 * OUTPUT_LAYER_COPIES * (int(features) + 1))
        raise ParameterError(
            f"{{num_classes}} {num_classes} (given, or the largest label + 1) needs an output layer "
            f"of {int(features) + 1} x {num_classes} float32 weights = {need / 2**30:,.1f} GiB with "
            f"gradients and optimizer state, more than this machine's {memory / 2**30:,.1f} GiB of "
            f"memory; expected at most {most:,} classes for this model", "num_classes")


def _logits(keras, x, num_classes):
    check_output_layer(x.shape[-1], num_classes)  # before Dense allocates its weights
    x = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.layers.Activation("linear", dtype="float32", name="logits_f32")(x)


def mlp(keras, input_shape, num_classes, width: int = 256, depth: int = 2):
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    return keras.Model(inputs, _logits(keras, x, num_classes), name="mlp")


def convnet(keras, input_shape, num_classes):
    """A small conv net: Conv1D for sequences like MNIST-1D, Conv2D for images."""
    inputs = keras.Input(input_shape)
    if len(input_shape) == 1:
        x = keras.layers.Reshape((input_shape[0], 1))(inputs)
        conv, pool = keras.layers.Conv1D, keras.layers.GlobalAveragePooling1D
    elif len(input_shape) == 2:
        x, conv, pool = inputs, keras.layers.Conv1D, keras.layers.GlobalAveragePooling1D
    else:
        x, conv, pool = inputs, keras.layers.Conv2D, keras.layers.GlobalAveragePooling2D
    for i, filters in enumerate((32, 64, 64)):
        x = conv(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
        if i < 2 and x.shape[1] >= 4:
            x = (keras.layers.MaxPooling1D(2) if conv is keras.layers.Conv1D
                 else keras.layers.MaxPooling2D(2))(x)
    x = pool()(x)
    x = keras.layers.Dense(128, activation="relu", name="dense_0")(x)
    return keras.Model(inputs, _logits(keras, x, num_classes), name="convnet")


def resnet(keras, input_shape, num_classes, blocks_per_stage: int = 3):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): 6n+2 layers, n=3 gives ResNet-20.

    The last BatchNorm gamma of each residual branch starts at zero (Goyal et
    al. 2017, sec. 5.1), so each block starts as the identity.
    """
    if len(input_shape) != 3:
        raise ParameterError(f"{{model}} resnet needs image inputs (H, W, C), got input shape "
                             f"{tuple(input_shape)}", "model")
    L = keras.layers
    inputs = keras.Input(input_shape)
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            y = L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
            y = L.ReLU()(L.BatchNormalization()(y))
            y = L.Conv2D(filters, 3, padding="same", use_bias=False)(y)
            y = L.BatchNormalization(gamma_initializer="zeros")(y)
            if strides != 1 or x.shape[-1] != filters:
                x = L.BatchNormalization()(L.Conv2D(filters, 1, strides=strides, use_bias=False)(x))
            x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _logits(keras, x, num_classes), name="resnet")


# keras.applications refuse inputs smaller than this (they downsample 32x).
APPLICATION_MIN_SIZE = 32


def check_model(name: str, input_shape: Sequence[int]) -> None:
    """UsageError unless the named model can take inputs of `input_shape` (checked before building;
    a ParameterError naming `model` when the model does not fit the inputs)."""
    shape = tuple(int(d) for d in input_shape)
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if name == "convnet" and not 1 <= len(shape) <= 3:
        raise ParameterError(f"{{model}} convnet takes sequences (L,), (L, C) or images (H, W, C), "
                             f"got input shape {shape}", "model")
    if name == "resnet" or name in APPLICATIONS:
        if len(shape) != 3:
            raise ParameterError(f"{{model}} {name} needs image inputs (H, W, C), got input shape "
                                 f"{shape}", "model")
    if name in APPLICATIONS and min(shape[:2]) < APPLICATION_MIN_SIZE:
        raise ParameterError(f"{{model}} {name} needs images of at least {APPLICATION_MIN_SIZE}x"
                             f"{APPLICATION_MIN_SIZE}, got input shape {shape}; use {{model}} convnet "
                             "or resnet for small images", "model")


def build_model(name: str, input_shape: Sequence[int], num_classes: int):
    """Build a named model with float32 logits. Unknown name or unfit input -> UsageError."""
    import keras  # local: see the module docstring
    check_model(name, input_shape)
    input_shape = tuple(int(d) for d in input_shape)
    if name == "mlp":
        return mlp(keras, input_shape, num_classes)
    if name == "mlp-wide":  # 3 x Dense 2048: ~8.5M parameters on MNIST-1D (scale-out benchmark)
        return mlp(keras, input_shape, num_classes, width=2048, depth=3)
    if name == "convnet":
        return convnet(keras, input_shape, num_classes)
    if name == "resnet":
        return resnet(keras, input_shape, num_classes)
    if name in APPLICATIONS:
        if len(input_shape) != 3:
            raise ParameterError(f"{{model}} {name} needs image inputs (H, W, C), got {input_shape}",
                                 "model")
        app = getattr(keras.applications, name)
        base = app(weights=None, include_top=False, input_shape=input_shape, pooling="avg")
        return keras.Model(base.input, _logits(keras, base.output, num_classes), name=name)
    raise UsageError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
