"""What one run of the training loop is asked to do (LoopOptions, checked as the
parameters distbatch.fit passes through), how many steps one call runs, and what the run
returns (RunResult)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from distbatch.errors import require_param


@dataclass
class LoopOptions:
    total_steps: int
    seed: int = 0
    evals_per_epoch: int = 1
    noise_scale: bool = False
    target_accuracy: float | None = None
    stop_at_target: bool = False               # budget "until target" (capped by total_steps)
    early_stopping_metric: str | None = None   # "val_loss" or "val_accuracy"
    early_stopping_patience: int = 5
    min_delta: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0                  # steps; 0 = at evaluations (see below)
    # With checkpoint_every = 0: an evaluation checkpoints only when the last checkpoint is at
    # least this many seconds old (the first evaluation and the last step always do). Saving
    # model and optimizer costs ~60 ms for a small MLP: at every epoch of a tiny epoch that
    # was a quarter of the run time.
    checkpoint_min_seconds: float = 60.0
    checkpoint_every_seconds: float = 0.0      # also when this long passed (chief's clock); 0 = off
    resume: bool = False
    tensorboard_dir: str | None = None
    verbose: bool = True
    log_every: int = 50                        # one TensorBoard point per this many steps
    # Steps run inside one tf.function call (a tf.while_loop). "auto": measured after the
    # compile step so that one call takes about AUTO_CALL_SECONDS. Calls never cross an
    # evaluation, checkpoint or segment boundary, so every result is the same as with 1.
    steps_per_execution: int | str = "auto"
    jit_compile: bool = False                  # XLA for the per-replica forward/backward
    bucket_mb: float | str = "auto"            # gradient all-reduce buckets (MB); 0 = one group;
                                               # auto: the backend's choice (Horovod: per tensor)
    grad_compression: str = "none"             # none | fp16 | bf16: gradient type on the wire

    def __post_init__(self) -> None:
        """Each option's range, named as the parameter (distbatch.fit passes them through)."""
        def whole(name, low):
            v = getattr(self, name)
            require_param(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                          f"{{{name}}} must be a whole number >= {low}, got {v!r}", name)

        def number(name, low, high=math.inf, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            require_param(isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(v) and low <= v <= high,
                          f"{{{name}}} must be a finite number in [{low}, {high}], got {v!r}"
                          if high != math.inf else
                          f"{{{name}}} must be a finite number >= {low}, got {v!r}", name)
        whole("evals_per_epoch", 1)
        whole("log_every", 1)
        whole("checkpoint_every", 0)
        whole("early_stopping_patience", 0)
        number("min_delta", 0)
        number("checkpoint_min_seconds", 0)
        number("checkpoint_every_seconds", 0)
        number("target_accuracy", 0, 1, optional=True)
        spe = self.steps_per_execution
        require_param(spe == "auto" or (isinstance(spe, int) and not isinstance(spe, bool) and spe >= 1),
                      f"{{steps_per_execution}} must be a whole number >= 1 or 'auto', got {spe!r}",
                      "steps_per_execution")


# Target duration of one call with steps_per_execution="auto". 1 s, not less: with steps of
# 0.35 s (2 Horovod workers on a 1 Gbit/s link) 0.2 s meant one step per call, and the host
# work of each call cost ~1% (docs/scaling.md, db-hvd-spe4); a SIGTERM waits at most one call
# plus the decision cadence (preemption.SYNC_SECONDS), about 2 s.
AUTO_CALL_SECONDS = 1.0
AUTO_MAX_STEPS = 1000


def resolve_steps_per_execution(value, step_seconds: float) -> int:
    """An int as given; "auto": enough steps that one call takes ~AUTO_CALL_SECONDS, so the
    per-call host work (dispatch, fetching results) is amortised while a call stays short
    enough for prompt signals and progress."""
    if value != "auto":
        return int(value)
    if not step_seconds > 0:
        return AUTO_MAX_STEPS
    return int(min(AUTO_MAX_STEPS, max(1, round(AUTO_CALL_SECONDS / step_seconds))))


@dataclass
class RunResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
