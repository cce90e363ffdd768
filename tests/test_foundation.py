"""The install: imports, Horovod's build, real 2-process collectives over Gloo
and MPI with checked values, idempotent setup, and quiet CLI start-up."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VENV_BIN, cli_env, run_cli

ROOT = Path(__file__).resolve().parents[1]
ALLREDUCE = """
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
r = hvd.rank()
s = hvd.allreduce(tf.constant([r + 1.0, 10.0 * (r + 1)]), op=hvd.Sum).numpy()
a = hvd.grouped_allreduce([tf.constant(float(r)), tf.constant([2.0 * r])], op=hvd.Average)
print(f"RESULT rank={r} size={hvd.size()} mpi={int(hvd.mpi_enabled())} sum={s.tolist()} "
      f"avg={[float(a[0]), a[1].numpy().tolist()]}", flush=True)
"""


def test_imports():
    proc = subprocess.run([sys.executable, "-c",
                           "import distbatch, horovod.tensorflow, mpi4py, tensorboard; print('ok')"],
                          capture_output=True, text=True, env=cli_env())
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_horovod_check_build_lists_tensorflow_gloo_mpi():
    out = subprocess.run([str(VENV_BIN / "horovodrun"), "--check-build"], capture_output=True,
                         text=True, env=cli_env()).stdout
    for line in ("[X] TensorFlow", "[X] MPI", "[X] Gloo"):
        assert line in out, out


def _check_results(stdout: str, mpi: bool):
    # Two ranks share the launcher's stdout: their lines can arrive run together on one line.
    lines = sorted(re.findall(r"RESULT rank=\d+ size=\d+ mpi=\d sum=\[[^\]]*\] avg=\[[^\]]*\]\]", stdout))
    assert len(lines) == 2, stdout
    for r, line in enumerate(lines):
        assert line == (f"RESULT rank={r} size=2 mpi={int(mpi)} sum=[3.0, 30.0] "
                        f"avg=[0.5, [1.0]]")


@pytest.mark.slow
def test_horovodrun_gloo_allreduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    proc = subprocess.run([str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
                           sys.executable, str(script)], capture_output=True, text=True,
                          env=cli_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_results(proc.stdout, mpi=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_mpirun_allreduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = subprocess.run([*cmd, sys.executable, str(script)], capture_output=True, text=True,
                          env=cli_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_results(proc.stdout, mpi=True)


@pytest.mark.slow
def test_mpi4py_allreduce(tmp_path):
    script = tmp_path / "m.py"
    # Each rank writes its own file: mpirun forwards the ranks' stdout unsynchronised, and two
    # prints can interleave mid-line ("SUMSUM 3" was seen in CI).
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "open(f'{sys.argv[1]}/sum{c.Get_rank()}', 'w').write("
                      "str(c.allreduce(c.Get_rank() + 1)))\n")
    cmd = ["mpirun", "-np", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    proc = subprocess.run([*cmd, sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"sum{r}").read_text() for r in (0, 1)] == ["3", "3"]


@pytest.mark.slow
def test_second_setup_is_skipped():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh"), "setup"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_cli_startup_is_quiet(tmp_path, dataset_cache):
    proc = run_cli(["train", "--backend", "single", "--train-size", "256", "--val-size", "64",
                    "--global-batch-size", "64", "--steps", "2", "--out", str(tmp_path / "q")])
    noise = [l for l in proc.stderr.splitlines()
             if "oneDNN" in l or "absl" in l or "cuda" in l.lower() or "cpu_feature_guard" in l]
    assert noise == [], noise
