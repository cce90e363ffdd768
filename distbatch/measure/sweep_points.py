"""The batch-size sweep's defaults and its points, without TensorFlow: the default sweep's
configuration, the checks of a sweep's arguments, each point's TrainConfig and result row.

The CLI's parsers (`distbatch sweep`, `distbatch recommend`) and the recommendation
(distbatch.measure.recommend) read the defaults from here; running the sweep is
distbatch.measure.sweep.run_sweep, which re-exports every name of this module.
"""
from __future__ import annotations

import os
from typing import Sequence

from distbatch.errors import require_param
from distbatch.measure.results import ROW_FIELDS, b_simple_at_target
from distbatch.recipes.recipe import SCALINGS
from distbatch.training.config import TrainConfig

# The default sweep (docs/sweep.md): MNIST-1D, the small conv net, 6 epochs, momentum SGD with
# lr 0.025 at batch 32, 1 epoch of gradual warmup and cosine decay (Goyal's 30/60/80-of-90 step
# decay would cut the lr before a 6-epoch, warmup-heavy run gets to use it), 4 evaluations per
# epoch (finer steps-to-target), target 70% validation accuracy, gradient noise scale on.
DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
DEFAULT_EPOCHS = 6.0
# The warmup: 1 epoch, but at most this fraction of each point's training, so a short sweep
# (1 epoch, half an epoch, a few steps) is not all warmup; 1/6 leaves the 6-epoch default's
# 1-epoch warmup as it is.
DEFAULT_WARMUP_EPOCHS = 1.0
DEFAULT_WARMUP_CAP = 1 / 6
DEFAULT_TARGET = 0.70
# Fields (of TrainConfig or its Recipe) whose sweep default differs from `distbatch train`'s;
# `distbatch sweep` and `distbatch recommend` take their flag defaults from here.
SWEEP_DEFAULTS = {"model": "convnet", "target_accuracy": DEFAULT_TARGET, "evals_per_epoch": 4,
                  "noise_scale": True, "base_lr": 0.025, "base_batch_size": 32, "decay": "cosine"}
DEFAULT_OUT = "runs/sweep"

SWEEP_MARKERS = ("results.jsonl", "config.json")
# Everything a sweep writes in its directory: overwrite=True removes these and nothing else.
SWEEP_OUTPUTS = ("results.jsonl", "results.csv", "config.json", "report.md", "points", "tensorboard")
# A resumed sweep may add batch sizes or seeds (each row is keyed by both); the rest must match.
SWEEP_MAY_CHANGE = frozenset({"global_batch_size", "seed"})


def sweep_config(**changes) -> TrainConfig:
    """The default sweep's base TrainConfig (SWEEP_DEFAULTS, 6 epochs, the capped 1-epoch
    warmup, out runs/sweep) with ``changes`` (fields of TrainConfig or of its Recipe).

    Giving ``steps`` drops the default epochs; giving a warmup length drops the cap (an
    explicit warmup is taken as it is).
    """
    values = {**SWEEP_DEFAULTS, "out": DEFAULT_OUT, "global_batch_size": DEFAULT_BATCH_SIZES[0]}
    if changes.get("steps") is None and changes.get("epochs") is None:
        values["epochs"] = DEFAULT_EPOCHS
    if changes.get("warmup_epochs") is None and changes.get("warmup_steps") is None:
        values.update(warmup_epochs=DEFAULT_WARMUP_EPOCHS, warmup_cap=DEFAULT_WARMUP_CAP)
    return TrainConfig(global_batch_size=DEFAULT_BATCH_SIZES[0]).replace(**{**values, **changes})


def check_sweep(base: TrainConfig, batch_sizes: Sequence[int], scalings: Sequence[str] | None,
                seeds: int | Sequence[int]) -> tuple[list[int], tuple, list[int]]:
    """The sweep's own arguments, checked (ParameterError naming the parameter): the sorted
    batch sizes, the rules (``(None,)``: one rule, the base config's, and point ids without
    it) and the seeds."""
    if not isinstance(base, TrainConfig):
        raise TypeError(f"base must be a distbatch TrainConfig, got {type(base).__name__}")
    sizes = list(batch_sizes) if not isinstance(batch_sizes, (str, bytes)) else None
    require_param(bool(sizes) and all(isinstance(b, int) and not isinstance(b, bool) for b in sizes),
                  f"{{batch_sizes}} must be a non-empty sequence of integers, got {batch_sizes!r}",
                  "batch_sizes")
    bad = [b for b in sizes if b < 1]
    require_param(not bad, f"{{batch_sizes}} must be positive, got {bad[0] if bad else ''}", "batch_sizes")
    require_param(len(set(sizes)) == len(sizes), f"{{batch_sizes}} has duplicates: {sizes}", "batch_sizes")
    rules = tuple(scalings) if scalings is not None and not isinstance(scalings, str) else \
        ((scalings,) if isinstance(scalings, str) else ())
    wrong = [r for r in rules if r not in SCALINGS]
    require_param(not wrong and len(set(rules)) == len(rules) and (scalings is None or rules),
                  f"{{scalings}} must be one or more of {', '.join(SCALINGS)}, without repeats; "
                  f"got {scalings!r}", "scalings")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        require_param(seeds >= 1, f"{{seeds}} must be >= 1, got {seeds}", "seeds")
        require_param(base.seed + seeds <= 2**32, f"{{seed}} {base.seed} + {{seeds}} {seeds} must stay "
                                                  "below 2**32", "seed", "seeds")
        seed_list = list(range(base.seed, base.seed + seeds))
    else:
        seed_list = list(seeds) if not isinstance(seeds, (str, bytes)) else []
        require_param(bool(seed_list) and len(set(seed_list)) == len(seed_list) and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seed_list),
            f"{{seeds}} must be a count >= 1 or distinct integers in [0, 2**32), got {seeds!r}", "seeds")
    return sorted(sizes), (rules if len(rules) > 1 else (None,)), seed_list


def point_config(base: TrainConfig, batch: int, seed: int, out_dir: str,
                 scaling: str | None = None) -> TrainConfig:
    """One point's TrainConfig, derived from the sweep's; `scaling` is set (and named in the
    point's directory) when the sweep compares several scaling rules."""
    changes = {"global_batch_size": batch, "seed": seed}
    if scaling:
        changes["scaling"] = scaling
    if (scaling or base.recipe.scaling) == "adascale":  # AdaScale's gain replaces warmup
        changes.update(warmup="none", warmup_epochs=None, warmup_steps=None)  # (Johnson et al.)
    point = f"bs{batch}_seed{seed}" + (f"_{scaling}" if scaling else "")
    out = os.path.join(out_dir, "points", point)
    resume = os.path.isdir(os.path.join(out, "checkpoints"))  # continue an interrupted point
    return base.replace(**changes, out=out, tensorboard_dir=os.path.join(out_dir, "tensorboard", point),
                        resume=resume, overwrite=not resume, progress=False)


def summary_to_row(summary: dict, point_id: str, status: str) -> dict:
    """A point's result row from its summary.json; B_simple's trajectory is kept so the report
    can read it at the target (``b_simple_at_target``)."""
    row = {k: summary.get(k) for k in ROW_FIELDS}
    row.update(point_id=point_id, status=status, diverged=status == "diverged",
               history=summary.get("history"), target_accuracy=summary.get("target_accuracy"),
               optimizer=summary.get("optimizer"),
               **{k: summary.get(k) for k in ("best_val_loss_epoch", "best_epoch", "stopped_epoch",
                                              "stopped_early", "train_time_s", "scaling_rule",
                                              "adascale_mean_gain", "scale_invariant_steps",
                                              "base_batch_size", "b_simple_trajectory")})
    row["b_simple_at_target"] = b_simple_at_target(row)
    return row


def oom_row(config: TrainConfig, batch: int, seed: int, point_id: str, backend) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(point_id=point_id, status="oom", diverged=False, global_batch_size=batch, seed=seed,
               replicas=backend.num_replicas, backend=backend.name,
               per_replica_batch_size=batch // (backend.num_replicas * config.accumulation_steps))
    return row


def sweep_record(base: TrainConfig, batches: list[int], rules: tuple, seeds) -> dict:
    """config.json's entries of a sweep run from Python: the base config's (TrainConfig.as_flags)
    and the sweep's own."""
    return {**base.as_flags(), "scaling": [r or base.recipe.scaling for r in rules],
            "batch_sizes": batches, "seeds": seeds, "stop_at_target": base.stop_at_target}
