"""A batch-size ramp: grow the global batch as the gradient noise scale grows.

``global_batch_size="ramp"`` (the CLI takes the same word) with ``max_global_batch_size`` M.
The critical batch (McCandlish et al. 2018: B_simple = tr(Sigma) / |G|^2) starts small and
grows while training (Merrill et al. 2025, "Critical Batch Size Revisited": batch-size
warmup); a batch below it trains about as well per example as the base batch, with fewer
optimizer steps (Smith et al. 2017: raise the batch instead of decaying the lr).

    candidates   B0, 2 B0, 4 B0, ... <= M, multiples of replicas x accumulation steps
                 (goodput.candidate_batches; B0 the recipe's base_batch_size)
    decision     at the end of every data epoch (the example order is a function of
                 (seed, absolute epoch), so a batch change between epochs keeps it exact):
                 the largest candidate <= RAMP_FACTOR x B_simple (2), never below the current one
    B_simple     the Trainer's noise-scale tracker at the segment's end (done["b_simple"]):
                 EMAs of all-reduced statistics, identical on every rank, so every rank
                 changes batch at the same step
    lr           the recipe's scaling rule at the CURRENT batch, k = B / B0:
                   linear          lr = k x schedule(tau)
                   sqrt            lr = sqrt(k) x schedule(tau)
                   adaptive-sqrt   lr = sqrt(k) x schedule(tau), and the optimizer's betas
                                   and epsilon become the rule's for k (sde_scaling) before
                                   the batch's step is traced
                   none            lr = schedule(tau)
                 schedule is the recipe's schedule built for the BASE batch and tau its time
                 axis, base-batch steps per data epoch x epochs done (so warmup and decay
                 happen at the same epochs as in the fixed base run);
                   adascale        AdaScale's gain at S = B / B0 (set_scale), as "auto"
    length       the run's data epochs, as the fixed base run (scaling adascale: AdaScale's
                 contract instead, the run ends when tau reaches the base budget)

:class:`RampBatch` is the batch policy (distbatch.training.batch_policy) the run's one Trainer
consults (assembly.Run.batch_policy); it adds ``batch_trajectory`` and ``batch_ramp`` to the
metrics.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import keras
import tensorflow as tf

from distbatch.errors import ParameterError, require_param
from distbatch.recipes.adaptive import sde_scaling
from distbatch.training.batch_policy import Segment, batch_trajectory
from distbatch.training.goodput import candidate_batches
from distbatch.training.plan import BatchPlan

# The ramp raises the batch to the largest candidate at most RAMP_FACTOR x B_simple. The batch
# is held for a whole epoch while B_simple keeps growing (on the default MNIST-1D workload it
# roughly doubled each epoch: 30, 50, 108, 288, 412, 1083), so it is sized for the epoch's end
# rather than its start. Measured (docs/batch_ramp.md): factor 1 kept the base accuracy but
# saved 46% of the steps; factor 2 saved 57% at the same accuracy.
RAMP_FACTOR = 2.0
LR_EXPONENTS = {"linear": 1.0, "sqrt": 0.5, "adaptive-sqrt": 0.5, "none": 0.0}


def choose_ramp_batch(candidates: Sequence[int], b_simple: float | None, current: int,
                      factor: float = RAMP_FACTOR) -> int:
    """The largest candidate <= factor x b_simple, never below `current` (a ramp only grows);
    `current` when there is no measurement (None, nan, <= 0)."""
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return current
    fit = [b for b in candidates if b <= factor * b_simple]
    return max([current, *fit])


def lr_factor(rule: str, batch: int, base_batch: int) -> float:
    """The lr multiplier of scaling `rule` at k = batch / base_batch."""
    return (batch / base_batch) ** LR_EXPONENTS[rule]


def check_ramp_run(spec, recipe, units: int, n_train: int) -> list[int]:
    """global_batch_size "ramp": what it needs and refuses, before anything is built; its
    candidate batches (base, 2 x base, ... <= max_global_batch_size)."""
    m = spec.max_global_batch_size
    require_param(recipe is not None, "{global_batch_size} ramp sets the lr by the recipe's "
                  "scaling rule at each batch: give a recipe, not an optimizer_fn",
                  "global_batch_size", "recipe")
    require_param(m is not None, "{global_batch_size} ramp needs {max_global_batch_size} (the "
                  "largest batch it may grow to)", "global_batch_size", "max_global_batch_size")
    require_param(isinstance(m, int) and not isinstance(m, bool) and m >= recipe.base_batch_size,
                  f"{{max_global_batch_size}} must be an integer >= {{base_batch_size}} "
                  f"({recipe.base_batch_size}) for {{global_batch_size}} ramp, got {m!r}",
                  "max_global_batch_size", "base_batch_size", "global_batch_size")
    for name, bad in (("batch_size_schedule", spec.batch_size_schedule),
                      ("early_stopping_metric", spec.early_stopping), ("resume", spec.resume)):
        require_param(not bad, f"{{global_batch_size}} ramp does not combine with {{{name}}} yet",
                      "global_batch_size", name)
    require_param(spec.steps is None, f"{{global_batch_size}} ramp changes the batch at whole "
                  f"epochs: give the length in {{epochs}}, got {{steps}} {spec.steps}",
                  "global_batch_size", "epochs", "steps")
    require_param(recipe.base_batch_size <= n_train,
                  f"{{base_batch_size}} {recipe.base_batch_size} is larger than the training set "
                  f"({n_train} examples); {{global_batch_size}} ramp starts at the base batch",
                  "base_batch_size", "global_batch_size")
    try:
        return candidate_batches(recipe.base_batch_size, m, units=units, num_examples=n_train)
    except ValueError as e:
        raise ParameterError(f"{{global_batch_size}} ramp: {e}", "global_batch_size") from None



class RampLR:
    """The lr state of a ramp, as variables the compiled step reads (create inside the
    backend's scope): lr = factor x schedule(floor(offset + rate x step)). The ramp sets
    them between segments, host-side, as AdaScaleState.set_scale does."""

    def __init__(self) -> None:
        def var(name, value, dtype):
            return tf.Variable(value, dtype=dtype, trainable=False, name=f"ramp_{name}",
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.factor = var("lr_factor", 1.0, tf.float32)
        self.offset = var("tau_offset", 0.0, tf.float64)
        self.rate = var("tau_rate", 1.0, tf.float64)

    def set_segment(self, *, factor: float, start_step: int, start_tau: float, rate: float) -> None:
        """From `start_step` on: lr factor `factor`, tau = start_tau + rate x (step - start_step)."""
        self.factor.assign(float(factor))
        self.rate.assign(float(rate))
        self.offset.assign(float(start_tau) - float(rate) * int(start_step))


@keras.saving.register_keras_serializable(package="distbatch")
class RampSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr = factor x base(floor(tau)), tau = offset + rate x step (RampLR). Serialises as the
    base schedule; a loaded copy has no live state and returns base(step), the base batch's
    lr (as AdaScaleSchedule does)."""

    def __init__(self, base, state: RampLR | None = None):
        self.base, self.state = base, state

    def __call__(self, step):
        if self.state is None:
            return self.base(step)
        tau = tf.floor(tf.cast(step, tf.float64) * self.state.rate + self.state.offset)
        return self.state.factor * tf.cast(self.base(tf.cast(tau, tf.float32)), tf.float32)

    def get_config(self) -> dict:
        return {"base": keras.saving.serialize_keras_object(self.base)}

    @classmethod
    def from_config(cls, config: dict) -> "RampSchedule":
        return cls(keras.saving.deserialize_keras_object(config["base"]))


class RampBatch:
    """One data epoch per segment; after each, the batch grows to the largest candidate not
    above RAMP_FACTOR x B_simple (choose_ramp_batch). The lr follows the scaling rule
    (RampLR) or AdaScale's gain (adascale)."""

    def __init__(self, *, candidates: list[int], base_batch: int, rule: str, replicas: int,
                 num_train_examples: int, epochs: float | None, total_steps: int,
                 accumulation_steps: int = 1, lr_state: RampLR | None = None, adascale=None,
                 factor: float | None = None, max_global_batch_size: int | None = None,
                 optimizer=None, log: Callable[[str], None] = lambda m: None) -> None:
        """`optimizer`: with rule "adaptive-sqrt", the optimizer whose beta_1, beta_2 and
        epsilon follow the batch (Keras reads them when a step is traced; every batch of the
        ramp is a new plan, so its step is traced after they are set)."""
        if (lr_state is None) == (adascale is None):
            raise ValueError("RampBatch: give exactly one of lr_state and adascale")
        self.candidates, self.base, self.rule = list(candidates), base_batch, rule
        self.replicas, self.accumulation, self.n_train = replicas, accumulation_steps, num_train_examples
        self.epochs, self.total = epochs, total_steps
        self.factor = RAMP_FACTOR if factor is None else factor  # read when the run starts
        self.lr_state, self.adascale, self.log = lr_state, adascale, log
        self.max_global_batch_size = max_global_batch_size
        # a LossScaleOptimizer (mixed precision) keeps the hyperparameters on its inner optimizer
        self.optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        # tau's unit: the base batch's steps per epoch (the schedule was built for it)
        self.base_steps_per_epoch = BatchPlan.derive(
            global_batch_size=base_batch, replicas=1, num_train_examples=num_train_examples
        ).steps_per_epoch

    def _segment(self, batch: int, step: int, epoch: int) -> Segment | None:
        plan = BatchPlan.derive(global_batch_size=batch, replicas=self.replicas,
                                accumulation_steps=self.accumulation, num_train_examples=self.n_train)
        info = {}
        if self.adascale is not None:  # AdaScale's contract: until tau reaches the base budget
            if step >= self.total or bool(self.adascale.finished()):
                return None
            self.adascale.set_scale(batch / self.adascale.base_batch_size)
            end = min(self.total, step + plan.steps_per_epoch)
        else:
            steps = int(math.floor(min(1.0, self.epochs - epoch) * plan.steps_per_epoch + 0.5))
            if epoch >= self.epochs or steps < 1:
                return None
            f = lr_factor(self.rule, batch, self.base)
            self.lr_state.set_segment(factor=f, start_step=step,
                                      start_tau=epoch * self.base_steps_per_epoch,
                                      rate=self.base_steps_per_epoch / plan.steps_per_epoch)
            info["lr_factor"] = f
            if self.rule == "adaptive-sqrt" and self.optimizer is not None:
                sde = sde_scaling(batch / self.base)
                for name, value in sde.optimizer_kwargs().items():
                    setattr(self.optimizer, name, value)
                info.update(sde.optimizer_kwargs(), scaling_capped=list(sde.capped))
            end = step + steps
        return Segment(plan, step, end, epoch, info)

    def first(self) -> Segment:
        return self._segment(self.candidates[0], 0, 0)

    def next(self, done: dict) -> Segment | None:
        seg, b_simple = done["segment"], done.get("b_simple")
        done["info"]["b_simple"] = b_simple
        batch = seg.plan.global_batch_size
        new = choose_ramp_batch(self.candidates, b_simple, batch, self.factor)
        epoch = int(seg.start_epoch) + 1
        nxt = self._segment(new, done["step"], epoch)
        if nxt is not None and new != batch:
            lr = (f"lr x {nxt.info['lr_factor']:.4g} ({self.rule})" if self.adascale is None
                  else "AdaScale lr")
            if "beta_1" in nxt.info:
                lr += (f", beta_1 {nxt.info['beta_1']:.4g}, beta_2 {nxt.info['beta_2']:.4g}, "
                       f"epsilon {nxt.info['epsilon']:.3g} (capped: "
                       f"{', '.join(nxt.info['scaling_capped']) or 'nothing'})")
            self.log(f"distbatch: epoch {epoch}: B_simple {b_simple:.1f}, global batch {batch} -> "
                     f"{new} ({nxt.plan.steps_per_epoch} steps/epoch, {lr})")
        return nxt

    def metrics(self, segments: list[dict]) -> dict:
        """The segments, the batch trajectory ([start step, batch] per segment) and the ramp's
        settings (candidates, max, factor, rule)."""
        return {"segments": segments, "batch_trajectory": batch_trajectory(segments),
                "batch_ramp": {"candidates": list(self.candidates),
                               "max_global_batch_size": self.max_global_batch_size,
                               "factor": self.factor, "scaling_rule": self.rule}}

