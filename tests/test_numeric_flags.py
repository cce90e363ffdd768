"""Every numeric flag of every command with -1, 0, nan, inf, 1e30 and "abc": a one-line error
(exit 2) or a normal run, never a traceback.

The flags are enumerated from the argparse parsers (every action whose type is int
or float), so a new flag is covered without touching this file.

* Fast (unmarked): each case is parsed and validated in-process, through the same
  functions the command runs before TensorFlow does any work (validate_args and
  friends; the launchers' own builders via --dry-run). An error must be one line.
  What validation accepts is collected.
* Slow: every accepted case of a training command runs for real (tiny --steps and
  --train-size), all in ONE driver process through cli.main, and must end with exit
  0, 3 (diverged, its one line) or a one-line error; never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli_cases

from distbatch import cli
from distbatch.cli import launch as launch_cli
from distbatch.errors import UsageError

VALUES = ("-1", "0", "nan", "inf", "1e30", "abc")
REPO = str(Path(__file__).resolve().parents[1])

# A cheap, valid command line per command (flag -> value; None = a bare switch), and the
# flags that exclude each other (testing one drops the other).
TRAIN = {"--dataset": "mnist1d", "--train-size": "64", "--val-size": "32", "--global-batch-size": "16",
         "--steps": "2", "--backend": "single"}
BASELINES = {
    ("train",): {**TRAIN, "--out": "OUT"},
    ("sweep",): {**{k: v for k, v in TRAIN.items() if k != "--global-batch-size"}, "--batch-sizes": "16",
                 "--no-noise-scale": None, "--out": "OUT"},
    # recommend needs a few more examples and steps for a finite noise scale
    ("recommend",): {**{k: v for k, v in TRAIN.items() if k not in ("--global-batch-size", "--steps")},
                     "--train-size": "512", "--batch-sizes": "32", "--noise-batch-size": "32",
                     "--noise-steps": "30", "--throughput-steps": "3", "--steps": "20", "--out": "OUT"},
    ("bench",): {"--backend": "single", "--iters": "1", "--steps-per-iter": "1", "--warmup-iters": "0",
                 "--per-replica-batch-size": "8", "--quiet": None},
    ("probe-batch",): {"--backend": "single", "--max-batch": "4", "--json": None},
    ("report",): {},
    ("plan",): {"--sweep": "OUT", "--link": "1gbit"},
    ("launch", "horovod"): {"-np": "2", "--horovodrun": "/v/bin/horovodrun", "--dry-run": None},
    ("launch", "mpirun"): {"-np": "2", "--mpirun": "/usr/bin/mpirun", "--dry-run": None},
    ("launch", "multiworker"): {"--workers": "2", "--dry-run": None},
    ("launch", "slurm"): {"--nodes": "1", "--gpus-per-node": "1", "--dry-run": None},
    ("launch", "k8s"): {"--kind": "tfjob", "--name": "x", "--image": "img", "--workers": "1",
                        "--gpus-per-worker": "0", "--dry-run": None},
}
POSITIONAL = {("report",): ["REPORT_DIR"]}
TAIL = {("launch", "horovod"): ["--", "x"], ("launch", "mpirun"): ["--", "x"],
        ("launch", "multiworker"): ["--", "x"], ("launch", "slurm"): ["--", "x"],
        ("launch", "k8s"): ["--", "x"]}
EXCLUSIVE = {"--epochs": "--steps", "--steps": "--epochs", "--warmup-epochs": "--warmup-steps",
             "--warmup-steps": "--warmup-epochs", "--global-batch-size": "--per-replica-batch-size",
             "--per-replica-batch-size": "--global-batch-size"}
NEEDS = {"--cpu-replicas": {"--backend": "mirrored"}, "--task-index": {"--hosts": "a,b"},
         "--port": {}, "--cpu-replicas-list": {}}


def commands(parser: argparse.ArgumentParser, path=()):
    """(command path, its parser) for every leaf command, e.g. (("launch", "slurm"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, path + (name,))


def numeric_flags():
    for path, parser in commands(cli.build_parser()):
        for action in parser._actions:
            if action.option_strings and action.type in (int, float):
                yield path, action.option_strings[-1]


FLAGS = sorted(set(numeric_flags()))


def case_argv(path, flag, value, out="OUT", report_dir="REPORT_DIR"):
    base = dict(BASELINES[path])
    base.pop(EXCLUSIVE.get(flag, ""), None)
    base.update(NEEDS.get(flag, {}))
    base[flag] = value
    if flag == "--hosts":
        base.pop("--workers", None)
    argv = list(path)
    for k, v in base.items():
        argv += [k] if v is None else [k, out if v == "OUT" else v]
    argv += [report_dir if p == "REPORT_DIR" else p for p in POSITIONAL.get(path, [])]
    return argv + TAIL.get(path, []) if flag != "--task-index" else argv + ["--", "x"]


def test_every_command_and_its_numeric_flags_are_covered():
    assert {p for p, _ in commands(cli.build_parser())} == set(BASELINES)
    assert len(FLAGS) >= 100  # 108 (command, flag) pairs today; a parser change that hides them fails here
    assert ("train", "--epochs") in [(p[0], f) for p, f in FLAGS]


VALIDATORS = {
    ("train",): lambda a: __import__("distbatch.cli.train", fromlist=["x"]).validate_args(a),
    ("sweep",): lambda a: __import__("distbatch.cli.sweep", fromlist=["x"]).validate_sweep_args(a),
    ("recommend",): lambda a: __import__("distbatch.cli.recommend", fromlist=["x"]).validate_recommend_args(a),
    ("bench",): lambda a: __import__("distbatch.cli.bench", fromlist=["x"]).validate(a),
    ("probe-batch",): lambda a: __import__("distbatch.cli.probe", fromlist=["x"]).validate_probe_args(a),
    ("report",): lambda a: __import__("distbatch.cli.report", fromlist=["x"]).validate_report_args(a),
    ("plan",): lambda a: __import__("distbatch.cli.plan", fromlist=["x"]).validate_plan_args(a),
}


def validate_in_process(argv, path):
    """('error', one line) or ('accepted', None): the parser, then the command's pre-TF checks
    (launchers: their whole --dry-run handler, which runs nothing)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = cli.build_parser(path[0]).parse_args(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code)
        return "error", err.getvalue()
    try:
        if path[0] == "launch":
            with contextlib.redirect_stdout(io.StringIO()):
                code = args.func(args)
            assert code == 0, (argv, code)
        else:
            VALIDATORS[path](args)
    except UsageError as e:
        return "error", f"distbatch: error: {e}\n"
    return "accepted", None


def all_cases():
    for path, flag in FLAGS:
        for value in VALUES:
            yield path, flag, value


@pytest.fixture(scope="module")
def outcomes():
    return {(path, flag, value): validate_in_process(case_argv(path, flag, value), path)
            for path, flag, value in all_cases()}


@pytest.mark.parametrize("path, flag", FLAGS, ids=[" ".join(p) + " " + f for p, f in FLAGS])
def test_numeric_flag_is_one_line_error_or_accepted(outcomes, path, flag):
    for value in VALUES:
        kind, line = outcomes[(path, flag, value)]
        if kind == "error":
            assert line.count("\n") == 1 and line.startswith("distbatch: error: "), (flag, value, line)
            assert "Traceback" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "abc"])
def test_nan_inf_and_text_are_refused_by_every_flag(outcomes, value):
    """No flag has a meaning for nan, inf or text: all fail before TensorFlow starts.
    (1e30 is a legitimate float for some, e.g. a diverging --base-lr: the slow test runs it.)"""
    accepted = sorted(" ".join(p) + " " + f for (p, f, v), (kind, _) in outcomes.items()
                      if v == value and kind == "accepted")
    assert accepted == []


def test_the_issue_examples(outcomes):
    assert outcomes[(("train",), "--epochs", "inf")] == (
        "error", "distbatch: error: --epochs must be at most 1e+06, got inf\n")
    assert outcomes[(("train",), "--seed", "-1")] == (
        "error", "distbatch: error: --seed must be an integer in [0, 2**32), got -1\n")
    seed20 = validate_in_process(case_argv(("train",), "--seed", "1" * 20), ("train",))
    assert seed20 == ("error", f"distbatch: error: --seed must be an integer in [0, 2**32), got {'1' * 20}\n")


# --------------------------------------------------------------------------- real runs (slow)


def _report_dir(tmp_path):
    from distbatch.measure import results
    d = tmp_path / "report-dir"
    d.mkdir()
    for b, acc in ((16, 0.8), (32, 0.7)):
        row = dict.fromkeys(results.ROW_FIELDS)
        row.update(point_id=results.make_point_id(b, 0), status="ok", global_batch_size=b,
                   per_replica_batch_size=b, replicas=1, backend="single", seed=0, steps=10, epochs=1.0,
                   val_accuracy=acc, train_accuracy=acc, diverged=False, samples_per_sec=1000.0 * b,
                   history=[{"step": 10, "epoch": 1.0, "val_accuracy": acc}])
        results.append_row(str(d), row)
    return d


@pytest.mark.slow
def test_accepted_values_run_normally(outcomes, tmp_path, dataset_cache):
    report_dir = _report_dir(tmp_path)
    cases = []
    for (path, flag, value), (kind, _) in sorted(outcomes.items()):
        if kind == "accepted" and path[0] != "launch":
            case_id = f"{' '.join(path)} {flag} {value}"
            out = tmp_path / "outs" / case_id.replace(" ", "_")
            cases.append({"id": case_id, "argv": case_argv(path, flag, value, out=str(out),
                                                           report_dir=str(report_dir))})
    assert 10 <= len(cases) <= 80, len(cases)  # the table stays fast: most values fail validation
    raw = run_cli_cases(cases, tmp_path, timeout=1800,
                        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"})
    bad = {}
    for case_id, r in raw.items():
        err = r["stderr"]
        if "Traceback" in err or r["code"] not in (0, 1, 2, 3):
            bad[case_id] = (r["code"], err[-600:])
        elif r["code"] in (1, 2):  # a late one-line error (e.g. warmup longer than training)
            last = [ln for ln in err.splitlines() if ln.startswith("distbatch: error:")]
            if len(last) != 1:
                bad[case_id] = (r["code"], err[-600:])
    assert not bad, json.dumps(bad, indent=1)
    for case_id, r in sorted(raw.items()):
        print(case_id, r["code"], (r["stderr"].strip().splitlines() or [""])[-1][:160])
