"""The Python API with a user's own Keras model, loss and optimizer."""
from __future__ import annotations

import numpy as np
import pytest


def test_fit_with_custom_model_loss_and_optimizer(dataset_cache):
    import keras

    import distbatch

    data = distbatch.load_dataset("digits", seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def model_fn():
        return keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(32, activation="tanh"),
                                 keras.layers.Dense(data.num_classes)])

    result = distbatch.fit(model_fn=model_fn, optimizer_fn=lambda: keras.optimizers.Adam(3e-3),
                           data=data, global_batch_size=64, epochs=8, backend="single",
                           loss_fn=loss, seed=1)
    m = result.metrics
    assert m["steps"] == 8 * (len(data.x_train) // 64)
    # Reported validation metrics are those of the returned model on the whole validation set.
    logits = result.model.predict(data.x_val, verbose=0)
    assert m["val_accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == data.y_val)))
    assert m["val_loss"] == pytest.approx(float(np.mean(loss(data.y_val, logits))), rel=1e-5)
    assert m["val_accuracy"] > 0.8  # digits is easy: a working loop learns it in 8 epochs


def test_fit_rejects_batch_larger_than_training_set(dataset_cache):
    import keras

    import distbatch
    data = distbatch.load_dataset("digits", seed=0)
    with pytest.raises(distbatch.UsageError, match="larger than the training set"):
        distbatch.fit(model_fn=lambda: keras.Sequential([keras.layers.Dense(10)]),
                      optimizer_fn=lambda: keras.optimizers.SGD(0.1), data=data,
                      global_batch_size=100000, steps=1, backend="single")
