"""The ported examples (docs/porting.md) run as a user runs them, `python examples/X.py`,
with their small defaults and offline data (scikit-learn's digits), and give results,
not just exit codes. examples/user_script.py is tested in test_user_script.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VENV_BIN, cli_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(argv: list[str], cwd: Path, launcher: list[str] = (), timeout: float = 300) -> str:
    """Run `python examples/X.py ...` (under `launcher` if given) in cwd; its stdout + stderr."""
    env = cli_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    proc = subprocess.Popen([*launcher, sys.executable, *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher AND its workers: none left waiting in a collective
        proc.communicate()
        raise
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr  # distbatch's progress lines go to stderr


def _digits_val_accuracy(path: Path) -> float:
    import keras
    import numpy as np

    from distbatch.data.datasets import load_dataset
    data = load_dataset("digits")
    model = keras.models.load_model(path, compile=False)
    return float(np.mean(np.argmax(model.predict(data.x_val, verbose=0), -1) == data.y_val))


@pytest.mark.slow
def test_horovod_keras_mnist(tmp_path):
    """Horovod's Keras MNIST example, ported: 3 epochs; ModelCheckpoint wrote one
    compiled checkpoint per epoch; the last one classifies the digits."""
    out = run_example([str(EXAMPLES / "horovod_keras_mnist.py")], cwd=tmp_path)
    assert "step 33/33" in out  # 1437 // 128 = 11 steps per epoch
    ckpts = sorted(p.name for p in (tmp_path / "horovod_keras_mnist_out").iterdir())
    assert ckpts == ["checkpoint-1.keras", "checkpoint-2.keras", "checkpoint-3.keras"]
    assert _digits_val_accuracy(tmp_path / "horovod_keras_mnist_out" / "checkpoint-3.keras") > 0.5


def _tf_tutorial_results(out: str) -> tuple[float, float]:
    m = re.search(r"Eval loss: ([0-9.e-]+), Eval Accuracy: ([0-9.e-]+)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2))


@pytest.mark.slow
def test_tf_distribute_keras(tmp_path):
    """TensorFlow's MirroredStrategy tutorial, ported: the step-based decay gives the
    tutorial's per-epoch rates; TensorBoard and weight checkpoints are written."""
    out = run_example([str(EXAMPLES / "tf_distribute_keras.py")], cwd=tmp_path)
    assert "Number of devices: 1" in out
    rates = re.findall(r"Learning rate for epoch (\d) is (\S+)", out)
    assert rates == [("1", "1e-03"), ("2", "1e-03"), ("3", "1e-03"), ("4", "1e-04")]
    _, accuracy = _tf_tutorial_results(out)
    assert accuracy > 0.7
    base = tmp_path / "tf_distribute_keras_out"
    assert sorted(p.name for p in (base / "training_checkpoints").iterdir()) == [
        f"ckpt_{i}.weights.h5" for i in range(1, 5)]
    assert list((base / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((base / "logs" / "validation").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("args,launcher", [
    pytest.param(["--backend", "mirrored", "--cpu-replicas", "2"], [], id="mirrored"),
    pytest.param([], [str(VENV_BIN / "distbatch"), "launch", "multiworker", "--workers", "2", "--"],
                 id="multiworker"),
])
def test_tf_distribute_keras_two_replicas_equal_one_device(tmp_path, args, launcher):
    """Two replicas (one process, or two processes) at the same global batch give the
    one-device result: no dropout in this model, and distbatch's global batches do not
    depend on the layout. Multiworker with callbacks used to hang when the two workers timed
    different steps per call ("auto") and so called the per-call stop-flag collective a
    different number of times (2 of 2 runs under load before the fix, 8 of 8 passed after)."""
    one = _tf_tutorial_results(run_example([str(EXAMPLES / "tf_distribute_keras.py")], cwd=tmp_path))
    (tmp_path / "two").mkdir()
    out = run_example([str(EXAMPLES / "tf_distribute_keras.py"), *args], cwd=tmp_path / "two",
                      launcher=launcher, timeout=120)
    assert "Number of devices: 2" in out
    assert _tf_tutorial_results(out) == pytest.approx(one, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    pytest.param([str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"], id="horovodrun-gloo"),
    pytest.param([str(VENV_BIN / "distbatch"), "launch", "multiworker", "--workers", "2", "--"], id="multiworker"),
])
def test_horovod_keras_mnist_on_two_processes(tmp_path, launcher):
    """The port unchanged under plain `horovodrun --gloo -np 2` and under TF_CONFIG
    (`distbatch launch multiworker`): only the chief prints and checkpoints."""
    out = run_example([str(EXAMPLES / "horovod_keras_mnist.py")], cwd=tmp_path, launcher=launcher)
    assert out.count("step 33/33") == 1
    ckpts = sorted(p.name for p in (tmp_path / "horovod_keras_mnist_out").iterdir())
    assert ckpts == ["checkpoint-1.keras", "checkpoint-2.keras", "checkpoint-3.keras"]
    assert _digits_val_accuracy(tmp_path / "horovod_keras_mnist_out" / "checkpoint-3.keras") > 0.5
