"""What a fit's run is, for resume=True: its settings beside the checkpoints
(fit_settings.json), compared before anything is built, and the global batch split again
when the run resumes on another number of replicas."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from distbatch.data.datasets import FINGERPRINT_SAMPLE, fingerprint_indices
from distbatch.data.inputs import ArraySource, DatasetSource, _leaves
from distbatch.errors import ParameterError
from distbatch.fileio import json_roundtrip
from distbatch.training import assembly
from distbatch.training.job import first_difference

FIT_SETTINGS = "fit_settings.json"
# Settings a resumed fit may change: they do not change what is trained (the global batch
# stays; on another number of replicas it is split again).
FIT_MAY_CHANGE = frozenset({"backend", "replicas", "accumulation_steps"})


def source_fingerprint(source) -> dict | None:
    """What identifies training data for a resume: its example count and a SHA-256 of up to
    FINGERPRINT_SAMPLE evenly spaced examples (arrays) or the first ones (a tf.data dataset).
    Data replaced by other data of the same size (scaled, permuted) changes it. None for a
    dataset_fn, which distbatch does not read ahead."""

    digest = hashlib.sha256()
    if isinstance(source, ArraySource):
        n = source.num_examples(1)
        pick = fingerprint_indices(n)
        for leaf in _leaves(source.x) + _leaves(source.y):
            a = np.asarray(leaf)
            digest.update(f"{a.shape[1:]} {a.dtype}".encode())
            digest.update(np.ascontiguousarray(a[pick]).tobytes())
    elif isinstance(source, DatasetSource):
        n = source.num_examples(1)
        for element in source.ds.take(FINGERPRINT_SAMPLE):
            for t in _leaves(element):
                digest.update(np.asarray(t).tobytes())
    else:
        return None
    return {"examples": int(n), "sample_sha256": digest.hexdigest()[:16]}


def _read_settings(checkpoint_dir: str) -> dict | None:
    path = os.path.join(checkpoint_dir, FIT_SETTINGS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError as e:
        raise ParameterError(f"{{resume}}: {path} is not readable JSON ({e}); cannot tell which run "
                             "this is", "resume") from None
    return old if isinstance(old, dict) else {}


def resplit_for_resume(spec, backend, checkpoint_dir: str):
    """resume=True on another number of replicas: the run's global batch split across these
    replicas (the accumulation steps lowered where the old split no longer divides it)."""
    old = _read_settings(checkpoint_dir) or {}
    gb = spec.global_batch_size
    if not isinstance(gb, int) or old.get("replicas") in (None, backend.num_replicas):
        return spec
    k = assembly.resume_accumulation(gb, backend.num_replicas, spec.accumulation_steps,
                                     was=old["replicas"])
    return dataclasses.replace(spec, accumulation_steps=k)


def resume_settings(spec, rp, backend) -> dict:
    """What identifies a fit's run for resume=True: the batch arithmetic, the length, the
    recipe, the seed and a fingerprint of the training data."""
    settings = {
        "global_batch_size": rp.plan.global_batch_size, "replicas": rp.plan.replicas,
        "accumulation_steps": rp.plan.accumulation_steps, "total_steps": rp.total_steps,
        "steps_per_epoch": rp.plan.steps_per_epoch, "seed": spec.seed,
        "batch_size_schedule": None if rp.batch_schedule is None else rp.batch_schedule.as_dict(),
        "recipe": dataclasses.asdict(spec.recipe) if spec.recipe is not None else None,
        "mixed_precision": spec.mixed_precision, "sync_batchnorm": spec.sync_batchnorm,
        "data": source_fingerprint(spec.train_source), "backend": backend.name,
    }
    return json_roundtrip(settings)


def check_resume_settings(settings: dict, checkpoint_dir: str) -> None:
    """resume=True with other settings than the run in checkpoint_dir would silently train
    something else: ParameterError naming the first setting that differs and both values."""
    old = _read_settings(checkpoint_dir)
    if old is None:
        return
    diff = first_difference({k: v for k, v in old.items() if k not in FIT_MAY_CHANGE}, settings)
    if diff:
        key, was, now = diff
        name = "data" if key.startswith("data") else key
        raise ParameterError(f"{{resume}}=True: {key} is {now!r} but the run in "
                             f"{str(checkpoint_dir)!r} used {was!r}; resume with the same settings "
                             "or another {checkpoint_dir}", "resume", "checkpoint_dir",
                             *([name] if name in FIT_PARAMS else []))


FIT_PARAMS = ("global_batch_size", "accumulation_steps", "seed", "data")
