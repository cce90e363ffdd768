"""A new user's first hour: fast --help, a pasteable `recommend` command, launchers that
find `distbatch` without the venv on PATH, sweeps short enough to try."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[1])

HELP_PROBE = """
import sys
from distbatch.cli import main
for argv in sys.argv[1:]:
    try:
        main(argv.split())
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("tensorflow", "keras", "horovod", "numpy", "matplotlib") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_help_imports_no_tensorflow():
    """`distbatch --help` took 4.3 s because building the parsers imported TensorFlow."""
    commands = ["--help", "train --help", "sweep --help", "bench --help", "report --help",
                "recommend --help", "probe-batch --help", "launch --help", "launch slurm --help"]
    p = subprocess.run([PY, "-c", HELP_PROBE, *commands], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "HEAVY []"


# --------------------------------------------------------------------------- recommend's command
def test_recommend_command_pastes_into_train_with_every_flag_carried_over():
    """The printed command lacked --out and the dataset sizes, so pasting it failed."""
    from distbatch.cli import build_parser
    from distbatch.cli.recommend import _NOT_COPIED, suggested_command
    from distbatch.measure.recommend import warmup_for
    from distbatch.cli.train import validate_args

    rec = build_parser("recommend").parse_args([
        "recommend", "--dataset", "digits", "--train-size", "500", "--val-size", "100", "--data-seed", "4",
        "--backend", "mirrored", "--cpu-replicas", "2", "--seed", "3", "--momentum", "0.8",
        "--no-exclude-bias-bn", "--epochs", "4", "--decay", "cosine", "--cluster-timeout", "30",
        "--accumulation-steps", "2", "--out", "runs/rec"])
    command = suggested_command(rec, 256, warmup_for(256, rec.base_batch_size, epochs=rec.epochs))
    assert command[:2] == ["distbatch", "train"] and command[-2:] == ["--out", "runs/train-bs256"]
    train = build_parser("train").parse_args(command[1:])
    config = validate_args(train)  # as `distbatch train` does before any work
    assert (config.global_batch_size, config.epochs, config.recipe.warmup,
            config.recipe.warmup_epochs) == (256, 4.0, "gradual", 0.2222)
    for action in build_parser("train")._subparsers._group_actions[0].choices["train"]._actions:
        if action.option_strings and action.dest not in _NOT_COPIED:
            assert getattr(train, action.dest) == getattr(rec, action.dest), action.dest


# --------------------------------------------------------------------------- train says what it does
def _cli(args, tmp_path, timeout=300):
    return subprocess.run([str(Path(PY).parent / "distbatch"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.slow
def test_train_announces_the_compile_and_says_where_it_wrote(tmp_path):
    p = _cli(["train", "--train-size", "256", "--val-size", "64", "--global-batch-size", "32",
              "--steps", "8", "--out", "run"], tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    compiling = lines.index("distbatch: compiling the train step (the first step takes longer)...")
    first_step = next(i for i, ln in enumerate(lines) if ln.startswith("epoch "))
    assert compiling < first_step
    assert lines[-1] == ("distbatch: done; wrote run/ (summary.json, config.json, model.keras, "
                         "checkpoints/, tensorboard/)")


# --------------------------------------------------------------------------- short sweeps
def _sweep_recipe(argv):
    import argparse

    from distbatch.cli.sweep import add_sweep_parser, point_config, validate_sweep_args
    parser = argparse.ArgumentParser()
    add_sweep_parser(parser.add_subparsers())
    _, base = validate_sweep_args(parser.parse_args(["sweep", *argv]))
    return point_config(base, 64, 0, "sw").recipe  # one point's recipe, as run_sweep builds it


@pytest.mark.parametrize("epochs, steps_per_epoch, expected_warmup", [
    (6.0, 30, 30),    # the default sweep: 1 epoch of 6, as before
    (1.0, 30, 5),     # was 30 of 30 (all warmup)
    (0.5, 30, 3),     # was an error (warmup 30 > training 15); 15 / 6 = 2.5, rounded
    (24.0, 30, 30),   # long sweeps keep 1 epoch
])
def test_sweep_default_warmup_is_capped_for_short_runs(epochs, steps_per_epoch, expected_warmup):
    point = _sweep_recipe(["--epochs", str(epochs)])
    total = round(epochs * steps_per_epoch)
    _, _, recipe = point.build(global_batch_size=64, steps_per_epoch=steps_per_epoch, total_steps=total)
    assert recipe["warmup_steps"] == expected_warmup


def test_sweep_explicit_warmup_is_not_capped():
    point = _sweep_recipe(["--epochs", "1", "--warmup-epochs", "0.5"])
    assert point.warmup_cap is None
    _, _, recipe = point.build(global_batch_size=64, steps_per_epoch=30, total_steps=30)
    assert recipe["warmup_steps"] == 15


def test_sweep_help_states_the_warmup_default():
    from distbatch.cli import build_parser
    sweep = build_parser("sweep")._subparsers._group_actions[0].choices["sweep"]
    help_text = " ".join(sweep.format_help().split())
    assert "sweep default: 1 epoch, capped at 1/6 of each point's training" in help_text


@pytest.mark.slow
def test_half_epoch_sweep_runs(tmp_path):
    p = _cli(["sweep", "--batch-sizes", "32", "--epochs", "0.5", "--train-size", "512", "--val-size", "64",
              "--no-noise-scale", "--out", "sw"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "warmup 1 epoch(s) capped at 1/6 of each point's training" in p.stderr.splitlines()[0]
    row = json.loads((tmp_path / "sw" / "results.jsonl").read_text().splitlines()[0])
    assert (row["status"], row["steps"], row["warmup_steps"]) == ("ok", 8, 1)  # 16 steps/epoch x 0.5; 8/6
    config = json.loads((tmp_path / "sw" / "config.json").read_text())
    assert (config["warmup_epochs"], config["warmup_cap"]) == (1.0, 1 / 6)
