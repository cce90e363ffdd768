"""Issue 13 acceptance: ONE user script (examples/user_script.py: a TFRecord pipeline
through distbatch.data.files, a regression model, an MAE metric, sample weights, a custom
Keras callback) runs unchanged on single, mirrored (2 logical CPUs), horovodrun --gloo 2
and multiworker 2. Every rank reports identical metrics; with a deterministic order
(--shuffle-buffer 0) the final weights equal the single-device run within 1e-5 and the
chief's callback saw the single run's logs.

Why the order is the same at every layout: the data are 4 files of 48 records, so two
workers shard BY FILE (worker w reads files w and w+2). Without a shuffle buffer each
worker interleaves its files one record at a time, so step t takes records
[8t, 8t+8) of EVERY file on every layout (global batch 32 = 4 files x 8; per worker
16 = 2 files x 8), whatever the seeded file permutation. The same set of examples
gives the same gradient sum (test_step_sets_are_equal_at_every_layout checks it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "user_script.py"
ARGS = ["--shuffle-buffer", "0", "--global-batch-size", "32", "--epochs", "3", "--seed", "1"]
TOL = 1e-5
KEYS = ("loss", "mae", "val_loss", "val_mae")
SUMMARY = ("steps", "train_loss", "train_mae", "val_loss", "val_mae")  # result.metrics, no timings


def _load_script():
    spec = importlib.util.spec_from_file_location("user_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, script):
    path = tmp_path_factory.mktemp("user-data")
    script.write_demo_data(str(path))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, script, data_dir):
    """The reference: the script's main() in this process, on one device."""
    out = tmp_path_factory.mktemp("single")
    script.main(["--data-dir", str(data_dir), "--out", str(out), "--backend", "single", *ARGS])
    return out


def _ranks(out: Path, n: int) -> list[tuple[dict, list[np.ndarray]]]:
    found = sorted(p.name for p in out.glob("rank*.json"))
    assert found == [f"rank{i}.json" for i in range(n)], found
    result = []
    for i in range(n):
        report = json.loads((out / f"rank{i}.json").read_text())
        with np.load(out / f"rank{i}.npz") as z:
            result.append((report, [z[k] for k in z.files]))
    return result


def _val_arrays(script, data_dir):
    import tensorflow as tf
    ds = tf.data.TFRecordDataset(sorted(str(p) for p in data_dir.glob("val-*.tfrecord")))
    xs, ys, ws = zip(*[(x.numpy(), y.numpy(), w.numpy()) for x, y, w in ds.map(script.parse_fn)])
    return np.stack(xs), np.stack(ys), np.array(ws)


def test_single_run_reports_what_keras_computes(single, script, data_dir):
    """Fast: the script on one device; its validation metrics are Keras's own evaluation
    (sample weights included) of the final weights, and the callback got the history."""
    import keras
    [(report, weights)] = _ranks(single, 1)
    h = report["history"]
    assert report["backend"] == "single" and h["step"] == [6, 12, 18]  # 192 examples / 32
    assert h["loss"][-1] < h["loss"][0]
    assert [log["epoch"] for log in report["callback_logs"]] == [0, 1, 2]
    for k in KEYS:
        assert [log[k] for log in report["callback_logs"]] == h[k], k

    model = script.build_model()
    model.set_weights(weights)
    # distbatch weights metrics by the sample weights too: Keras's `weighted_metrics`
    # semantics (Keras's own `metrics=` ignore sample weights).
    model.compile(loss="mse", weighted_metrics=["mae"])
    x, y, w = _val_arrays(script, data_dir)
    assert sorted(set(w.tolist())) == [0.5, 1.0, 2.0]
    loss, mae = model.evaluate(x, y, sample_weight=w, batch_size=len(x), verbose=0)
    assert mae == pytest.approx(float(np.sum(w * np.abs(model.predict(x, verbose=0) - y)[:, 0]) / np.sum(w)),
                                rel=1e-5)
    assert h["val_loss"][-1] == pytest.approx(loss, rel=1e-5)
    assert h["val_mae"][-1] == pytest.approx(mae, rel=1e-5)


@pytest.mark.parametrize("W,L", [(2, 1), (1, 2)])
def test_step_sets_are_equal_at_every_layout(script, data_dir, W, L):
    """Fast: with shuffle_buffer=0 every layout's step t holds the same ids as one device's
    (what makes the weight comparison below meaningful)."""
    import tensorflow as tf

    from distbatch.data import files
    from distbatch.training.plan import BatchPlan

    def ids(serialized):
        i = tf.io.parse_single_example(serialized, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"]
        return tf.zeros([1]), i

    source = files(str(data_dir / "train-*.tfrecord"), ids, shuffle_buffer=0)

    def steps(W, L):
        plan = BatchPlan.derive(global_batch_size=32, replicas=W * L,
                                num_train_examples=source.num_examples(W))
        per_worker = [[y.numpy().tolist() for _, y, _ in source.train_dataset(
            plan, seed=1, worker_index=w, num_workers=W, local_replicas=L, start_step=0,
            total_steps=2 * plan.steps_per_epoch)] for w in range(W)]
        return [sorted(i for batches in per_worker for b in batches[t * L:(t + 1) * L] for i in b)
                for t in range(2 * plan.steps_per_epoch)]

    one = steps(1, 1)
    assert len(one) == 12 and sorted(i for s in one[:6] for i in s) == list(range(192))
    assert steps(W, L) == one


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = cli_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _check(out: Path, single: Path, *, backend: str, workers: int) -> None:
    ranks = _ranks(out, workers)
    [(ref, ref_weights)] = _ranks(single, 1)
    chief = ranks[0][0]
    for report, weights in ranks:
        assert (report["backend"], report["num_replicas"], report["num_workers"]) == (backend, 2, workers)
        assert report["history"] == chief["history"]        # identical on every rank
        assert {k: report["metrics"][k] for k in SUMMARY} == {k: chief["metrics"][k] for k in SUMMARY}
        for a, b in zip(weights, ranks[0][1]):
            np.testing.assert_array_equal(a, b)
    assert chief["history"]["step"] == ref["history"]["step"]
    for k in KEYS:
        np.testing.assert_allclose(chief["history"][k], ref["history"][k], rtol=TOL, atol=TOL, err_msg=k)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ranks[0][1], ref_weights))
    assert diff < TOL, diff
    # The callback runs on the chief, with the global metrics.
    assert [log["epoch"] for log in chief["callback_logs"]] == [0, 1, 2]
    for k in KEYS:
        np.testing.assert_allclose([log[k] for log in chief["callback_logs"]],
                                   [log[k] for log in ref["callback_logs"]], rtol=TOL, atol=TOL)
    assert all(report["callback_logs"] == [] for report, _ in ranks[1:])


def _script_args(data_dir, out):
    return [str(SCRIPT), "--data-dir", str(data_dir), "--out", str(out), *ARGS]


@pytest.mark.slow
def test_mirrored_two_replicas(tmp_path, data_dir, single):
    _run([sys.executable, *_script_args(data_dir, tmp_path / "out"),
          "--backend", "mirrored", "--cpu-replicas", "2"])
    _check(tmp_path / "out", single, backend="mirrored", workers=1)


@pytest.mark.slow
def test_horovodrun_gloo_two_processes(tmp_path, data_dir, single):
    """Plain horovodrun, as a Horovod user runs a script; backend auto picks horovod."""
    _run([str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
          sys.executable, *_script_args(data_dir, tmp_path / "out")])
    _check(tmp_path / "out", single, backend="horovod", workers=2)


@pytest.mark.slow
def test_multiworker_two_processes(tmp_path, data_dir, single):
    """TF_CONFIG on two free localhost ports (distbatch launch multiworker); backend auto
    picks multiworker."""
    _run([str(VENV_BIN / "distbatch"), "launch", "multiworker", "--workers", "2", "--",
          sys.executable, *_script_args(data_dir, tmp_path / "out")])
    _check(tmp_path / "out", single, backend="multiworker", workers=2)


def test_default_seed_and_shuffle_buffer(tmp_path, script, data_dir):
    """Fast: the script's defaults (seed 0, a 1000-record shuffle buffer). With a global
    seed of 0, tf.data's shuffle with a tensor seed used to fail in TensorFlow's get_seed
    (distbatch.data.inputs.block_shuffle replaced it)."""
    report = script.main(["--data-dir", str(data_dir), "--out", str(tmp_path), "--backend", "single"])
    assert report["history"]["step"] == [6, 12, 18]
    assert all(np.isfinite(report["history"]["loss"]))
