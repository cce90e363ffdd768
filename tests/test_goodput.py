"""Goodput-adaptive global batch (distbatch.training.goodput; Pollux, Qiao et al. 2021)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env, load_summary, run_cli

from distbatch.training.goodput import (ThroughputModel, candidate_batches, choose_batch, efficiency,
                               goodput)


@pytest.mark.parametrize("batch,b_noise,base,expected", [
    (32, 100.0, 32, 1.0),                      # the base batch is fully efficient
    (1024, 0.0, 32, 32 / 1024),                # no noise: a bigger batch is pure waste
    (1024, 1e12, 32, 1.0),                     # pure noise: linear scaling is free
    (256, 224.0, 32, (224 + 32) / (224 + 256)),
])
def test_efficiency(batch, b_noise, base, expected):
    assert efficiency(batch, b_noise, base) == pytest.approx(expected, rel=1e-9)


def test_throughput_model_recovers_a_line():
    alpha, beta = 0.004, 2e-5
    m = ThroughputModel.fit({b: alpha + beta * b for b in (32, 64, 256, 1024)})
    assert m.alpha == pytest.approx(alpha, rel=1e-9) and m.beta == pytest.approx(beta, rel=1e-9)
    assert m.samples_per_sec(512) == pytest.approx(512 / (alpha + beta * 512))
    one = ThroughputModel.fit({64: 0.01})
    assert one.samples_per_sec(64) == pytest.approx(6400) and one.alpha == 0.0
    with pytest.raises(ValueError, match="step_seconds"):
        ThroughputModel.fit({})


def test_choose_batch_is_the_goodput_argmax():
    """Known throughput curve (4 ms fixed + 20 us per example) and noise scale 200 at base 32:
    goodput(B) = B/(0.004 + 2e-5 B) x (232)/(200 + B); the argmax over the candidates by hand."""
    m = ThroughputModel(0.004, 2e-5)
    cands = [32, 64, 128, 256, 512, 1024]
    values = {b: b / (0.004 + 2e-5 * b) * 232 / (200 + b) for b in cands}
    best = max(values, key=values.get)
    assert best == 256
    for b in cands:
        assert goodput(b, m, 200.0, 32) == pytest.approx(values[b], rel=1e-9)
    assert choose_batch(cands, m, 200.0, 32, current=32) == best
    # Hysteresis: no switch for less than 5% predicted gain.
    assert values[128] > values[256] / 1.05
    assert choose_batch(cands, m, 200.0, 32, current=128) == 128
    # Tiny noise scale: stay small; huge: go to the largest.
    assert choose_batch(cands, m, 1.0, 32, current=256) == 32
    assert choose_batch(cands, m, 1e9, 32, current=32) == 1024


def test_candidates():
    assert candidate_batches(32, 1024, units=1, num_examples=10**6) == [32, 64, 128, 256, 512, 1024]
    assert candidate_batches(32, 1000, units=2, num_examples=300) == [32, 64, 128, 256]
    assert candidate_batches(3, 24, units=2, num_examples=100) == [6, 12, 24]
    with pytest.raises(ValueError, match="below the base batch"):
        candidate_batches(64, 32, units=1, num_examples=100)


AUTO = ["train", "--dataset", "mnist1d", "--train-size", "2048", "--val-size", "256",
        "--global-batch-size", "auto", "--max-global-batch-size", "256", "--scaling", "adascale",
        "--base-batch-size", "16", "--base-lr", "0.05", "--warmup", "none", "--decay", "cosine",
        "--epochs", "3", "--seed", "1"]


@pytest.mark.slow
def test_adaptive_run(tmp_path, dataset_cache):
    out = tmp_path / "auto"
    proc = run_cli([*AUTO, "--backend", "single", "--out", str(out)])
    s = load_summary(out)
    traj = s["batch_trajectory"]
    assert traj[0] == [0, 16] and all(b in s["candidate_batches"] for _, b in traj)
    # Segments are whole data epochs at their batch: each starts where the last one ended.
    for seg, nxt in zip(s["segments"], s["segments"][1:]):
        assert nxt["start_step"] == seg["start_step"] + seg["steps"]
        assert seg["steps"] == 2048 // seg["global_batch_size"]
    # The run ends when tau reaches the base budget (3 epochs at batch 16).
    assert s["scale_invariant_steps"] >= 3 * 2048 // 16 > s["steps"] - 1
    assert "goodput-best batch" in proc.stderr
    assert s["val_accuracy"] > 0.3


@pytest.mark.parametrize("extra,needle", [
    (["--scaling", "linear"], "--scaling adascale"),
    (["--max-global-batch-size", "8"], "--max-global-batch-size must be >= --base-batch-size"),
])
@pytest.mark.slow
def test_adaptive_bad_flags(tmp_path, extra, needle):
    argv = [a for a in AUTO if a not in ("--scaling", "adascale")] if "--scaling" in extra else AUTO
    if "--max-global-batch-size" in extra:
        i = argv.index("--max-global-batch-size")
        argv = argv[:i] + argv[i + 2:]
    proc = run_cli([*argv, *extra, "--out", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_adaptive_needs_max(tmp_path):
    i = AUTO.index("--max-global-batch-size")
    proc = run_cli([*AUTO[:i], *AUTO[i + 2:], "--out", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "--max-global-batch-size" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_adaptive_horovod_ranks_agree(tmp_path, dataset_cache):
    """Two ranks change batch at the same steps (same decisions) and end identical."""
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    proc = subprocess.run(
        [str(VENV_BIN / "distbatch"), "launch", "horovod", "-np", "2", "-H", "localhost:2",
         "--gloo", "--", str(VENV_BIN / "distbatch"), *AUTO, "--backend", "horovod",
         "--out", str(out)],
        env=cli_env({"DISTBATCH_RANK_REPORT": str(ranks)}), capture_output=True, text=True,
        timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = np.load(ranks / "rank0.npz"), np.load(ranks / "rank1.npz")
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k])
    assert load_summary(out)["steps"] > 0
