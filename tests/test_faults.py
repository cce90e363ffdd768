"""Faults through the real CLI: divergence, SIGKILL and --resume, a dead worker,
a killed sweep. docs/reliability.md lists what the user sees in each case.

Kills are real SIGKILLs of real processes, timed by polling the files the
run writes (the `checkpoint` index TF updates after a checkpoint is complete,
results.jsonl), so the tests do not depend on machine speed.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import DISTBATCH, cli_env, load_summary, load_weights, max_weight_diff, run_cli, free_ports

TINY = ["--dataset", "mnist1d", "--train-size", "256", "--val-size", "64", "--global-batch-size", "32"]
TRAINING_LINE = re.compile(r"epoch +[0-9.]+ step [0-9]+/")


def _no_traceback(proc) -> None:
    both = (proc.stdout or "") + (proc.stderr or "")
    assert "Traceback" not in both, both[-3000:]


# -- divergence ------------------------------------------------------------------------------

DIVERGE = ["train", "--backend", "single", *TINY, "--base-lr", "1e6", "--warmup", "none",
           "--decay", "constant"]  # constant lr: a shorter run is an exact prefix of a longer one


@pytest.mark.slow
def test_divergence_stops_cleanly_with_exit_3(tmp_path, dataset_cache):
    out = tmp_path / "div"
    proc = run_cli([*DIVERGE, "--steps", "10", "--out", str(out)], check=False, timeout=300)
    _no_traceback(proc)
    assert proc.returncode == 3, proc.stderr[-2000:]
    s = load_summary(out)
    step = s["diverged_step"]
    assert s["diverged"] is True and isinstance(step, int) and 2 <= step <= 10
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"distbatch: training diverged (loss not finite) at step {step}; lower --base-lr")
    assert all(math.isfinite(r["train_loss"]) for r in s["history"])
    # The detector names the FIRST non-finite step: the same run cut one step earlier is finite.
    before = tmp_path / "before"
    ok = run_cli([*DIVERGE, "--steps", str(step - 1), "--out", str(before)], check=False, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert load_summary(before)["diverged"] is False


# -- SIGKILL after a checkpoint, then --resume ----------------------------------------------

def _checkpoint_done(ckpt_dir: Path, step: int) -> bool:
    """TF rewrites `checkpoint` only after ckpt-<step> is completely written."""
    try:
        return f'ckpt-{step}"' in (ckpt_dir / "checkpoint").read_text()
    except OSError:
        return False


def _kill_after_checkpoint(argv: list[str], ckpt_dir: Path, step: int, timeout: float = 300):
    p = subprocess.Popen([DISTBATCH, *argv], env=cli_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while p.poll() is None and not _checkpoint_done(ckpt_dir, step) and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, f"run ended ({p.returncode}) before it could be killed\n{err[-2000:]}"
    return err


RESUME = [*TINY, "--steps", "48", "--seed", "3", "--checkpoint-every", "4"]  # evals every 8 steps


def _resume_case(tmp_path_factory, backend: list[str]):
    root = tmp_path_factory.mktemp("resume")
    full, cut = root / "full", root / "cut"
    argv = ["train", *backend, *RESUME]
    run_cli([*argv, "--out", str(full)], timeout=300)
    # Killed right after step 12's checkpoint: between evaluations (8, 16), so the
    # resumed run must also restore the partial training-loss window.
    _kill_after_checkpoint([*argv, "--out", str(cut)], cut / "checkpoints", 12)
    assert not (cut / "summary.json").exists()
    resumed = run_cli([*argv, "--out", str(cut), "--resume"], timeout=300)
    return full, cut, resumed


@pytest.fixture(scope="module")
def resumed_single(tmp_path_factory, dataset_cache):
    return _resume_case(tmp_path_factory, ["--backend", "single"])


def _check_resume(full: Path, cut: Path, resumed) -> None:
    _no_traceback(resumed)
    assert re.search(r"resumed from \S+ckpt-12 at step 12", resumed.stderr), resumed.stderr[-2000:]
    diff = max_weight_diff(load_weights(full), load_weights(cut))
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run by {diff}"
    a, b = load_summary(full), load_summary(cut)
    assert b["steps"] == a["steps"] == 48
    assert [r["step"] for r in b["history"]] == [8, 16, 24, 32, 40, 48]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (rb["step"], k)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_weights(resumed_single):
    _check_resume(*resumed_single)


@pytest.mark.slow
def test_resume_restores_optimizer_state_and_step(resumed_single):
    import tensorflow as tf
    _, cut, _ = resumed_single
    ckpt = tf.train.latest_checkpoint(str(cut / "checkpoints"))
    assert ckpt.endswith("ckpt-48")
    shapes = dict(tf.train.list_variables(ckpt))
    reader = tf.train.load_checkpoint(ckpt)
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 48
    # The iteration count the lr schedule reads, and (momentum SGD) one velocity per
    # trainable variable. Equal final weights above need both restored at step 12.
    assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 48
    slots = sorted(n for n in shapes if n.startswith("optimizer/_variables/"))
    weights = sorted(n for n in shapes if n.startswith("optimizer/_trainable_variables/"))
    assert sorted(shapes[n] for n in slots) == sorted(shapes[n] for n in weights) and len(slots) == 6
    assert all(float(abs(reader.get_tensor(n)).max()) > 0 for n in slots)


@pytest.mark.slow
def test_resume_after_sigkill_mirrored(tmp_path_factory, dataset_cache):
    _check_resume(*_resume_case(tmp_path_factory, ["--backend", "mirrored", "--cpu-replicas", "2"]))


# -- a worker killed mid-training ----------------------------------------------------------

LONG = ["train", *TINY, "--steps", "100000"]


class _Job:
    """A job whose output is collected in a thread, so the test can watch it."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, env=cli_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_training(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(TRAINING_LINE.search(ln) for ln in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.monotonic() < deadline, "training did not start\n" + "".join(self.lines)[-3000:]
            time.sleep(0.1)

    def output(self) -> str:
        self.reader.join(timeout=5)
        return "".join(self.lines)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    pairs = [tuple(map(int, r.split())) for r in rows if r.strip()]
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in pairs:
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank1_worker(pids: list[int]) -> int:
    """The `distbatch train` process of rank / task index 1, found by its environment."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(c.endswith(b"distbatch") for c in cmd) or b"train" not in cmd:
            continue
        if b"HOROVOD_RANK=1" in env or any(e.startswith(b"TF_CONFIG=") and b'"index": 1}' in e for e in env):
            return pid
    raise AssertionError(f"no rank-1 worker among {pids}")


def _kill_rank1_and_wait(job: _Job, limit: float = 60) -> tuple[int, float, list[int]]:
    job.wait_for_training()
    tree = _descendants(job.proc.pid)
    os.kill(_rank1_worker(tree), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = job.proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        job.kill_group()
        raise AssertionError(f"the job was still running {limit} s after a worker died\n"
                             + job.output()[-3000:])
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    return code, elapsed, [p for p in tree if _alive(p)]


@pytest.mark.slow
def test_killed_multiworker_worker_ends_the_launched_job(tmp_path, dataset_cache):
    job = _Job([DISTBATCH, "launch", "multiworker", "--workers", "2", "--",
                DISTBATCH, *LONG, "--backend", "multiworker", "--out", str(tmp_path / "mw")])
    code, elapsed, left = _kill_rank1_and_wait(job)
    out = job.output()
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert "distbatch launch: rank 1 failed with signal 9 (SIGKILL); stopping the other 1 worker(s)" in out
    assert elapsed < 60 and not left, (elapsed, left)


@pytest.mark.slow
def test_killed_horovod_rank_ends_the_launched_job(tmp_path, dataset_cache):
    job = _Job([DISTBATCH, "launch", "horovod", "--gloo", "-np", "2", "--",
                DISTBATCH, *LONG, "--backend", "horovod", "--out", str(tmp_path / "hvd")])
    code, elapsed, left = _kill_rank1_and_wait(job)
    out = job.output()
    assert code != 0, out[-3000:]
    assert "distbatch launch: horovodrun failed with exit code" in out, out[-3000:]
    assert elapsed < 60 and not left, (elapsed, left)


@pytest.mark.slow
def test_surviving_multiworker_worker_exits_on_its_own(tmp_path, dataset_cache):
    """Without a launcher: TF's coordination service notices the missing heartbeats,
    aborts the collective, and distbatch prints one line instead of a traceback."""
    workers = [f"localhost:{p}" for p in free_ports(2)]
    argv = [DISTBATCH, *LONG, "--backend", "multiworker", "--out", str(tmp_path / "mw")]
    jobs = [_Job(argv, {"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                  "task": {"type": "worker", "index": i}})})
            for i in range(2)]
    try:
        jobs[0].wait_for_training()
        jobs[1].proc.kill()
        code = jobs[0].proc.wait(timeout=60)
    finally:
        for j in jobs:
            j.kill_group()
    out = jobs[0].output()
    assert code == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert re.search(r"^distbatch: error: a collective operation failed, most likely because another "
                     r"worker died or was stopped \(\w+Error: .*\); rerun with --resume", out, re.M), out[-3000:]


# -- a sweep killed mid-point ---------------------------------------------------------------

SWEEP = ["sweep", "--backend", "single", "--dataset", "mnist1d", "--train-size", "256", "--val-size", "64",
         "--model", "mlp", "--batch-sizes", "32,64", "--steps", "48", "--checkpoint-every", "4",
         "--no-noise-scale"]


def _rows(out: Path) -> list[dict]:
    text = (out / "results.jsonl").read_text()
    assert text == "" or text.endswith("\n"), "results.jsonl ends in a partial row"
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_killed_sweep_resumes_only_unfinished_points(tmp_path, dataset_cache):
    out = tmp_path / "sweep"
    p = subprocess.Popen([DISTBATCH, *SWEEP, "--out", str(out)], env=cli_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = out / "points" / "bs64_seed0" / "checkpoints"
    deadline = time.monotonic() + 300
    while p.poll() is None and not _checkpoint_done(ckpts, 16) and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, err[-2000:]

    first = _rows(out)
    assert [r["point_id"] for r in first] == ["bs=32/seed=0"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 2  # header + the finished point, nothing partial
    done_before = (out / "results.jsonl").read_text()

    proc = run_cli([*SWEEP, "--out", str(out), "--resume"], timeout=600)
    assert "2 points (1 already done)" in proc.stderr, proc.stderr[-2000:]
    rows = _rows(out)
    assert [r["point_id"] for r in rows] == ["bs=32/seed=0", "bs=64/seed=0"]
    assert (out / "results.jsonl").read_text().startswith(done_before)  # point 1 not rerun
    assert rows[1]["status"] == "ok" and rows[1]["steps"] == 48 and rows[1]["global_batch_size"] == 64
    assert len((out / "results.csv").read_text().splitlines()) == 3
    # The interrupted point continued from its checkpoint: its history is complete.
    point = out / "points" / "bs64_seed0"
    steps = [r["step"] for r in load_summary(point)["history"]]
    assert steps == list(range(steps[0], 49, steps[0])), steps  # every evaluation, once
    assert json.loads((point / "config.json").read_text())["resume"] is True


@pytest.mark.slow
def test_resume_with_other_flags_is_refused(tmp_path, dataset_cache):
    """--resume must continue the SAME run: a changed batch or length is refused, nothing rewritten."""
    out = tmp_path / "run"
    base = ["train", "--train-size", "256", "--val-size", "64", "--steps", "4", "--out", str(out)]
    run_cli([*base, "--global-batch-size", "64"])
    before = (out / "config.json").read_bytes()
    proc = run_cli([*base, "--global-batch-size", "32", "--resume"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"distbatch: error: --resume: --global-batch-size is 32 but the run in "
                                   f"{str(out)!r} used 64; resume with the same settings or use another --out")
    assert (out / "config.json").read_bytes() == before
    run_cli([*base, "--global-batch-size", "64", "--resume"])  # the same flags resume fine
