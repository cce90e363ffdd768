"""`distbatch sweep`: train at each global batch size (and seed), one result row
per point, then the report.

For each point the learning rate follows the scaling rule from
(--base-lr, --base-batch-size) and the warmup of the recipe flags, so the
sweep measures what a user would actually get at that batch. Rows are
appended as points finish (results.jsonl / results.csv, never a partial row);
`--resume` skips finished points and continues an interrupted one from its
last checkpoint. A diverged point is recorded and the sweep goes on; so is a
point that runs out of device memory. A full, read-only or unwritable disk
stops the sweep (exit 4, errors.EXIT_IO): it is no property of the point.

Budget: a fixed number of epochs (default), a fixed number of steps, or until
--target-accuracy (with --steps or --epochs as the cap). Fixed epochs give
small batches more optimizer steps; steps-to-target (Shallue et al. 2019) is
the fair comparison and is reported next to it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from distbatch.cli.train import add_train_args, config_from_args, record_of
from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_json
from distbatch.outdir import check_out_dir, claim_out_dir
from distbatch.training.config import TrainConfig

DEFAULT_BATCHES = "32,64,128,256,512,1024"
# The sweep's default warmup: 1 epoch, but at most this fraction of each point's training,
# so a short sweep (--epochs 1, --epochs 0.5, a few --steps) is not all warmup. 1/6 leaves
# the default 6-epoch sweep's 1-epoch warmup as it was.
DEFAULT_WARMUP_EPOCHS = 1.0
DEFAULT_WARMUP_CAP = 1 / 6
DEFAULT_TARGET = 0.70
SWEEP_MARKERS = ("results.jsonl", "config.json")
# Everything a sweep writes in --out: --overwrite removes these and nothing else.
SWEEP_OUTPUTS = ("results.jsonl", "results.csv", "config.json", "report.md", "points", "tensorboard")
# A resumed sweep may add batch sizes or seeds (each row is keyed by both); the rest must match.
SWEEP_MAY_CHANGE = frozenset({"global_batch_size", "seed"})


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    require(bool(sizes), f"--batch-sizes must list at least one size, got {text!r}")
    bad = [s for s in sizes if s < 1]
    require(not bad, f"--batch-sizes must be positive, got {bad[0] if bad else ''}")
    require(len(set(sizes)) == len(sizes), f"--batch-sizes has duplicates: {text!r}")
    return sorted(sizes)


SCALINGS = ("linear", "sqrt", "none", "adascale")


def parse_scalings(text: str) -> tuple[str, ...]:
    """argparse type of the sweep's --scaling: one or more rules, comma-separated."""
    rules = tuple(r.strip() for r in str(text).split(",") if r.strip())
    bad = [r for r in rules if r not in SCALINGS]
    if not rules or bad or len(set(rules)) != len(rules):
        raise argparse.ArgumentTypeError(f"must be one or more of {', '.join(SCALINGS)}, "
                                         f"comma-separated, without repeats; got {text!r}")
    return rules


def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train at several global batch sizes; rows, plots and a report",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                   help=f"global batch sizes (default {DEFAULT_BATCHES}: 32x)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per batch size (default 1)")
    p.add_argument("--stop-at-target", action="store_true",
                   help="stop each point when --target-accuracy is reached (budget: until target)")
    p.add_argument("--no-noise-scale", dest="noise_scale", action="store_false",
                   help="do not estimate the gradient noise scale (it is on by default in a sweep)")
    add_train_args(p, sweep=True)
    scaling = next(a for a in p._actions if a.dest == "scaling")
    scaling.choices, scaling.type, scaling.metavar = None, parse_scalings, "RULE[,RULE...]"
    scaling.help = (f"lr scaling rule(s), comma-separated, one set of points each, e.g. "
                    f"'linear,adascale' to compare them per batch ({', '.join(SCALINGS)}; default "
                    f"linear); adascale points run without warmup")
    for action in p._actions:  # the sweep's own warmup default (see DEFAULT_WARMUP_CAP)
        if action.dest == "warmup_epochs":
            action.help = (f"warmup length in epochs (sweep default: {DEFAULT_WARMUP_EPOCHS:g} epoch, "
                           f"capped at 1/{round(1 / DEFAULT_WARMUP_CAP)} of each point's training)")
    # The embedded default: MNIST-1D, a small conv net, 6 epochs, linear scaling from lr 0.025 at
    # batch 32 with 1 epoch of gradual warmup and cosine decay (Goyal's 30/60/80-of-90 step decay
    # would cut the lr before a 6-epoch warmup-heavy run gets to use it). Measured in docs/sweep.md.
    p.set_defaults(func=run_sweep, model="convnet", epochs=None, target_accuracy=DEFAULT_TARGET,
                   evals_per_epoch=4, noise_scale=True, base_lr=0.025, base_batch_size=32,
                   decay="cosine", out="runs/sweep")


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
    from distbatch.measure.results import ROW_FIELDS
    row = {k: summary.get(k) for k in ROW_FIELDS}
    row.update(point_id=point_id, status=status, diverged=status == "diverged",
               history=summary.get("history"), target_accuracy=summary.get("target_accuracy"),
               optimizer=summary.get("optimizer"),
               **{k: summary.get(k) for k in ("best_val_loss_epoch", "best_epoch", "stopped_epoch",
                                              "stopped_early", "train_time_s", "scaling_rule",
                                              "adascale_mean_gain", "scale_invariant_steps")})
    return row


def oom_row(config: TrainConfig, batch: int, seed: int, point_id: str, backend) -> dict:
    from distbatch.measure.results import ROW_FIELDS
    row = dict.fromkeys(ROW_FIELDS)
    row.update(point_id=point_id, status="oom", diverged=False, global_batch_size=batch, seed=seed,
               replicas=backend.num_replicas, backend=backend.name,
               per_replica_batch_size=batch // (backend.num_replicas * config.accumulation_steps))
    return row


def validate_sweep_args(args: argparse.Namespace) -> tuple[list[int], TrainConfig]:
    """Every check of the sweep's flags that needs no TensorFlow: the batch sizes and the
    TrainConfig every point is derived from (at the first batch and scaling rule)."""
    batches = parse_batch_sizes(args.batch_sizes)
    require(args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}")
    changes = {"global_batch_size": batches[0], "scaling": args.scaling[0]}
    if args.epochs is None and args.steps is None:
        changes["epochs"] = 6.0
    if args.warmup_epochs is None and args.warmup_steps is None:
        # Recorded in config.json (warmup_epochs, warmup_cap) and per point as warmup_steps.
        changes.update(warmup_epochs=DEFAULT_WARMUP_EPOCHS, warmup_cap=DEFAULT_WARMUP_CAP)
    base = config_from_args(args, **changes)
    require(args.seed + args.seeds <= 2**32, f"--seed {args.seed} + --seeds {args.seeds} must stay "
                                             "below 2**32")
    return batches, base


def sweep_flags(args: argparse.Namespace, base: TrainConfig) -> dict:
    """The sweep's config.json flags, as before: the points' common ones (those the sweep has a
    flag for, its first batch and its warmup cap) and the sweep's own."""
    common = {k: v for k, v in base.as_flags().items()
              if hasattr(args, k) or k in ("global_batch_size", "warmup_cap")}
    return {**common, **record_of(args), "scaling": list(args.scaling),
            "batch_sizes": args.batch_sizes, "seeds": args.seeds,
            "stop_at_target": args.stop_at_target}


def run_sweep(args: argparse.Namespace) -> int:
    batches, base = validate_sweep_args(args)
    check_out_dir(base.out, resume=base.resume, overwrite=base.overwrite, holds=SWEEP_MARKERS)

    from distbatch.measure import results
    from distbatch.backends import create_backend
    from distbatch.cli.train import flag_error, train
    from distbatch.errors import ParameterError
    from distbatch.measure.oom import is_out_of_memory
    from distbatch.measure.report import build_report
    from distbatch.training.job import (RESUME_MAY_CHANGE, check_resume_matches, load_data,
                                        machine_info, plan_run, run_config)

    backend, reason = create_backend(base.backend, cpu_replicas=base.cpu_replicas,
                                     cluster_timeout=base.cluster_timeout,
                                     collective=base.collective_options(),
                                     stall_timeout=base.stall_timeout)
    data = load_data(base)
    out = base.out
    scalings = args.scaling if len(args.scaling) > 1 else (None,)
    try:
        for sc in scalings:  # every point is checked (all flags) before anything is written
            for b in batches:
                plan_run(point_config(base, b, base.seed, out, sc), backend, data, flag="--batch-sizes")
    except ParameterError as e:
        raise flag_error(e) from None
    chief = backend.is_chief
    config = run_config(sweep_flags(args, base), batch_sizes=batches, backend=backend.name,
                        backend_reason=reason, replicas=backend.num_replicas,
                        machine=machine_info(backend))
    if base.resume:
        check_resume_matches(config, out, may_change=RESUME_MAY_CHANGE | SWEEP_MAY_CHANGE)
    if chief:
        claim_out_dir(out, "sweep", remove=SWEEP_OUTPUTS if base.overwrite else ())
        if os.path.exists(os.path.join(out, results.JSONL_NAME)):
            results.sync_csv(out)  # repair a CSV left one row short by a kill
        atomic_write_json(os.path.join(out, "config.json"), config)
        _write_hparams_config(os.path.join(out, "tensorboard"))
    done = results.done_point_ids(out) if base.resume else set()
    points = [(sc, b, s) for sc in scalings for b in batches
              for s in range(args.seed, args.seed + args.seeds)]
    todo = [p for p in points if results.make_point_id(p[1], p[2], p[0]) not in done]
    if chief:
        r = base.recipe
        warmup = ("no warmup" if r.warmup == "none" else
                  f"warmup {r.warmup_steps} steps" if r.warmup_steps is not None else
                  f"warmup {r.warmup_epochs:g} epoch(s)" + (
                      f" capped at 1/{round(1 / r.warmup_cap)} of each point's training"
                      if r.warmup_cap else ""))
        print(f"distbatch sweep: {len(points)} points ({len(points) - len(todo)} already done), "
              f"{backend.describe()}, dataset {base.dataset} ({_sizes(data, backend)}), model {base.model}, {warmup}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for i, (scaling, batch, seed) in enumerate(todo):
        point_id = results.make_point_id(batch, seed, scaling)
        point = point_config(base, batch, seed, out, scaling)
        try:
            summary, _ = train(point, backend=backend, data=data)
            status = "diverged" if summary.get("diverged") else "ok"
            row = summary_to_row(summary, point_id, status)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; the rest (a full
            # disk too) stops the sweep
            if not is_out_of_memory(e):
                raise
            row = oom_row(base, batch, seed, point_id, backend)
        if chief:
            results.append_row(out, row)
            _write_hparams(os.path.join(out, "tensorboard", os.path.basename(point.out)), row)
            elapsed = time.perf_counter() - started
            eta = elapsed / (i + 1) * (len(todo) - i - 1)
            acc = row.get("val_accuracy")
            print(f"[{i + 1}/{len(todo)}] batch {batch:>6} seed {seed}"
                  f"{' ' + scaling if scaling else ''}: {row['status']}, "
                  f"val_acc {acc if acc is None else round(acc, 4)}, "
                  f"steps_to_target {row.get('steps_to_target')}, "
                  f"{(row.get('samples_per_sec') or 0):,.0f} samples/s  "
                  f"sweep ETA {int(eta) // 60}:{int(eta) % 60:02d}", file=sys.stderr, flush=True)
    if chief:
        results.sync_csv(out)
        path = build_report(out, target_accuracy=base.target_accuracy)
        print(f"distbatch sweep: report at {path}", file=sys.stderr)
    backend.shutdown()
    return 0


HPARAMS = ("global_batch_size", "peak_lr", "warmup_steps", "optimizer", "scaling_rule")
METRICS = ("val_accuracy", "generalization_gap", "samples_per_sec", "time_to_target_s")


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
