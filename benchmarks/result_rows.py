"""The resumable result file the seed-by-row benchmark runners share (adaptive_scaling.py,
adascale_table.py, batch_ramp.py): one JSON row per finished `distbatch train` run, keyed by
run_id, so a runner started again skips what is already measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def done_run_ids(path: str) -> set[str]:
    """The run_ids already in the rows file at `path` (none if it does not exist yet)."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["run_id"] for line in f if line.strip()}


def run_training(argv: list[str], out: str, *, runner: str, run_id: str) -> tuple[dict, float]:
    """Run one `distbatch train` command writing to `out`; (its summary.json, wall seconds).
    Exit code 3 (diverged) is a result; any other failure ends the runner with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        sys.exit(f"{runner}: {run_id} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), wall


def append_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
