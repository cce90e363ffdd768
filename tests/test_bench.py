"""`distbatch bench`: statistics, efficiency arithmetic, JSON schema, bad input.

The pure functions are checked against NumPy/closed-form numbers; one tiny
real run on the single backend checks the JSON against its own iteration
times; bad input goes through the real CLI (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest

from conftest import run_cli
from distbatch.measure import bench
from distbatch.errors import UsageError


# -- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("times, samples", [
    ([1.0, 2.0, 4.0], 100),          # rates 100, 50, 25
    ([0.5], 64),                     # one iteration: no spread
    ([0.01, 0.011, 0.009, 0.0105], 1280),
])
def test_summarize_matches_numpy(times, samples):
    s = bench.summarize(times, samples)
    rates = samples / np.asarray(times)
    assert s["mean"] == pytest.approx(rates.mean())
    assert s["std"] == pytest.approx(rates.std(ddof=0))     # Horovod: np.std
    assert s["ci95"] == pytest.approx(1.96 * rates.std(ddof=0))
    assert s["median"] == pytest.approx(np.median(rates))
    assert (s["min"], s["max"], s["n"]) == (pytest.approx(rates.min()), pytest.approx(rates.max()),
                                            len(times))


def test_summarize_closed_form():
    s = bench.summarize([1.0, 2.0, 4.0], 100)
    mean = 175 / 3
    std = math.sqrt(((100 - mean) ** 2 + (50 - mean) ** 2 + (25 - mean) ** 2) / 3)
    assert s["mean"] == pytest.approx(58.3333333)
    assert s["ci95"] == pytest.approx(1.96 * std)


@pytest.mark.parametrize("times", [[], [1.0, 0.0], [-1.0]])
def test_summarize_rejects_bad_times(times):
    with pytest.raises(UsageError):
        bench.summarize(times, 10)


# -- efficiency ---------------------------------------------------------------------------
@pytest.mark.parametrize("tput, n, base, n0, expected", [
    (200.0, 2, 100.0, 1, 1.0),       # perfect linear scaling
    (150.0, 2, 100.0, 1, 0.75),
    (720.0, 8, 100.0, 1, 0.9),       # Goyal et al.: ~90% at scale
    (180.0, 4, 100.0, 2, 0.9),       # baseline at 2 replicas: 180 / (4/2 x 100)
])
def test_scaling_efficiency(tput, n, base, n0, expected):
    assert bench.scaling_efficiency(tput, n, base, n0) == pytest.approx(expected)


def test_scaling_efficiency_bad_baseline():
    with pytest.raises(UsageError, match="got 0"):
        bench.scaling_efficiency(10.0, 2, 0.0)


def _fake_result(replicas: int, mean: float, ci: float = 1.0, b: int = 64) -> dict:
    return {"replicas": replicas, "global_batch_size": b * replicas, "per_replica_batch_size": b,
            "samples_per_sec": {"mean": mean, "ci95": ci}}


def test_efficiency_table_uses_smallest_count_as_base():
    rows = bench.efficiency_table([_fake_result(4, 300.0), _fake_result(1, 100.0),
                                   _fake_result(2, 180.0)])
    assert [r["replicas"] for r in rows] == [1, 2, 4]
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    assert [r["per_replica_samples_per_sec"] for r in rows] == pytest.approx([100.0, 90.0, 75.0])
    text = bench.format_table(rows)
    assert "0.900" in text and "0.750" in text and len(text.splitlines()) == 4


# -- parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape", [("40", (40,)), ("32x32x3", (32, 32, 3)), ("28X28", (28, 28))])
def test_parse_input_shape(text, shape):
    assert bench.parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "32x", "a", "32x0x3", "-4"])
def test_parse_input_shape_bad(text):
    with pytest.raises(UsageError, match="input-shape"):
        bench.parse_input_shape(text)


def test_parse_replica_list():
    assert bench.parse_replica_list("4,1,2,2") == [1, 2, 4]
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(UsageError, match="cpu-replicas-list"):
            bench.parse_replica_list(bad)


@pytest.mark.parametrize("per, glob, R, expected", [
    (None, None, 2, (64, 128)), (32, None, 4, (32, 128)), (None, 96, 3, (32, 96))])
def test_resolve_batch(per, glob, R, expected):
    assert bench.resolve_batch(per, glob, R) == expected


@pytest.mark.parametrize("per, glob, R, match", [
    (32, 64, 1, "not both"), (None, 100, 3, "100 is not divisible by the 3"), (0, None, 1, "got 0")])
def test_resolve_batch_bad(per, glob, R, match):
    with pytest.raises(UsageError, match=match):
        bench.resolve_batch(per, glob, R)


def test_replica_run_command_exact():
    from distbatch.cli.bench import replica_run_command
    cmd = replica_run_command(["--model", "mlp"], 2, "/tmp/b.json")
    assert cmd == [sys.executable, "-m", "distbatch.cli", "bench", "--model", "mlp",
                   "--backend", "mirrored", "--cpu-replicas", "2", "--json", "/tmp/b.json"]


def test_baseline_loading_and_matching(tmp_path):
    good = {"schema": bench.SCHEMA, "replicas": 1, "samples_per_sec": {"mean": 100.0},
            "model": "mlp", "input_shape": [40], "num_classes": 10, "per_replica_batch_size": 64}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(good))
    assert bench.load_baseline(str(path))["replicas"] == 1
    with pytest.raises(UsageError, match="per_replica_batch_size 64"):
        bench.check_baseline_matches({**good, "per_replica_batch_size": 32}, good)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not JSON"):
        bench.load_baseline(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "x"}))
    with pytest.raises(UsageError, match="schema distbatch.bench/1"):
        bench.load_baseline(str(tmp_path / "other.json"))
    with pytest.raises(UsageError, match="cannot read"):
        bench.load_baseline(str(tmp_path / "missing.json"))


# -- real runs ----------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_real_run_single(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(["bench", "--backend", "single", "--iters", "3", "--steps-per-iter", "2",
                    "--warmup-iters", "1", "--per-replica-batch-size", "16", "--json", str(out)],
                   timeout=120)
    r = json.loads(out.read_text())
    assert r["schema"] == bench.SCHEMA
    assert (r["backend"], r["replicas"], r["workers"]) == ("single", 1, 1)
    assert (r["per_replica_batch_size"], r["global_batch_size"]) == (16, 16)
    assert (r["model"], r["input_shape"], r["num_classes"]) == ("mlp", [40], 10)
    assert len(r["iteration_seconds"]) == 3 and all(t > 0 for t in r["iteration_seconds"])
    # The summary is recomputable from the recorded times (16 samples x 2 steps per iteration).
    rates = 32 / np.asarray(r["iteration_seconds"])
    assert r["samples_per_sec"]["mean"] == pytest.approx(rates.mean())
    assert r["samples_per_sec"]["ci95"] == pytest.approx(1.96 * rates.std())
    assert r["per_replica_samples_per_sec"]["mean"] == pytest.approx(rates.mean())
    assert r["scaling_efficiency"] is None and r["compile_step_s"] > 0
    assert len(r["load_average"]["before"]) == 3
    assert "aggregate:" in proc.stdout and "1.96 std" in proc.stdout


@pytest.mark.slow
def test_cpu_replicas_list_table(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run_cli(["bench", "--cpu-replicas-list", "1,2", "--iters", "2", "--steps-per-iter", "2",
                    "--warmup-iters", "1", "--per-replica-batch-size", "16", "--json", str(out)],
                   timeout=300)
    d = json.loads(out.read_text())
    assert d["schema"] == bench.SCALING_SCHEMA
    assert [r["replicas"] for r in d["runs"]] == [1, 2]
    assert [r["global_batch_size"] for r in d["runs"]] == [16, 32]
    t1, t2 = (r["samples_per_sec"]["mean"] for r in d["runs"])
    assert d["table"][1]["efficiency"] == pytest.approx(t2 / (2 * t1))
    assert "not speed" in proc.stdout and "efficiency" in proc.stdout


# -- bad input: in-process through the real parser and handler (each CLI start imports
# TensorFlow, ~4 s or far more on a loaded machine), plus one case through the CLI ----------
BAD = [
    (["--input-shape", "32xq"], "--input-shape must look like 40, 32x32x3 or 32,32,3, got '32xq'"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--steps-per-iter", "0"], "--steps-per-iter must be >= 1, got 0"),
    (["--warmup-iters", "-1"], "--warmup-iters must be >= 0, got -1"),
    (["--per-replica-batch-size", "8", "--global-batch-size", "16"], "not both"),
    (["--cpu-replicas", "0"], "--cpu-replicas must be >= 1, got 0"),
    (["--cpu-replicas-list", "1,x"], "got '1,x'"),
    (["--cpu-replicas-list", "1,2", "--cpu-replicas", "2"], "not both"),
    (["--cpu-replicas-list", "1,2", "--backend", "horovod"], "got --backend horovod"),
    (["--cpu-replicas-list", "1,2", "--global-batch-size", "15"], "15 is not divisible by the 2"),
    (["--baseline", "/nonexistent/b.json"], "--baseline '/nonexistent/b.json': cannot read it"),
    (["--num-classes", "1"], "--num-classes must be >= 2, got 1"),
]


def _parse(argv):
    parser = argparse.ArgumentParser()
    from distbatch.cli.bench import add_bench_parser
    add_bench_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(c[0]) for c in BAD])
def test_bad_input_one_line(argv, expected):
    args = _parse(argv)
    with pytest.raises(UsageError) as e:
        args.func(args)  # validation runs before TensorFlow is touched
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_bad_input_through_cli():
    proc = run_cli(["bench", "--iters", "0"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["distbatch: error: --iters must be >= 1, got 0"]
