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

import tensorflow as tf

from distbatch.backends import create_backend
from distbatch.data.inputs import num_train_examples
from distbatch.errors import ParameterError, UsageError, require_param
from distbatch.fileio import atomic_write_json
from distbatch.measure import results
from distbatch.measure.oom import is_out_of_memory
from distbatch.measure.report import REPORT_NAME, build_report
# The defaults, the checks and the points (no TensorFlow there: the CLI's parsers read them),
# importable from here too.
from distbatch.measure.sweep_points import (  # noqa: F401
    DEFAULT_BATCH_SIZES, DEFAULT_EPOCHS, DEFAULT_OUT, DEFAULT_TARGET, DEFAULT_WARMUP_CAP,
    DEFAULT_WARMUP_EPOCHS, SWEEP_DEFAULTS, SWEEP_MARKERS, SWEEP_MAY_CHANGE, SWEEP_OUTPUTS,
    check_sweep, oom_row, point_config, summary_to_row, sweep_config, sweep_record)
from distbatch.outdir import check_out_dir, claim_out_dir
from distbatch.training.config import TrainConfig
from distbatch.training.job import (RESUME_MAY_CHANGE, check_resume_matches, load_data,
                                    machine_info, plan_run, run_config, train)

HPARAMS = ("global_batch_size", "peak_lr", "warmup_steps", "optimizer", "scaling_rule")
METRICS = ("val_accuracy", "generalization_gap", "samples_per_sec", "time_to_target_s")


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

    check_out_dir(base.out, resume=base.resume, overwrite=base.overwrite, holds=SWEEP_MARKERS)

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


def _hparams_api():
    """TensorBoard's HParams plugin, imported when a sweep writes its logs (an optional part of
    tensorboard, not needed to import this module)."""
    from tensorboard.plugins.hparams import api as hp
    return hp


def _write_hparams_config(logdir: str) -> None:
    """TensorBoard HParams dashboard: the experiment's hparams and metrics."""
    hp = _hparams_api()
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams_config(hparams=[hp.HParam(h) for h in HPARAMS],
                          metrics=[hp.Metric(m, display_name=m) for m in METRICS])


def _write_hparams(logdir: str, row: dict) -> None:
    hp = _hparams_api()
    hparams = {h: row.get(h) for h in HPARAMS if row.get(h) is not None}
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams(hparams, trial_id=row["point_id"])
        for m in METRICS:
            if row.get(m) is not None:
                tf.summary.scalar(m, row[m], step=int(row.get("steps") or 0))


def _sizes(data, backend) -> str:
    """'N train / M val' of an ArrayDataset or a streamed SourceDataset."""
    if hasattr(data, "x_val"):
        return f"{len(data.x_train)} train / {len(data.x_val)} val"
    return (f"{num_train_examples(data, backend.num_workers)} train / "
            f"{data.val_source.num_examples(1)} val, streamed")
