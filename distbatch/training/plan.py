"""Batch arithmetic, derived once and validated.

The GLOBAL batch is the user's number. Everything else follows from it:

    global_batch = per_replica_batch * replicas * accumulation_steps
    steps_per_epoch = floor(num_train_examples / global_batch)   (remainder dropped)

Dropping the remainder is deliberate: every replica then runs the same number
of steps per epoch, so no rank waits forever in a collective (a classic
Horovod hang when shards are uneven).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from distbatch.errors import ParameterError, require, require_param


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    replicas: int
    accumulation_steps: int
    per_replica_batch_size: int
    num_train_examples: int
    steps_per_epoch: int

    @classmethod
    def derive(cls, *, global_batch_size: int, replicas: int, accumulation_steps: int = 1,
               num_train_examples: int, param: str = "global_batch_size",
               flag: str | None = None) -> "BatchPlan":
        """Validate and derive; errors are ParameterErrors naming the batch as `param` (e.g.
        "batch_sizes" for a sweep's) and `accumulation_steps`; the CLI shows them as flags.
        `flag` is the older spelling of `param`, written as a flag: its leading dashes are
        dropped and the other dashes read as underscores (kept until every caller passes param)."""
        if flag is not None:
            param = flag.lstrip("-").replace("-", "_")
        b = "{" + param + "}"
        require_param(global_batch_size >= 1,
                      f"{b} must be a positive integer, got {global_batch_size}", param)
        require_param(accumulation_steps >= 1,
                      f"{{accumulation_steps}} must be a positive integer, got {accumulation_steps}",
                      "accumulation_steps")
        require(replicas >= 1, f"replicas must be >= 1, got {replicas}")
        units = replicas * accumulation_steps
        require_param(global_batch_size % units == 0,
                      f"{b} {global_batch_size} is not divisible by replicas ({replicas}) "
                      f"x accumulation steps ({accumulation_steps}) = {units}; "
                      f"try {max(units, global_batch_size // units * units)}", param)
        require_param(global_batch_size <= num_train_examples,
                      f"{b} {global_batch_size} is larger than the training set "
                      f"({num_train_examples} examples)", param)
        return cls(global_batch_size=global_batch_size, replicas=replicas,
                   accumulation_steps=accumulation_steps,
                   per_replica_batch_size=global_batch_size // units,
                   num_train_examples=num_train_examples,
                   steps_per_epoch=num_train_examples // global_batch_size)

    def total_steps(self, *, epochs: float | None = None, steps: int | None = None) -> int:
        """Training length in steps, from exactly one of epochs or steps."""
        if (epochs is None) == (steps is None):
            raise ParameterError("give exactly one of {epochs} or {steps}", "epochs", "steps")
        if steps is not None:
            require_param(steps >= 1, f"{{steps}} must be a positive integer, got {steps}", "steps")
            return int(steps)
        require_param(epochs > 0, f"{{epochs}} must be > 0, got {epochs}", "epochs")
        return max(1, int(math.ceil(epochs * self.steps_per_epoch)))

    def as_dict(self) -> dict:
        return asdict(self)
