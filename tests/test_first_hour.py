"""A new user's first hour: fast --help, a pasteable `recommend` command, launchers that
find `distbatch` without the venv on PATH, sweeps short enough to try."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[1])

HELP_PROBE = """
import sys
from distbatch.cli import main
for argv in sys.argv[1:]:
    try:
        main(argv.split())
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("tensorflow", "keras", "horovod", "numpy", "matplotlib") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_help_imports_no_tensorflow():
    """`distbatch --help` took 4.3 s because building the parsers imported TensorFlow."""
    commands = ["--help", "train --help", "sweep --help", "bench --help", "report --help",
                "recommend --help", "probe-batch --help", "launch --help", "launch slurm --help"]
    p = subprocess.run([PY, "-c", HELP_PROBE, *commands], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "HEAVY []"
