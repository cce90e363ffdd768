"""distbatch's built-in behaviours are Keras callbacks: the one early stopping is Keras's rule
with state that survives a checkpoint; the target tracker and the TensorBoard writer act
through the same protocol as the users' callbacks."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from distbatch.training.early_stopping import EarlyStopping
from distbatch.training.run_callbacks import TargetTracker

VAL_LOSS = [1.0, 0.8, 0.81, 0.7, 0.72, 0.71, 0.705, 0.74, 0.9, 0.95]


class Weights(keras.Model):
    """A model whose weights are one scalar we set per epoch (to see which ones are restored)."""

    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(), initializer="zeros")


def drive(cb, model, values, first_epoch=0, history=None):
    """Feed val_loss values through on_epoch_end; the weights equal the epoch index. Returns
    the epoch at which the callback stopped the run (None if it never did)."""
    for epoch, v in enumerate(values, start=first_epoch):
        model.w.assign(float(epoch))
        if history is not None:
            history.append({"step": 10 * (epoch + 1), "epoch": float(epoch + 1), "val_loss": v})
        cb.on_epoch_end(epoch, {"val_loss": v, "step": 10 * (epoch + 1)})
        if model.stop_training:
            return epoch
    return None


@pytest.mark.parametrize("patience,min_delta", [(2, 0.0), (3, 0.0), (2, 0.05)])
def test_the_run_early_stopping_decides_as_keras_does(patience, min_delta):
    keras_model, ours_model = Weights(), Weights()
    stock = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta,
                                          restore_best_weights=True, mode="min")
    history = []
    ours = EarlyStopping("val_loss", patience, min_delta, lambda: history)
    for cb, m in ((stock, keras_model), (ours, ours_model)):
        cb.set_model(m)
        m.stop_training = False
        cb.on_train_begin()
    stop_keras = drive(stock, keras_model, VAL_LOSS)
    stop_ours = drive(ours, ours_model, VAL_LOSS, history=history)
    assert stop_ours == stop_keras and stop_ours is not None
    stock.on_train_end()
    ours.on_train_end()
    assert float(ours_model.w.numpy()) == float(keras_model.w.numpy()) == stock.best_epoch
    assert ours.best_step == history[stock.best_epoch]["step"]


@pytest.mark.parametrize("cut", [1, 3, 4, 5])
def test_early_stopping_resumed_from_its_state_stops_where_the_whole_run_does(cut):
    """state() at evaluation `cut`, restore() in a new callback (as a resumed run does): the
    same stop, best step and restored weights as without the interruption."""
    whole_model, history = Weights(), []
    whole = EarlyStopping("val_loss", 2, 0.0, lambda: history)
    whole.set_model(whole_model)
    whole_model.stop_training = False
    whole.on_train_begin()
    stop_whole = drive(whole, whole_model, VAL_LOSS, history=history)
    whole.on_train_end()

    first_model, h1 = Weights(), []
    first = EarlyStopping("val_loss", 2, 0.0, lambda: h1)
    first.set_model(first_model)
    first_model.stop_training = False
    first.on_train_begin()
    assert drive(first, first_model, VAL_LOSS[:cut], history=h1) is None
    state, weights = first.state(), [np.array(w) for w in first.best_weights]
    assert state["best_step"] == h1[int(np.argmin(VAL_LOSS[:cut]))]["step"]

    second_model, h2 = Weights(), list(h1)
    second = EarlyStopping("val_loss", 2, 0.0, lambda: h2)
    second.set_model(second_model)
    second_model.stop_training = False
    second.restore(state, weights)
    second.on_train_begin()
    stop_second = drive(second, second_model, VAL_LOSS[cut:], first_epoch=cut, history=h2)
    second.on_train_end()
    assert stop_second == stop_whole
    assert second.best_step == whole.best_step
    assert float(second_model.w.numpy()) == float(whole_model.w.numpy())


def test_target_tracker_records_the_first_evaluation_at_the_target_and_stops_if_asked():
    counters = {"steps_to_target": None, "time_to_target": None, "train_time": 0.0}
    model = Weights()
    for stop in (False, True):
        counters.update(steps_to_target=None, time_to_target=None)
        cb = TargetTracker(0.9, lambda: counters, stop)
        cb.set_model(model)
        model.stop_training = False
        for step, acc in ((10, 0.5), (20, 0.91), (30, 0.95)):
            counters["train_time"] = step / 10
            cb.on_epoch_end(step // 10 - 1, {"step": step, "val_accuracy": acc})
            if model.stop_training:
                break
        assert (counters["steps_to_target"], counters["time_to_target"]) == (20, 2.0)
        assert model.stop_training is stop
