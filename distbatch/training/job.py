"""One training job: a TrainConfig -> backend, data, batch plan, recipe, model -> Trainer -> files.

Order matters: everything a user can get wrong is checked before TensorFlow
does real work and before anything is written, so a bad setting costs seconds
and leaves no half-written output directory. `distbatch train` (distbatch.cli.train),
the sweep and recommend all run their jobs through :func:`train`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from distbatch import __version__
from distbatch.backends import create_backend
from distbatch.backends.strategy import warn_if_more_than_cores
from distbatch.data.datasets import fingerprint, load_dataset, streams_from_files
from distbatch.data.files import tfrecord_source
from distbatch.data.inputs import SourceDataset, array_sources
from distbatch.errors import ParameterError, param_name, require_param
from distbatch.fileio import atomic_write_json, json_roundtrip
from distbatch.models import build_model, check_model
from distbatch.outdir import (check_out_dir, check_out_outside_dataset, check_run_to_resume,
                              claim_out_dir)
from distbatch.recipes.recipe import parse_epoch_list
from distbatch.training import assembly
from distbatch.training.assembly import RunPlan, RunSpec, set_precision  # noqa: F401 (re-exported)
from distbatch.training.checkpoints import newest_intact
from distbatch.training.config import TrainConfig
from distbatch.training.elastic import elastic_launch, train_elastic
from distbatch.training.oom import OutOfMemory, is_out_of_memory, oom_message
from distbatch.training.preemption import checkpoint_seconds
from distbatch.training.step import wire_compression
from distbatch.training.trainer import LoopOptions

RUN_FILES = ("summary.json", "config.json", "model.keras")
RUN_OUTPUTS = RUN_FILES + ("tensorboard", "checkpoints")  # all overwrite=True removes
EXIT_DIVERGED = 3



def machine_info(backend) -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "gpus": len(tf.config.list_physical_devices("GPU")),
            "tensorflow": tf.__version__, "distbatch": __version__,
            "backend": backend.describe()}


def load_data(config: TrainConfig):
    """The data a TrainConfig names (see load_named_data)."""
    return load_named_data(config.dataset, seed=config.data_seed, train_size=config.train_size,
                           val_size=config.val_size, num_classes=config.num_classes)


def load_named_data(spec: str, *, seed: int = 0, train_size: int | None = None,
                    val_size: int | None = None, num_classes: int | None = None):
    """A dataset by name or path in memory (ArrayDataset), or TFRecords (a path ending in
    .tfrecord, or a glob) streamed from the files (distbatch.data.files; subsets with
    train_size or val_size are read into memory instead)."""
    if streams_from_files(spec) and train_size is None and val_size is None:
        train, val, shape, classes = tfrecord_source(spec, num_classes=num_classes, seed=seed)
        return SourceDataset(spec, train, val, shape, classes)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    return load_dataset(spec, seed=seed, train_size=train_size, val_size=val_size, **extra)


def run_spec(config: TrainConfig, data, *, batch_param: str = "global_batch_size") -> RunSpec:
    """The run a TrainConfig describes, on `data` (a loaded dataset)."""
    if hasattr(data, "x_train"):
        train_src, val_src = array_sources(data)
    else:  # SourceDataset (files streamed)
        train_src, val_src = data.train_source, data.val_source
    return RunSpec(
        model_fn=lambda: build_model(config.model, data.input_shape, data.num_classes),
        train_source=train_src, val_source=val_src, recipe=config.recipe,
        global_batch_size=config.global_batch_size,
        max_global_batch_size=config.max_global_batch_size,
        batch_size_schedule=config.batch_size_schedule, epochs=config.epochs_or_default,
        steps=config.steps, accumulation_steps=config.accumulation_steps, seed=config.seed,
        deterministic=config.deterministic, mixed_precision=config.mixed_precision,
        sync_batchnorm=config.sync_batchnorm, noise_scale=config.noise_scale,
        early_stopping=bool(config.early_stopping_metric), resume=config.resume,
        batch_param=batch_param)


def plan_run(config: TrainConfig, backend, data, *, param: str = "global_batch_size",
             flag: str | None = None) -> RunPlan:
    """Every check that needs the backend and the data, before a model or a file exists
    (distbatch.training.assembly.plan_run, plus the named model against the input shape).
    A sweep calls it for every point before it writes anything. ``param`` names the global
    batch in errors (the sweep's is batch_sizes); ``flag`` is its older spelling."""
    if flag is not None:
        param = flag.strip("-{}").replace("-", "_")
    if config.out is not None:
        check_out_outside_dataset(config.out, config.dataset)
    check_model(config.model, data.input_shape)
    return assembly.plan_run(run_spec(config, data, batch_param=param), backend)


def loop_options(config: TrainConfig, total_steps: int):
    """The loop's options for a TrainConfig's run writing under config.out."""
    return LoopOptions(
        total_steps=total_steps, seed=config.seed, evals_per_epoch=config.evals_per_epoch,
        noise_scale=config.noise_scale, target_accuracy=config.target_accuracy,
        early_stopping_metric=config.early_stopping_metric,
        early_stopping_patience=config.early_stopping_patience, min_delta=config.min_delta,
        checkpoint_dir=os.path.join(config.out, "checkpoints"), checkpoint_every=config.checkpoint_every,
        checkpoint_every_seconds=checkpoint_seconds(config.checkpoint_every_seconds),
        resume=config.resume,
        tensorboard_dir=config.tensorboard_dir or os.path.join(config.out, "tensorboard"),
        stop_at_target=config.stop_at_target,
        steps_per_execution=config.steps_per_execution,
        jit_compile=config.jit_compile == "on",
        bucket_mb=config.bucket_mb,
        grad_compression=config.grad_compression,
        verbose=config.progress)


def train(config: TrainConfig, *, backend=None, data=None, record: dict | None = None,
          elastic=None) -> tuple[dict, int]:
    """Run one training job; returns (summary, exit code).

    `backend` and `data` may be passed in (a sweep reuses them across points).
    `record`: extra keys for config.json (the CLI's command and verbose flags).
    `elastic`: set by distbatch.training.elastic for each attempt of a Horovod Elastic job.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    # -- Horovod Elastic (docs/elastic.md): under horovodrun with a host discovery script or
    # min/max processes, this job runs again from its last commit whenever the workers change.
    if backend is None and elastic is None and elastic_launch(config):
        return train_elastic(config, train, load_data, data=data, record=record)
    # -- (end Horovod Elastic)
    require_param(config.out is not None, "{out} is required: the directory for the run's files", "out")
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite, holds=RUN_FILES)
    if config.resume:
        check_run_to_resume(config.out)

    reason = "given"
    if backend is None:
        backend, reason = create_backend(config.backend, cpu_replicas=config.cpu_replicas,
                                         cluster_timeout=config.cluster_timeout,
                                         collective=config.collective_options(),
                                         stall_timeout=config.stall_timeout)
    if data is None:
        data = load_data(config)
    world_line = None
    if config.resume:  # on another number of replicas: the same global batch, re-split
        old = read_run_config(config.out)
        if isinstance(config.global_batch_size, int) and old.get("replicas") not in (
                None, backend.num_replicas):
            k = assembly.resume_accumulation(config.global_batch_size, backend.num_replicas,
                                             config.accumulation_steps, was=old["replicas"])
            config = config.replace(accumulation_steps=k)
            world_line = (f"distbatch: resuming on {backend.num_replicas} replicas (the run used "
                          f"{old['replicas']}): global batch {config.global_batch_size} = "
                          f"{config.global_batch_size // backend.num_replicas // k} per replica x "
                          f"{backend.num_replicas} replicas x {k} accumulation")
    rp = plan_run(config, backend, data)
    plan, total_steps, batch_schedule = rp.plan, rp.total_steps, rp.batch_schedule
    if batch_schedule is not None:  # config.json records the first batch, as the flag would
        config = config.replace(global_batch_size=plan.global_batch_size)
    candidates = rp.candidates
    adaptive = candidates is not None
    chief = backend.is_chief

    run = assembly.build_run(run_spec(config, data), backend, rp)
    model, optimizer, recipe = run.model, run.optimizer, run.recipe

    data_fingerprint = fingerprint(data)
    written = run_config(config, **(record or {}), backend=backend.name, backend_reason=reason,
                         replicas=backend.num_replicas, plan=plan.as_dict(),
                         total_steps=total_steps, recipe=recipe,
                         **({"data_fingerprint": data_fingerprint} if data_fingerprint else {}))
    if config.resume:  # refused here, before anything is written
        check_resume_matches(written, config.out)
        newest_intact(os.path.join(config.out, "checkpoints"))
    if chief and config.cpu_replicas:  # after every check: bad input prints its error line only
        warn_if_more_than_cores(config.cpu_replicas)
    if chief:
        claim_out_dir(config.out, "train", remove=RUN_OUTPUTS if config.overwrite else ())
        atomic_write_json(os.path.join(config.out, "config.json"), written)
        for line in run.start_lines(reason) + ([world_line] if world_line else []):
            print(line, file=sys.stderr, flush=True)

    options = loop_options(config, total_steps)
    started = time.time()
    say = chief and config.progress  # a sweep's points stay quiet
    try:
        result = run.train(options, log=lambda m: print(m, file=sys.stderr, flush=True)
                           if chief and options.verbose else None)
    except Exception as e:  # out of memory -> one line with the failing batch and what to try
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(oom_message(plan)) from e
    write_rank_report(backend, result.metrics, model)

    summary = {
        "backend": backend.name, "replicas": plan.replicas, "workers": backend.num_workers,
        "global_batch_size": plan.global_batch_size,
        **({"adaptive_batch": True, "max_global_batch_size": config.max_global_batch_size,
            "candidate_batches": candidates} if adaptive else {}),
        "per_replica_batch_size": plan.per_replica_batch_size,
        "accumulation_steps": plan.accumulation_steps, "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": total_steps, "seed": config.seed, "dataset": config.dataset, "model": config.model,
        "mixed_precision": config.mixed_precision,
        "grad_compression": wire_compression(backend, config.grad_compression),  # as applied
        "distbatch_version": __version__, "tensorflow_version": _tf_version(),
        **recipe, **result.metrics,
        **({"elastic": elastic.summary()} if elastic is not None else {}),  # Horovod Elastic
        "generalization_gap": _gap(result.metrics),
        "target_accuracy": config.target_accuracy, "history": result.history, "started": started,
        "machine": machine_info(backend),
        **({"batch_size_schedule": batch_schedule.as_dict()} if batch_schedule else {}),
    }
    _save_model(model, optimizer, config.out, backend)
    if chief:
        atomic_write_json(os.path.join(config.out, "summary.json"), summary)
    if summary["diverged"]:
        if chief:
            print(f"distbatch: training diverged (loss not finite) at step {summary['diverged_step']}; "
                  f"lower {param_name('base_lr')} or add warmup. Summary in {config.out}/summary.json", file=sys.stderr)
        return summary, EXIT_DIVERGED
    if say:
        print(f"distbatch: done; wrote {output_listing(config.out)}", file=sys.stderr, flush=True)
    return summary, 0


def output_listing(out: str) -> str:
    """'OUT/ (summary.json, config.json, model.keras, checkpoints/, tensorboard/)': what is there."""
    names = [n for n in RUN_FILES if os.path.isfile(os.path.join(out, n))]
    names += [f"{n}/" for n in ("checkpoints", "tensorboard") if os.path.isdir(os.path.join(out, n))]
    return f"{os.path.join(out, '')} ({', '.join(names)})"


def write_rank_report(backend, metrics: dict, model) -> None:
    """If $DISTBATCH_RANK_REPORT names a directory, EVERY rank writes rank<i>.json (its own
    step count and early-stopping decision) and rank<i>.npz (its final weights) there.

    For tests and debugging of multi-process runs, where only the chief writes
    summary.json and model.keras: it shows whether all ranks ended identical.
    """
    directory = os.environ.get("DISTBATCH_RANK_REPORT")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    keys = ("steps", "best_step", "stopped_early", "restored_value", "val_loss", "diverged")
    atomic_write_json(os.path.join(directory, f"rank{backend.worker_index}.json"),
                      {"rank": backend.worker_index, **{k: metrics.get(k) for k in keys}})
    np.savez(os.path.join(directory, f"rank{backend.worker_index}.npz"), *model.get_weights())


# Config keys a resumed run may change: where the outputs go and how much is printed
# or checkpointed. Every other key of config.json (flags and derived values such as the
# batch plan and the recipe) changes the result, so it must match.
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "progress", "verbose",
                               "tensorboard_dir", "checkpoint_every", "checkpoint_every_seconds",
                               "backend_reason", "machine",
                               # how the gradients are grouped into all-reduces: the same sums
                               "bucket_mb", "stall_timeout", "deterministic",
                               "batch_sizes", "seeds", "elastic_commit_every"}) | assembly.WORLD_KEYS


def run_config(config: TrainConfig | dict, **derived) -> dict:
    """config.json of a run: every flag (TrainConfig.as_flags, or a command's own dict of
    flags) plus derived values, as it reads back from disk."""
    flags = config.as_flags() if isinstance(config, TrainConfig) else dict(config)
    return json_roundtrip(dict(sorted({**flags, **derived}.items())))


def read_run_config(out: str) -> dict:
    """config.json of the run in `out` ({} when there is none or it is not a JSON object)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def check_resume_matches(config: dict, out: str, *, may_change=RESUME_MAY_CHANGE) -> None:
    """Resuming with another configuration than the run in `out` would silently train (or
    report) something else: refuse the first key that differs, naming both values.

    Keys only one side has (a flag older or newer than the run) are not compared.
    """
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ParameterError(f"{{resume}}: {path} is not a distbatch config ({e}); cannot tell which "
                             "run this is", "resume") from None
    _check_same_data(old, config, out)
    diff = first_difference(_comparable(old), _comparable(config), skip=may_change)
    if diff:
        key, was, now = diff
        named = key.isidentifier()  # a setting of its own, else a derived value like plan.steps
        raise ParameterError(f"{{resume}}: {'{' + key + '}' if named else key} is {now!r} but the run "
                             f"in {out!r} used {was!r}; resume with the same settings or use another "
                             "{out}", "resume", *([key] if named else []), "out")


def _check_same_data(old: dict, new: dict, out: str) -> None:
    """A dataset file replaced by another under the same name (even of the same size) would
    continue the run on other data. A run written before config.json had a fingerprint (no
    key) is not compared."""
    was, now = old.get("data_fingerprint"), new.get("data_fingerprint")
    if was is None or now is None or was == now:
        return
    raise ParameterError(f"{{resume}}: dataset {new.get('dataset')!r} is not the data the run in "
                         f"{out!r} trained on ({_data_line(now)} now, {_data_line(was)} then); resume "
                         "with the same data or use another {out}", "resume", "out")


def _data_line(fp: dict) -> str:
    return (f"{fp.get('train_examples')} train / {fp.get('val_examples')} val examples, sample "
            f"sha256 {fp.get('sample_sha256')}")


def _comparable(config: dict) -> dict:
    """decay_epochs as numbers: "30,60" and "30.0, 60" are the same milestones."""
    if isinstance(config.get("decay_epochs"), str):
        try:
            config = {**config, "decay_epochs": list(parse_epoch_list(config["decay_epochs"]) or ())}
        except ValueError:
            pass
    return config


def first_difference(old: dict, new: dict, prefix: str = "", skip=frozenset()):
    """(key, old value, new value) of the first differing common key; flags before nested;
    dotted keys in `skip` (e.g. "plan.replicas") are not compared."""
    for key in sorted(old.keys() & new.keys(), key=lambda k: (isinstance(old[k], dict), k)):
        a, b = old[key], new[key]
        if f"{prefix}{key}" in skip:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = first_difference(a, b, f"{prefix}{key}.", skip)
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def _gap(m: dict):
    if m.get("train_accuracy") is None or m.get("val_accuracy") is None:
        return None
    return m["train_accuracy"] - m["val_accuracy"]


def _tf_version() -> str:
    return tf.__version__


def _save_model(model, optimizer, out: str, backend) -> None:
    """Chief writes out/model.keras, compiled (by assembly.build_run) with the optimizer that
    trained it (its schedule and step count), sparse cross-entropy from logits and accuracy, so
    distbatch.load_model(path).fit(...) continues; other multiworker workers save to a temp
    dir (TF needs all)."""
    if backend.is_chief:
        tmp = os.path.join(out, ".model.keras.tmp.keras")
        model.save(tmp)
        os.replace(tmp, os.path.join(out, "model.keras"))
    elif backend.name == "multiworker":
        d = tempfile.mkdtemp(prefix=f"distbatch-w{backend.worker_index}-")
        model.save(os.path.join(d, "model.keras"))
        shutil.rmtree(d, ignore_errors=True)
