"""The batch-size sweep as a library call: train at each (scaling rule, global batch, seed),
one result row per point, then the report.

    from distbatch.measure.sweep import run_sweep, sweep_config
    rows = run_sweep(sweep_config(out="runs/sweep"), scalings=("linear", "adascale"))

For each point the learning rate follows the scaling rule from (base_lr, base_batch_size)
and the recipe's warmup, so the sweep measures what a user would actually get at that
batch; AdaScale points run without warmup (its gain replaces it, Johnson et al. 2020).
Rows are appended as points finish (results.jsonl / results.csv, never a partial row);
``resume=True`` in the config skips finished points and continues an interrupted one
from its last checkpoint. A diverged point is recorded and the sweep goes on; so is a
point that runs out of device memory. A full, read-only or unwritable disk stops the
sweep: it is no property of the point.

Budget: a fixed number of epochs (default), a fixed number of steps, or until the target
accuracy (``stop_at_target``, with steps or epochs as the cap). Fixed epochs give small
batches more optimizer steps; steps-to-target (Shallue et al. 2019) is the fair comparison
and is reported next to it (distbatch.measure.report).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from distbatch.errors import ParameterError, UsageError, require_param
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

HPARAMS = ("global_batch_size", "peak_lr", "warmup_steps", "optimizer", "scaling_rule")
METRICS = ("val_accuracy", "generalization_gap", "samples_per_sec", "time_to_target_s")


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
    from distbatch.recipes.recipe import SCALINGS
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
    from distbatch.measure.results import ROW_FIELDS, b_simple_at_target
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
    from distbatch.measure.results import ROW_FIELDS
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


def run_sweep(base: TrainConfig | None = None, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
              scalings: Sequence[str] | None = None, seeds: int | Sequence[int] = 1,
              out: str | os.PathLike | None = None, record: dict | None = None) -> list[dict]:
    """Train every (scaling rule, global batch, seed) point, write the rows, config.json,
    TensorBoard logs and the report (report.md and plots) into the sweep directory; return the
    sweep's rows (one dict per point, in point order: rule, batch, seed).

    base: every point's TrainConfig but its global batch, seed and (with several rules) scaling
        rule; default :func:`sweep_config` (the default sweep). Its ``out`` is the sweep
        directory, ``resume``/``overwrite`` apply to the sweep, ``progress`` prints one line
        per point (on the chief), ``stop_at_target`` stops each point at the target.
    batch_sizes: the global batch sizes (sorted; default 32 to 1024).
    scalings: several rules compare them, one set of points each (point ids and directories
        name the rule); None or one rule: the base's (or that) rule alone.
    seeds: a count (seeds base.seed, base.seed + 1, ...) or the seeds themselves.
    out: the sweep directory, instead of ``base.out``.
    record: config.json's entries instead of :func:`sweep_record`'s (the CLI passes its flags).

    Errors name the parameters (ParameterError); the directory checks of distbatch.outdir and
    the resume check of distbatch.training.job raise UsageError.
    """
    base = sweep_config() if base is None else base
    if out is not None:
        base = base.replace(out=os.fspath(out))
    batches, rules, seed_list = check_sweep(base, batch_sizes, scalings, seeds)
    require_param(base.out is not None and bool(str(base.out).strip()),
                  "{out} is required: the sweep's directory", "out")
    if rules == (None,) and scalings:
        base = base.replace(scaling=scalings[0] if not isinstance(scalings, str) else scalings)
    base = base.replace(global_batch_size=batches[0], scaling=rules[0] or base.recipe.scaling)

    from distbatch.outdir import check_out_dir, claim_out_dir
    check_out_dir(base.out, resume=base.resume, overwrite=base.overwrite, holds=SWEEP_MARKERS)

    from distbatch.backends import create_backend
    from distbatch.fileio import atomic_write_json
    from distbatch.measure import results
    from distbatch.measure.oom import is_out_of_memory
    from distbatch.measure.report import REPORT_NAME, build_report
    from distbatch.training.job import (RESUME_MAY_CHANGE, check_resume_matches, load_data,
                                        machine_info, plan_run, run_config, train)

    backend, reason = create_backend(base.backend, cpu_replicas=base.cpu_replicas,
                                     cluster_timeout=base.cluster_timeout,
                                     collective=base.collective_options(),
                                     stall_timeout=base.stall_timeout)
    data = load_data(base)
    out = base.out
    for rule in rules:  # every point is checked before anything is written
        for b in batches:
            _plan_point(plan_run, point_config(base, b, base.seed, out, rule), backend, data)
    chief = backend.is_chief
    config = run_config(record if record is not None else sweep_record(base, batches, rules, seeds),
                        batch_sizes=batches, backend=backend.name, backend_reason=reason,
                        replicas=backend.num_replicas, machine=machine_info(backend))
    if base.resume:
        check_resume_matches(config, out, may_change=RESUME_MAY_CHANGE | SWEEP_MAY_CHANGE)
    if chief:
        claim_out_dir(out, "sweep", remove=SWEEP_OUTPUTS if base.overwrite else ())
        if os.path.exists(os.path.join(out, results.JSONL_NAME)):
            results.sync_csv(out)  # repair a CSV left one row short by a kill
        atomic_write_json(os.path.join(out, "config.json"), config)
        _write_hparams_config(os.path.join(out, "tensorboard"))
    done = results.done_point_ids(out) if base.resume else set()
    points = [(rule, b, s) for rule in rules for b in batches for s in seed_list]
    todo = [p for p in points if results.make_point_id(p[1], p[2], p[0]) not in done]
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if chief and base.progress else \
        (lambda text: None)
    say(f"distbatch sweep: {len(points)} points ({len(points) - len(todo)} already done), "
        f"{backend.describe()}, dataset {base.dataset} ({_sizes(data, backend)}), model {base.model}, "
        f"{_warmup_text(base)}")
    new_rows = {}
    started = time.perf_counter()
    for i, (rule, batch, seed) in enumerate(todo):
        point_id = results.make_point_id(batch, seed, rule)
        point = point_config(base, batch, seed, out, rule)
        try:
            summary, _ = train(point, backend=backend, data=data)
            row = summary_to_row(summary, point_id, "diverged" if summary.get("diverged") else "ok")
        except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; the rest (a full
            # disk too) stops the sweep
            if not is_out_of_memory(e):
                raise
            row = oom_row(base, batch, seed, point_id, backend)
        new_rows[point_id] = results.validate_row(row)
        if chief:
            results.append_row(out, row)
            _write_hparams(os.path.join(out, "tensorboard", os.path.basename(point.out)), row)
            eta = (time.perf_counter() - started) / (i + 1) * (len(todo) - i - 1)
            acc = row.get("val_accuracy")
            say(f"[{i + 1}/{len(todo)}] batch {batch:>6} seed {seed}{' ' + rule if rule else ''}: "
                f"{row['status']}, val_acc {acc if acc is None else round(acc, 4)}, "
                f"steps_to_target {row.get('steps_to_target')}, "
                f"{(row.get('samples_per_sec') or 0):,.0f} samples/s  "
                f"sweep ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    if chief:
        results.sync_csv(out)
        build_report(out, target_accuracy=base.target_accuracy)
        say(f"distbatch sweep: report at {os.path.join(out, REPORT_NAME)}")
        recorded = {r.get("point_id"): r for r in results.read_rows(out)}
    else:
        recorded = new_rows
    backend.shutdown()
    ids = [results.make_point_id(b, s, rule) for rule, b, s in points]
    return [recorded[i] for i in ids if i in recorded]


def _plan_point(plan_run, point: TrainConfig, backend, data) -> None:
    """plan_run for one point; BatchPlan's errors (plain UsageError, named by the `flag` given)
    become ParameterErrors naming ``batch_sizes``."""
    try:
        plan_run(point, backend, data, flag="{batch_sizes}")
    except ParameterError:
        raise
    except UsageError as e:
        if "{batch_sizes}" not in str(e):
            raise
        raise ParameterError(str(e), "batch_sizes") from None


def _warmup_text(base: TrainConfig) -> str:
    r = base.recipe
    if r.warmup == "none":
        return "no warmup"
    if r.warmup_steps is not None:
        return f"warmup {r.warmup_steps} steps"
    return f"warmup {r.warmup_epochs:g} epoch(s)" + (
        f" capped at 1/{round(1 / r.warmup_cap)} of each point's training" if r.warmup_cap else "")


def _write_hparams_config(logdir: str) -> None:
    """TensorBoard HParams dashboard: the experiment's hparams and metrics."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams_config(hparams=[hp.HParam(h) for h in HPARAMS],
                          metrics=[hp.Metric(m, display_name=m) for m in METRICS])


def _write_hparams(logdir: str, row: dict) -> None:
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp
    hparams = {h: row.get(h) for h in HPARAMS if row.get(h) is not None}
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams(hparams, trial_id=row["point_id"])
        for m in METRICS:
            if row.get(m) is not None:
                tf.summary.scalar(m, row[m], step=int(row.get("steps") or 0))


def _sizes(data, backend) -> str:
    """'N train / M val' of an ArrayDataset or a streamed SourceDataset."""
    from distbatch.data.inputs import num_train_examples
    if hasattr(data, "x_val"):
        return f"{len(data.x_train)} train / {len(data.x_val)} val"
    return (f"{num_train_examples(data, backend.num_workers)} train / "
            f"{data.val_source.num_examples(1)} val, streamed")
