"""Shared test setup: quiet TensorFlow, an isolated dataset cache, and helpers
to run the real `distbatch` CLI (and launchers) in subprocesses.

Distributed tests run in subprocesses because TensorFlow's device layout
(logical CPU devices, collective groups, Horovod) is fixed once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
VENV_BIN = Path(sys.executable).parent
DISTBATCH = str(VENV_BIN / "distbatch")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long test (CI runs them; "
                                       "skip locally with -m 'not slow')")


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("dataset-cache")
    os.environ["DISTBATCH_CACHE_DIR"] = str(path)
    return path


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("TF_CONFIG", None)
    env.update(extra or {})
    return env


def run_cli(args: list[str], *, timeout: float = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `distbatch ARGS...`; on unexpected failure show its output."""
    proc = subprocess.run([DISTBATCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"distbatch {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def load_weights(out_dir) -> list[np.ndarray]:
    import keras
    return keras.models.load_model(os.path.join(out_dir, "model.keras"), compile=False).get_weights()


def load_summary(out_dir) -> dict:
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def max_weight_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
