"""Bad input through the CLI: exit 2, ONE stderr line naming the value, no
traceback, and no output directory created or touched.

Each case costs a fresh `distbatch` process ~5 s of CPU for TensorFlow's
import alone, 45 cases several minutes on a shared 2-core machine. So the
same CASES table runs twice:

* fast (default): ONE subprocess imports distbatch once and runs every case
  through ``distbatch.cli.main(argv)``, with file descriptors 1 and 2
  redirected per case (so C++ and Python output are both captured) and the
  console script's behaviour reproduced (SystemExit code; an escaping
  exception prints its traceback and exits 1);
* slow (``-m slow``, CI): every case as its own real `distbatch` process via
  conftest.run_cli, a few at a time.

The table is also the source of the "bad input" rows of docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import load_summary, run_cli, run_cli_cases

# A tiny valid run; each case overrides some of it.
BASE = {"--backend": "single", "--dataset": "mnist1d", "--train-size": "256", "--val-size": "64",
        "--global-batch-size": "32", "--steps": "10"}
REMOVE = object()  # drop the flag from BASE


def _argv(overrides: dict, extra: tuple = ()) -> list[str]:
    flags = {**BASE, **overrides}
    argv = ["train"]
    for k, v in flags.items():
        if v is REMOVE:
            continue
        argv += [k] if v is None else [k, v]
    return argv + list(extra)


GOOD_TF_CONFIG = {"cluster": {"worker": ["localhost:23451", "localhost:23452"]},
                  "task": {"type": "worker", "index": 0}}

# id -> (flag overrides, env additions, substrings the ONE error line must contain)
CASES: dict[str, tuple[dict, dict, list[str]]] = {
    # batch arithmetic
    "batch_not_divisible_by_replicas": (
        {"--backend": "mirrored", "--cpu-replicas": "3", "--global-batch-size": "64"}, {},
        ["--global-batch-size 64 is not divisible by replicas (3)", "try 63"]),
    "batch_not_divisible_by_replicas_x_accumulation": (
        {"--backend": "mirrored", "--cpu-replicas": "2", "--accumulation-steps": "3",
         "--global-batch-size": "64"}, {},
        ["--global-batch-size 64 is not divisible by replicas (2) x accumulation steps (3) = 6"]),
    "batch_not_divisible_by_accumulation": (
        {"--accumulation-steps": "3", "--global-batch-size": "32"}, {},
        ["--global-batch-size 32 is not divisible", "accumulation steps (3)"]),
    "batch_larger_than_train_set": (
        {"--global-batch-size": "512"}, {},
        ["--global-batch-size 512 is larger than the training set (256 examples)"]),
    "batch_zero": ({"--global-batch-size": "0"}, {}, ["--global-batch-size must be a positive integer, got 0"]),
    "batch_negative": ({"--global-batch-size": "-8"}, {}, ["--global-batch-size", "got -8"]),
    "batch_not_a_number": ({"--global-batch-size": "abc"}, {},
                           ["argument --global-batch-size: must be a whole number, 'auto' or 'ramp', got 'abc'"]),
    "accumulation_zero": ({"--accumulation-steps": "0"}, {}, ["--accumulation-steps must be >= 1, got 0"]),
    # training length and learning rate
    "epochs_zero": ({"--steps": REMOVE, "--epochs": "0"}, {}, ["--epochs must be > 0, got 0.0"]),
    "epochs_negative": ({"--steps": REMOVE, "--epochs": "-1"}, {}, ["--epochs must be > 0, got -1.0"]),
    "steps_zero": ({"--steps": "0"}, {}, ["--steps must be >= 1, got 0"]),
    "steps_negative": ({"--steps": "-5"}, {}, ["--steps must be >= 1, got -5"]),
    "steps_and_epochs": ({"--epochs": "1"}, {}, ["argument --epochs: not allowed with argument --steps"]),
    "lr_zero": ({"--base-lr": "0"}, {}, ["--base-lr must be > 0, got 0.0"]),
    "lr_negative": ({"--base-lr": "-0.1"}, {}, ["--base-lr must be > 0, got -0.1"]),
    "warmup_steps_longer_than_training": (
        {"--warmup-steps": "20"}, {}, ["warmup (20 steps) is longer than training (10 steps)"]),
    "warmup_epochs_longer_than_training": (
        {"--steps": REMOVE, "--epochs": "1", "--warmup-epochs": "3"}, {},
        ["warmup (24 steps) is longer than training (8 steps)"]),
    "warmup_negative": ({"--warmup-steps": "-1"}, {}, ["--warmup-steps must be >= 0, got -1"]),
    # unknown names
    "unknown_backend": ({"--backend": "bogus"}, {}, ["argument --backend: invalid choice: 'bogus'"]),
    "unknown_model": ({"--model": "bogus"}, {}, ["argument --model: invalid choice: 'bogus'"]),
    "unknown_dataset": ({"--dataset": "bogus"}, {}, ["unknown dataset 'bogus'", "mnist1d"]),
    "unknown_optimizer": ({"--optimizer": "bogus"}, {}, ["argument --optimizer: invalid choice: 'bogus'"]),
    "unknown_decay_schedule": ({"--decay": "bogus"}, {}, ["argument --decay: invalid choice: 'bogus'"]),
    "unknown_warmup_schedule": ({"--warmup": "bogus"}, {}, ["argument --warmup: invalid choice: 'bogus'"]),
    "unknown_scaling_rule": ({"--scaling": "bogus"}, {}, ["argument --scaling: invalid choice: 'bogus'"]),
    "cpu_replicas_without_mirrored": ({"--cpu-replicas": "2"}, {},
                                      ["--cpu-replicas 2 only applies to --backend mirrored, not single"]),
    # dataset files ({data} is replaced by the fixture's directory)
    "dataset_path_missing": ({"--dataset": "{data}/nope/missing.npz"}, {},
                             ["dataset path not found:", "missing.npz"]),
    "dataset_npz_corrupt": ({"--dataset": "{data}/corrupt.npz"}, {}, ["cannot read", "corrupt.npz", "as .npz"]),
    "dataset_npz_missing_arrays": ({"--dataset": "{data}/missing_keys.npz"}, {},
                                   ["missing_keys.npz", "lacks array(s) y_train"]),
    "dataset_npz_wrong_x_shape": ({"--dataset": "{data}/flat_x.npz"}, {},
                                  ["flat_x.npz", "x_train must have shape (n, ...), got (256,)"]),
    "dataset_npz_wrong_y_shape": ({"--dataset": "{data}/onehot_y.npz"}, {},
                                  ["y_train must be class indices of shape (n,), got (256, 10)"]),
    "dataset_npz_length_mismatch": ({"--dataset": "{data}/length_mismatch.npz"}, {},
                                    ["x_train has 300 examples but y_train has 299"]),
    "dataset_npz_train_val_shapes_differ": ({"--dataset": "{data}/val_shape.npz"}, {},
                                            ["train inputs have shape (40,) but val inputs (41,)"]),
    "dataset_labels_out_of_range": ({"--dataset": "{data}/negative_label.npz"}, {},
                                    ["y_train labels span [-1, 9]", "expected values in [0, 10)"]),
    "dataset_nan_inputs": ({"--dataset": "{data}/nan_x.npz"}, {}, ["x_train has 3 NaN/inf value(s)"]),
    # launch environment
    "horovod_not_launched": ({"--backend": "horovod"}, {},
                             ["--backend horovod: not launched by horovodrun or mpirun"]),
    "tf_config_missing": ({"--backend": "multiworker"}, {}, ["needs TF_CONFIG", "TF_CONFIG is not set"]),
    "tf_config_not_json": ({"--backend": "multiworker"}, {"TF_CONFIG": "{cluster: oops"},
                           ["TF_CONFIG is not valid JSON", "{cluster: oops"]),
    "tf_config_not_json_auto": ({"--backend": "auto"}, {"TF_CONFIG": "{cluster: oops"},
                                ["TF_CONFIG is not valid JSON"]),
    "tf_config_no_task": ({"--backend": "multiworker"},
                          {"TF_CONFIG": json.dumps({"cluster": GOOD_TF_CONFIG["cluster"]})},
                          ["TF_CONFIG needs 'cluster' and 'task' objects, got keys ['cluster']"]),
    "tf_config_index_out_of_range": (
        {"--backend": "multiworker"},
        {"TF_CONFIG": json.dumps({**GOOD_TF_CONFIG, "task": {"type": "worker", "index": 2}})},
        ["TF_CONFIG task index 2 is out of range for the 2 'worker' address(es)"]),
    "tf_config_negative_index": (
        {"--backend": "multiworker"},
        {"TF_CONFIG": json.dumps({**GOOD_TF_CONFIG, "task": {"type": "worker", "index": -1}})},
        ["TF_CONFIG task index -1 is out of range"]),
    # output directory flags
    "resume_and_overwrite": ({"--resume": None, "--overwrite": None}, {},
                             ["--resume and --overwrite exclude each other"]),
    "out_is_a_file": ({"--out": "{data}/a_file"}, {}, ["a_file", "exists and is not a directory"]),
}


def _write_npz_fixtures(d: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 40)).astype(np.float32), rng.integers(0, 10, 300)
    xv, yv = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    good = dict(x_train=x, y_train=y, x_test=xv, y_test=yv)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive" + bytes(range(256)))
    np.savez(d / "missing_keys.npz", x_train=x, x_test=xv, y_test=yv)
    np.savez(d / "flat_x.npz", **{**good, "x_train": x[:, 0]})
    np.savez(d / "onehot_y.npz", **{**good, "y_train": np.eye(10)[y]})
    np.savez(d / "length_mismatch.npz", **{**good, "y_train": y[:-1]})
    np.savez(d / "val_shape.npz", **{**good, "x_test": np.zeros((64, 41), np.float32)})
    bad_y = y.copy()
    bad_y[::10] = -1  # many, so the --train-size subset surely holds some
    np.savez(d / "negative_label.npz", **{**good, "y_train": bad_y})
    bad_x = x.copy()
    bad_x[1, 2] = bad_x[7, 0] = np.nan
    bad_x[9, 9] = np.inf
    np.savez(d / "nan_x.npz", **{**good, "x_train": bad_x})
    (d / "a_file").write_text("not a directory\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("bad-data")
    _write_npz_fixtures(data)
    return data


def _case_argv(case_id: str, data: Path, outs: Path) -> tuple[list[str], str]:
    overrides = {k: (v.replace("{data}", str(data)) if isinstance(v, str) else v)
                 for k, v in CASES[case_id][0].items()}
    out = overrides.get("--out") or str(outs / case_id)
    return _argv({**overrides, "--out": out}), out




@pytest.fixture(scope="module")
def results(tmp_path_factory, data_dir, dataset_cache):
    """Every case in one driver process; {case id: (CompletedProcess, out path)}."""
    work = tmp_path_factory.mktemp("bad-driver")
    outs = tmp_path_factory.mktemp("bad-outs")
    cases, paths = [], {}
    for case_id in CASES:
        argv, paths[case_id] = _case_argv(case_id, data_dir, outs)
        cases.append({"id": case_id, "argv": argv, "env": CASES[case_id][1]})
    raw = run_cli_cases(cases, work)
    argvs = {c["id"]: c["argv"] for c in cases}
    return {k: (subprocess.CompletedProcess(argvs[k], r["code"], r["stdout"], r["stderr"]), paths[k])
            for k, r in raw.items()}


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory, data_dir, dataset_cache):
    """Every case as its own real `distbatch` process (conftest.run_cli), 2 at a time."""
    outs = tmp_path_factory.mktemp("bad-outs-subprocess")

    def one(case_id):
        argv, out = _case_argv(case_id, data_dir, outs)
        return case_id, (run_cli(argv, env=CASES[case_id][1], check=False, timeout=300), out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CASES))


def assert_one_line_usage_error(proc, must_contain=()) -> str:
    """Exit 2, stderr exactly one `distbatch: error:` line, no traceback anywhere."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{both[-3000:]}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("distbatch: error: "), line
    for part in must_contain:
        assert part in line, f"{part!r} not in {line!r}"
    return line


def check_case(case_id: str, proc, out: str) -> None:
    assert_one_line_usage_error(proc, CASES[case_id][2])
    if case_id == "out_is_a_file":
        assert Path(out).read_text() == "not a directory\n"
    else:
        assert not os.path.exists(out), f"{out} was created for a bad input"


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_line_exit_2(results, case_id):
    check_case(case_id, *results[case_id])


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_line_exit_2_real_process(subprocess_results, case_id):
    check_case(case_id, *subprocess_results[case_id])


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_out_dir_of_another_run_is_refused_then_overwrite_works(tmp_path, dataset_cache):
    out = tmp_path / "run"
    run_cli(_argv({"--out": str(out), "--seed": "1"}), timeout=180)
    first = load_summary(out)
    assert first["seed"] == 1 and first["steps"] == 10
    before = _tree_digest(out)

    proc = run_cli(_argv({"--out": str(out), "--seed": "2"}), check=False, timeout=180)
    line = assert_one_line_usage_error(proc, [f"--out {str(out)!r} already holds a run",
                                              "pass --resume to continue it or --overwrite to replace it"])
    assert "summary.json" in line
    assert _tree_digest(out) == before, "a refused run modified the directory"

    run_cli(_argv({"--out": str(out), "--seed": "2", "--overwrite": None}), timeout=180)
    second = load_summary(out)
    assert second["seed"] == 2 and second["steps"] == 10 and second["diverged"] is False
    assert second["started"] > first["started"]
    with open(out / "config.json") as f:
        assert json.load(f)["seed"] == 2
