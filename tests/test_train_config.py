"""TrainConfig: built once from the flags, frozen, errors naming the field (the CLI: the
flag), and config.json exactly as the Namespace used to write it (old runs still resume)."""
from __future__ import annotations

import dataclasses

import pytest

from distbatch.cli import build_parser
from distbatch.cli.train import config_from_args, record_of
from distbatch.errors import ParameterError, UsageError
from distbatch.fileio import json_roundtrip
from distbatch.recipes.recipe import Recipe
from distbatch.training.config import TrainConfig
from distbatch.training.job import check_resume_matches, run_config

ARGVS = [
    ["--global-batch-size", "64", "--out", "o"],
    ["--global-batch-size", "64", "--steps", "7", "--decay-epochs", "3,6", "--optimizer", "lars",
     "--no-exclude-bias-bn", "--warmup-steps", "2", "--seed", "5", "--out", "o"],
    ["--batch-size-schedule", "0:32,1:64", "--epochs", "3", "--decay", "constant", "--out", "o"],
    ["--global-batch-size", "auto", "--max-global-batch-size", "256", "--scaling", "adascale",
     "--steps-per-execution", "4", "--bucket-mb", "2", "--out", "o"],
]


def _old_config_json(args) -> dict:
    """What run_config(args) wrote before TrainConfig: every Namespace entry, the default
    length filled in by validate_args."""
    old = {k: v for k, v in vars(args).items() if k not in ("func", "handler")}
    if old["epochs"] is None and old["steps"] is None:
        old["epochs"] = 10.0
    return json_roundtrip(dict(sorted(old.items())))


@pytest.mark.parametrize("argv", ARGVS)
def test_config_json_keys_and_values_are_unchanged(argv):
    args = build_parser("train").parse_args(["train", *argv])
    new = run_config(config_from_args(args), **record_of(args))
    assert new == _old_config_json(args)


def test_an_old_run_with_other_spelled_milestones_still_resumes(tmp_path):
    args = build_parser("train").parse_args(["train", "--global-batch-size", "64", "--decay-epochs",
                                             "3.0, 6", "--out", str(tmp_path)])
    (tmp_path / "config.json").write_text(__import__("json").dumps(_old_config_json(args)))
    check_resume_matches(run_config(config_from_args(args), **record_of(args)), str(tmp_path))
    other = build_parser("train").parse_args(["train", "--global-batch-size", "64", "--decay-epochs",
                                              "3,7", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="^resume: decay_epochs is"):
        check_resume_matches(run_config(config_from_args(other)), str(tmp_path))


def test_a_run_from_before_bucket_auto_resumes_but_compression_must_match(tmp_path):
    """--bucket-mb only groups the same sums (a run written with the old default 0 resumes
    under the new default auto); --grad-compression changes them and is compared."""
    def config_json(*flags):
        args = build_parser("train").parse_args(["train", "--global-batch-size", "64", *flags,
                                                 "--out", str(tmp_path)])
        return run_config(config_from_args(args), **record_of(args))
    (tmp_path / "config.json").write_text(__import__("json").dumps(config_json("--bucket-mb", "0")))
    check_resume_matches(config_json(), str(tmp_path))
    check_resume_matches(config_json("--bucket-mb", "4"), str(tmp_path))
    with pytest.raises(UsageError, match="^resume: grad_compression is 'fp16' but the run in") as err:
        check_resume_matches(config_json("--grad-compression", "fp16"), str(tmp_path))
    assert str(err.value.for_flags()).startswith("--resume: --grad-compression is 'fp16' but the run in")


def test_frozen_and_replace_validates_again():
    config = TrainConfig(out="o", global_batch_size=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3
    point = config.replace(seed=3, base_lr=0.2, warmup_epochs=1.0)  # recipe fields go to the recipe
    assert (point.seed, point.recipe.base_lr, point.recipe.warmup_epochs) == (3, 0.2, 1.0)
    assert config.recipe == Recipe() and config.seed == 0
    with pytest.raises(ParameterError, match="^epochs must be > 0, got -1"):
        config.replace(epochs=-1)
    assert config.epochs is None and config.epochs_or_default == 10.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=0), "global_batch_size must be a positive integer, got 0"),
    (dict(), "global_batch_size is required (or give batch_size_schedule)"),
    (dict(global_batch_size=8, epochs=1.0, steps=3), "give epochs or steps, not both"),
    (dict(global_batch_size=8, steps=0), "steps must be >= 1, got 0"),
    (dict(global_batch_size=8, seed=-1), "seed must be an integer in [0, 2**32), got -1"),
    (dict(global_batch_size=8, resume=True, overwrite=True), "resume and overwrite exclude each other"),
    (dict(global_batch_size=8, target_accuracy=1.5), "target_accuracy must be in (0, 1], got 1.5"),
    (dict(global_batch_size="auto"), "global_batch_size auto needs max_global_batch_size"),
    (dict(global_batch_size="auto", max_global_batch_size=64),
     "global_batch_size auto follows AdaScale's gain; add scaling adascale (got scaling linear)"),
    (dict(global_batch_size=8, backend="mpi"), "backend must be one of auto, single, mirrored, "),
    (dict(global_batch_size=8, model="vgg"), "model must be one of "),
    (dict(global_batch_size=8, mixed_precision="fp8"), "mixed_precision must be one of off, float16, "
                                                       "bfloat16, got 'fp8'"),
    (dict(global_batch_size=8, bucket_mb="tensor"), "bucket_mb must be a finite number >= 0 (0: one "
                                                    "all-reduce) or 'auto', got 'tensor'"),
    (dict(global_batch_size=8, bucket_mb=-0.5), "bucket_mb must be a finite number >= 0 (0: one "
                                                "all-reduce) or 'auto', got -0.5"),
])
def test_errors_name_the_field_and_the_cli_the_flag(kwargs, message):
    with pytest.raises(ParameterError) as err:
        TrainConfig(out="o", **kwargs)
    assert str(err.value).startswith(message), str(err.value)
    flags = str(err.value.for_flags())
    assert "--" in flags and "_" not in flags.split(",")[0], flags


def test_cli_shows_the_flag():
    args = build_parser("train").parse_args(["train", "--global-batch-size", "auto", "--out", "o"])
    with pytest.raises(UsageError, match="^--global-batch-size auto needs --max-global-batch-size "):
        config_from_args(args)


def test_type_errors_name_the_field():
    with pytest.raises(TypeError, match="^accumulation_steps must be an integer"):
        TrainConfig(out="o", global_batch_size=8, accumulation_steps=2.0)
    with pytest.raises(TypeError, match="^recipe must be a distbatch.Recipe"):
        TrainConfig(out="o", global_batch_size=8, recipe={"base_lr": 0.1})


@pytest.mark.parametrize("argv", [
    ["--batch-sizes", "32,64", "--out", "s"],
    ["--batch-sizes", "16", "--steps", "5", "--scaling", "linear,adascale", "--warmup-steps", "2",
     "--stop-at-target", "--seeds", "2", "--out", "s"],
])
def test_sweep_config_json_is_unchanged(argv):
    from distbatch.cli.sweep import (DEFAULT_WARMUP_CAP, DEFAULT_WARMUP_EPOCHS, sweep_flags,
                                     validate_sweep_args)
    args = build_parser("sweep").parse_args(["sweep", *argv])
    batches, base = validate_sweep_args(args)
    old = {k: v for k, v in vars(args).items() if k not in ("func", "handler")}  # as the sweep
    if old["epochs"] is None and old["steps"] is None:                         # mutated it
        old["epochs"] = 6.0
    old["global_batch_size"] = batches[0]
    if old["warmup_epochs"] is None and old["warmup_steps"] is None:
        old["warmup_epochs"], old["warmup_cap"] = DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_CAP
    assert run_config(sweep_flags(args, base), batch_sizes=batches) == json_roundtrip(
        dict(sorted({**old, "batch_sizes": batches}.items())))
