"""Several steps per tf.function call (--steps-per-execution) change nothing but speed.

N steps per call must give the same weights, learning-rate trace, metrics and
history as one step per call: evaluations, checkpoints, the noise scale,
accumulation and batch-size-schedule segments land on exactly the same steps.
TensorBoard still gets loss, accuracy and learning rate at the right steps
(read back from the event files), and a run that diverges inside a
multi-step call names the exact first non-finite step.

Fast tests run the CLI's code in this process on one device; the mirrored,
multiworker and Horovod variants run the real CLI in subprocesses (slow).
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env, load_summary, load_weights, max_weight_diff, run_cli

# 600 train examples at batch 32: 18 steps/epoch; 3 evaluations per epoch (every 6 steps), a
# checkpoint every 5 steps (not aligned with the evaluations), TensorBoard every 4 steps.
BASE = ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "600",
        "--val-size", "150", "--global-batch-size", "32", "--epochs", "2", "--seed", "5",
        "--evals-per-epoch", "3", "--checkpoint-every", "5", "--warmup-steps", "7",
        "--decay", "cosine", "--noise-scale"]


def train_in_process(argv: list[str]) -> dict:
    from distbatch.cli import build_parser
    from distbatch.cli.train import train
    args = build_parser("train").parse_args(argv)
    args.progress = False
    summary, code = train(args)
    assert code == 0
    return summary


def tensorboard_scalars(run_dir, kind: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files of run_dir/tensorboard/kind."""
    import glob

    import tensorflow as tf
    found: dict[str, list] = {}
    for path in sorted(glob.glob(str(run_dir / "tensorboard" / kind / "events.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                found.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    return found


def assert_same_run(a, b, *, weights_tol=1e-6) -> None:
    sa, sb = load_summary(a), load_summary(b)
    assert max_weight_diff(load_weights(a), load_weights(b)) <= weights_tol
    assert len(sa["history"]) == len(sb["history"]) > 0
    for ra, rb in zip(sa["history"], sb["history"]):
        assert ra["step"] == rb["step"]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (key, ra["step"])
    for key in ("steps", "val_loss", "val_accuracy", "train_loss", "b_simple"):
        assert sa[key] == pytest.approx(sb[key], rel=1e-5), key


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, dataset_cache):
    out = tmp_path_factory.mktemp("spe") / "n1"
    train_in_process([*BASE, "--steps-per-execution", "1", "--out", str(out)])
    return out


@pytest.mark.parametrize("n", ["4", "auto"])
def test_steps_per_call_change_nothing(n, one_step_run, tmp_path):
    out = tmp_path / f"n{n}"
    s = train_in_process([*BASE, "--steps-per-execution", n, "--out", str(out)])
    if n == "4":
        assert s["steps_per_execution"] == 4
    assert_same_run(out, one_step_run)
    # Checkpoints at the same steps: every 5 steps and at the end (the manager keeps 2).
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.index"))
    assert ckpts == sorted(p.name for p in (one_step_run / "checkpoints").glob("ckpt-*.index"))
    assert ckpts == ["ckpt-35.index", "ckpt-36.index"]


def test_tensorboard_points_at_the_right_steps(one_step_run, tmp_path):
    out = tmp_path / "n7"
    train_in_process([*BASE, "--steps-per-execution", "7", "--out", str(out)])
    ref, got = tensorboard_scalars(one_step_run, "train"), tensorboard_scalars(out, "train")
    for tag in ("loss", "accuracy", "learning_rate", "b_simple"):
        assert [s for s, _ in got[tag]] == [s for s, _ in ref[tag]], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in ref[tag]], rtol=1e-5)
    # One point per log window (50 steps) and at every evaluation (every 6 steps), 36 steps.
    assert [s for s, _ in got["loss"]] == [6, 12, 18, 24, 30, 36]
    # The learning rate logged is the one the optimizer applied: warmup then cosine, the same
    # function of the step as the recipe's schedule.
    from distbatch.recipes.schedules import build_lr_schedule  # noqa: F401  (the recipe's own schedule)
    summary = load_summary(out)
    history_lr = {r["step"]: r["lr"] for r in summary["history"]}
    for step, value in got["learning_rate"]:
        assert value == pytest.approx(history_lr[step], rel=1e-6)
    val = tensorboard_scalars(out, "val")
    assert [s for s, _ in val["accuracy"]] == [r["step"] for r in summary["history"]]
    np.testing.assert_allclose([v for _, v in val["loss"]],
                               [r["val_loss"] for r in summary["history"]], rtol=1e-6)


def test_learning_rate_is_the_schedule(one_step_run):
    """The lr read inside the graph equals the recipe's schedule at (step - 1)."""
    import json

    import keras
    summary = load_summary(one_step_run)
    cfg = json.loads((one_step_run / "config.json").read_text())
    assert cfg["recipe"]["warmup_steps"] == 7
    model = keras.models.load_model(one_step_run / "model.keras", compile=False)  # noqa: F841
    from distbatch.cli import build_parser
    from distbatch.cli.recipe_flags import build_recipe
    args = build_parser("train").parse_args([*BASE, "--out", "x"])
    args.epochs = 2.0
    _, schedule, _ = build_recipe(args, global_batch_size=32, steps_per_epoch=18, total_steps=36)
    for r in summary["history"]:
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)


def test_accumulation_and_schedule_segments(tmp_path, dataset_cache):
    common = ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "600",
              "--val-size", "150", "--epochs", "3", "--seed", "2", "--accumulation-steps", "2",
              "--batch-size-schedule", "0:32,1:64", "--decay", "constant", "--noise-scale",
              "--evals-per-epoch", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process([*common, "--steps-per-execution", "1", "--out", str(a)])
    sb = train_in_process([*common, "--steps-per-execution", "16", "--out", str(b)])
    assert [seg["start_step"] for seg in sb["segments"]] == [0, 18]
    assert_same_run(a, b)


def test_divergence_inside_a_call_names_the_exact_step(tmp_path, dataset_cache):
    diverge = ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "600",
               "--val-size", "150", "--global-batch-size", "32", "--steps", "30",
               "--base-lr", "3e4", "--warmup", "none", "--decay", "constant"]
    steps = {}
    for n in ("1", "25"):
        from distbatch.cli import build_parser
        from distbatch.cli.train import train
        args = build_parser("train").parse_args([*diverge, "--steps-per-execution", n,
                                                 "--out", str(tmp_path / n)])
        args.progress = False
        summary, code = train(args)
        assert code == 3 and summary["diverged"] is True
        steps[n] = summary["diverged_step"]
    # With 25 steps per call the first non-finite step lies inside the first call.
    assert 1 < steps["1"] < 25
    assert steps["25"] == steps["1"]


def test_bad_steps_per_execution_is_one_line(tmp_path):
    for bad in ("0", "-3", "abc", "1.5"):
        proc = run_cli([*BASE, "--steps-per-execution", bad, "--out", str(tmp_path / "x")],
                       check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--steps-per-execution" in lines[0] and bad in lines[0]
        assert not (tmp_path / "x").exists()


def test_jit_compile_gives_the_same_weights(one_step_run, tmp_path):
    out = tmp_path / "xla"
    train_in_process([*BASE, "--steps-per-execution", "1", "--jit-compile", "on",
                      "--out", str(out)])
    assert_same_run(out, one_step_run, weights_tol=1e-4)


# -- other backends (real processes) ---------------------------------------------------------

# 1200 validation examples: several evaluation batches per rank in one call (Horovod refuses
# overlapping all-reduces of one op: the loops run one iteration at a time).
SMALL = ["--dataset", "mnist1d", "--train-size", "520", "--val-size", "1200",
         "--global-batch-size", "64", "--steps", "24", "--seed", "3", "--noise-scale",
         "--evals-per-epoch", "2", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def single_small(tmp_path_factory, dataset_cache):
    out = tmp_path_factory.mktemp("spe-single") / "run"
    run_cli(["train", "--backend", "single", *SMALL, "--steps-per-execution", "1", "--out", str(out)])
    return out


@pytest.mark.slow
def test_mirrored_steps_per_call(tmp_path, single_small):
    runs = {}
    for n in ("1", "6"):
        runs[n] = tmp_path / n
        run_cli(["train", "--backend", "mirrored", "--cpu-replicas", "2", *SMALL,
                 "--steps-per-execution", n, "--out", str(runs[n])])
    assert_same_run(runs["6"], runs["1"])
    assert_same_run(runs["6"], single_small, weights_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,backend", [
    pytest.param(["multiworker", "--workers", "2"], "multiworker", id="multiworker"),
    pytest.param(["horovod", "-np", "2", "-H", "localhost:2", "--gloo"], "horovod", id="horovod"),
])
def test_two_processes_steps_per_call(launcher, backend, tmp_path, single_small):
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    proc = subprocess.run(
        [str(VENV_BIN / "distbatch"), "launch", *launcher, "--", str(VENV_BIN / "distbatch"),
         "train", "--backend", backend, *SMALL, "--steps-per-execution", "6", "--out", str(out)],
        env=cli_env({"DISTBATCH_RANK_REPORT": str(ranks)}), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(out, single_small, weights_tol=1e-5)
    r0, r1 = np.load(ranks / "rank0.npz"), np.load(ranks / "rank1.npz")
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k])
