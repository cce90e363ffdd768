"""Mixed precision through Keras policies on the shared step: float16 with
dynamic loss scaling tracks float32 closely (loss scaling is undone exactly
once), bfloat16 runs on 2 replicas."""
from __future__ import annotations

import pytest

from conftest import load_summary, run_cli

ARGS = ["train", "--train-size", "1024", "--val-size", "200", "--global-batch-size", "64",
        "--epochs", "2", "--noise-scale"]


@pytest.mark.slow
def test_float16_tracks_float32(tmp_path, dataset_cache):
    run_cli([*ARGS, "--backend", "single", "--out", str(tmp_path / "f32")])
    run_cli([*ARGS, "--backend", "single", "--mixed-precision", "float16", "--out", str(tmp_path / "f16")])
    a, b = load_summary(tmp_path / "f32"), load_summary(tmp_path / "f16")
    assert b["mixed_precision"] == "float16"
    # A gradient scaled twice (or not unscaled) would change these by orders of magnitude.
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=0.01)
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=0.01)
    assert b["b_simple"] == pytest.approx(a["b_simple"], rel=0.02)


@pytest.mark.slow
def test_bfloat16_on_two_replicas(tmp_path, dataset_cache):
    run_cli([*ARGS, "--backend", "mirrored", "--cpu-replicas", "2", "--mixed-precision", "bfloat16",
             "--out", str(tmp_path / "bf16")])
    s = load_summary(tmp_path / "bf16")
    assert s["replicas"] == 2 and s["mixed_precision"] == "bfloat16"
    assert s["val_loss"] < 2.2  # it learned (chance is ln 10 = 2.30)
