"""Shared test setup: quiet TensorFlow, an isolated dataset cache, and helpers
to run the real `distbatch` CLI (and launchers) in subprocesses.

Distributed tests run in subprocesses because TensorFlow's device layout
(logical CPU devices, collective groups, Horovod) is fixed once per process.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import traceback
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


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (registered in sys.modules: dataclasses look their
    module up by name); for tests of the benchmarks' pure functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_weights(out_dir) -> list[np.ndarray]:
    import keras
    return keras.models.load_model(os.path.join(out_dir, "model.keras"), compile=False).get_weights()


def load_summary(out_dir) -> dict:
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def max_weight_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# Runs inside ONE subprocess: every case through distbatch.cli.main, as the console script
# would (sys.exit(main())), capturing fds 1 and 2 and applying the case's "env" per case.
CLI_DRIVER = r"""
import json, os, sys, tempfile, traceback
from distbatch import cli
cases = json.load(open(sys.argv[1]))
results = {}
for case in cases:
    saved_env = dict(os.environ)
    os.environ.update(case.get("env", {}))
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    try:
        try:
            code = cli.main(case["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        os.environ.clear(); os.environ.update(saved_env)
    text = []
    for f in files:
        f.seek(0)
        text.append(f.read().decode("utf-8", "replace"))
        f.close()
    results[case["id"]] = {"code": code, "stdout": text[0], "stderr": text[1]}
json.dump(results, open(sys.argv[2], "w"))
"""


def run_cli_cases(cases: list[dict], work, *, env: dict | None = None, timeout: float = 600) -> dict:
    """Run every case ({"id", "argv", optional "env"}) through the CLI in one process (TensorFlow
    starts once); {id: {"code", "stdout", "stderr"}}."""
    (work / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", CLI_DRIVER, str(work / "cases.json"),
                           str(work / "out.json")], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "out.json").read_text())


def cli_in_process(capfd, *argv) -> subprocess.CompletedProcess:
    """`distbatch ARGV` in this process, as the console script runs it: sys.exit(main())."""
    from distbatch.cli import main
    capfd.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # the console script would print the traceback and exit 1
        traceback.print_exc()
        code = 1
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_one_line_error(proc, line: str) -> None:
    """Exit 2, stderr is exactly `distbatch: error: LINE`, no traceback anywhere."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{both[-3000:]}"
    assert proc.stderr.splitlines() == [f"distbatch: error: {line}"], proc.stderr[-3000:]


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 right now (closed again: a test binds them next)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and directory under root: equal snapshots = nothing touched."""
    def what(p: Path) -> str:
        if p.is_symlink():
            return "-> " + os.readlink(p)
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return {str(p.relative_to(root)): what(p) for p in sorted(root.rglob("*"))}
