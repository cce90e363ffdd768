"""Issue 16: restarts, preemption, complete checkpoints (docs/reliability.md, "Recovery").

Fast: the pure parts (the restarted command as an exact argv, the restart
line, the newest checkpoint, the time cadence, agreement between workers with
a fake backend, the watchdog's hold while a preemption checkpoint is saved).
Slow: real processes; each compares final weights (1e-6) and the history with
an uninterrupted run of the same deterministic configuration.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DISTBATCH, cli_env, load_summary, load_weights, max_weight_diff, run_cli
from distbatch.backends.base import Backend
from distbatch.training import preemption
from distbatch.launch import restarts
from distbatch.launch import supervisor
from distbatch.training.checkpoints import candidates
from distbatch.errors import UsageError

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------- restart commands
@pytest.mark.parametrize("command, expected", [
    (["/v/bin/distbatch", "train", "--out", "r"], ["/v/bin/distbatch", "train", "--out", "r", "--resume"]),
    (["distbatch", "train", "--out", "r", "--resume"], ["distbatch", "train", "--out", "r", "--resume"]),
    (["distbatch", "train", "--overwrite", "--out", "r"], ["distbatch", "train", "--out", "r", "--resume"]),
    (["distbatch", "--verbose", "sweep", "--batch-sizes", "32,64"],
     ["distbatch", "--verbose", "sweep", "--batch-sizes", "32,64", "--resume"]),
    (["python", "-m", "distbatch", "train", "--out", "r"],
     ["python", "-m", "distbatch", "train", "--out", "r", "--resume"]),
])
def test_resume_command_is_the_same_command_with_resume(command, expected):
    assert restarts.resume_command(command) == expected


@pytest.mark.parametrize("command", [["python", "train.py"], ["distbatch", "report", "x"], ["distbatch"]])
def test_restarts_need_a_distbatch_train_or_sweep_command(command):
    with pytest.raises(UsageError) as e:
        restarts.check_resumable(command)
    assert str(e.value) == ("--max-restarts needs a `distbatch train ...` or `distbatch sweep ...` worker "
                            f"command (a restart adds --resume to it), got {' '.join(command)!r}")


@pytest.mark.parametrize("command, out", [
    (["distbatch", "train", "--out", "a", "--steps", "3"], "a"),
    (["distbatch", "train", "--out=b"], "b"),
    (["distbatch", "train", "--out", "a", "--out", "c"], "c"),
    (["distbatch", "sweep", "--batch-sizes", "32"], "runs/sweep"),
    (["distbatch", "train"], None),
])
def test_out_dir_of_the_worker_command(command, out):
    assert restarts.out_dir(command) == out


def test_newest_checkpoint_needs_its_state_file(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    assert restarts.newest_checkpoint(str(tmp_path)) is None
    for step in (8, 12, 16):
        (ck / f"ckpt-{step}.index").write_text("x")
    (ck / "state-8.json").write_text("{}")
    (ck / "state-12.json").write_text("{}")  # ckpt-16's state is missing: not usable
    assert restarts.newest_checkpoint(str(tmp_path)) == (12, str(ck))


def test_restart_lines():
    assert restarts.restart_line(1, 3, "rank 1", "failed with signal 9 (SIGKILL)", 2, (24, "o/checkpoints")) == (
        "distbatch launch: restart 1/3: rank 1 failed with signal 9 (SIGKILL); restarting all 2 workers "
        "with --resume from step 24 (o/checkpoints)")
    assert restarts.restart_line(2, 3, "rank 0", "failed with exit code 1", 4, None) == (
        "distbatch launch: restart 2/3: rank 0 failed with exit code 1; restarting all 4 workers "
        "with --resume from the start (no checkpoint yet)")


def test_run_with_restarts_adds_resume_and_stops_when_told(tmp_path):
    calls, err = [], io.StringIO()
    outcomes = [(137, [("rank 1", "failed with signal 9 (SIGKILL)")]), (0, [])]

    def once(cmd, failures):
        calls.append(list(cmd))
        code, fails = outcomes.pop(0)
        failures.extend(fails)
        return code

    cmd = ["distbatch", "train", "--out", str(tmp_path)]
    (tmp_path / "config.json").write_text("{}")  # the first attempt wrote something: --resume
    assert restarts.run_with_restarts(once, cmd, max_restarts=2, workers=2, stderr=err) == 0
    assert calls == [cmd, cmd + ["--resume"]]
    assert err.getvalue() == ("distbatch launch: restart 1/2: rank 1 failed with signal 9 (SIGKILL); restarting "
                              "all 2 workers with --resume from the start (no checkpoint yet)\n")
    # Used up: the last failure's status, one line saying so.
    outcomes[:] = [(1, [("rank 0", "failed with exit code 1")])] * 2
    err = io.StringIO()
    assert restarts.run_with_restarts(once, cmd, max_restarts=1, workers=2, stderr=err) == 1
    assert err.getvalue().splitlines()[-1] == "distbatch launch: giving up after 1 restart(s)"
    # The launcher itself was stopped (Ctrl-C, SIGTERM): no failure recorded, no restart.
    outcomes[:] = [(75, [])]
    calls.clear()
    assert restarts.run_with_restarts(once, cmd, max_restarts=3, workers=2, stderr=io.StringIO()) == 75
    assert len(calls) == 1


@pytest.mark.parametrize("line, found", [
    ("Process 1 exit with status code 137.", (1, 137)),
    ("Process 0 exit with status code -9.", (0, 137)),
    ("mpirun noticed that process rank 1 with PID 4242 on node box exited on signal 9 (Killed).", (1, 137)),
    ("[1,0]<stderr>:epoch 1.00 step 8/48", None),
])
def test_failed_rank_from_launcher_lines(line, found):
    assert supervisor.rank_exit_from_line(line) == found


def test_exit_75_is_described_as_a_preemption_checkpoint():
    assert supervisor.describe_exit(75) == "exit code 75 (saved a checkpoint after SIGTERM)"


# --------------------------------------------------------------------------- time cadence, agreement
@pytest.mark.parametrize("now, last, every, due", [
    (10.0, 0.0, 0.0, False),     # 0: off
    (299.9, 0.0, 300.0, False),
    (300.0, 0.0, 300.0, True),
    (1000.0, 900.0, 60.0, True),
])
def test_time_due(now, last, every, due):
    assert preemption.time_due(now, last, every) is due


@pytest.mark.parametrize("flag, env, seconds", [
    (None, {}, 0.0), (None, {"DISTBATCH_CHECKPOINT_EVERY_SECONDS": "300"}, 300.0),
    (60.0, {"DISTBATCH_CHECKPOINT_EVERY_SECONDS": "300"}, 60.0), (0.0, {"DISTBATCH_CHECKPOINT_EVERY_SECONDS": "300"}, 0.0),
    (None, {"DISTBATCH_CHECKPOINT_EVERY_SECONDS": "nan"}, 0.0), (None, {"DISTBATCH_CHECKPOINT_EVERY_SECONDS": "x"}, 0.0),
])
def test_checkpoint_seconds_flag_then_launcher_default(flag, env, seconds):
    assert preemption.checkpoint_seconds(flag, env) == seconds


class FakeBackend:
    """Worker `index` of `workers`; sync_flag ORs this worker's flag with the peers' next values."""

    def __init__(self, index: int, workers: int, peers=()):
        self.worker_index, self.num_workers, self.peers, self.calls = index, workers, list(peers), 0

    @property
    def is_chief(self):
        return self.worker_index == 0

    def sync_flag(self, flag):
        self.calls += 1
        return bool(flag) or bool(self.peers.pop(0) if self.peers else False)


def test_call_boundary_single_worker_needs_no_collective():
    clock = [0.0]
    b = FakeBackend(0, 1)
    cb = preemption.CallBoundary(b, 300.0, lambda: False, clock=lambda: clock[0])
    assert cb.decide() == (False, False)
    clock[0] = 300.0
    assert cb.decide() == (True, False)
    cb.saved()
    assert cb.decide() == (False, False) and b.calls == 0


def test_call_boundary_follows_the_chiefs_clock_and_any_workers_sigterm():
    clock = [1000.0]
    # A non-chief's own clock never triggers a save; the chief's decision (the OR) does.
    worker = preemption.CallBoundary(FakeBackend(1, 2, peers=[False]), 300.0, lambda: False,
                                     clock=lambda: clock[0])
    clock[0] += 10_000
    assert worker.decide() == (False, False)
    worker.backend.peers = [True, False]  # the chief says "save by time", nobody was preempted
    assert worker.decide() == (True, False)
    # SIGTERM on a peer: save and stop here too (two all-reduces: save?, stop?).
    chief = preemption.CallBoundary(FakeBackend(0, 2, peers=[True, True]), 0.0, lambda: False)
    assert chief.decide() == (True, True) and chief.backend.calls == 2
    # Nothing asks: one all-reduce per call.
    quiet = preemption.CallBoundary(FakeBackend(0, 2, peers=[False]), 0.0, lambda: False)
    assert quiet.decide() == (False, False) and quiet.backend.calls == 1
    # No signal watched and no cadence: no collective at all.
    assert not preemption.CallBoundary(FakeBackend(0, 2), 0.0, None).sync


def test_call_boundary_decides_every_nth_call_on_every_worker():
    """With every_calls = 3 the all-reduce runs at calls 3 and 6 only, on every worker (the
    same count everywhere), and a SIGTERM between decisions waits for the next one."""
    sigterm = [False]
    chief = preemption.CallBoundary(FakeBackend(0, 2), 0.0, lambda: sigterm[0])
    chief.every_calls = 3
    seen = []
    for call in range(1, 7):
        sigterm[0] = call >= 4
        seen.append(chief.decide())
    assert seen == [(False, False)] * 2 + [(False, False)] + [(False, False)] * 2 + [(True, True)]
    assert chief.backend.calls == 3  # call 3: one (nothing asked); call 6: save? and stop?
    # A single worker needs no collective and decides at every call.
    alone = preemption.CallBoundary(FakeBackend(0, 1), 0.0, lambda: True)
    alone.every_calls = 3
    assert alone.decide() == (True, True) and alone.backend.calls == 0


@pytest.mark.parametrize("call_seconds, calls", [(0.2, 5), (0.37, 3), (1.0, 1), (5.0, 1), (1e-4, 1000),
                                                  (0.0, 1), (float("nan"), 1)])
def test_sync_every_calls_is_about_a_second(call_seconds, calls):
    assert preemption.sync_every_calls(call_seconds) == calls


class TwoWorkers(Backend):
    """Worker `index` of 2 (one replica each): all_reduce_sum adds what the other worker sends."""
    name, num_replicas, num_workers = "two", 2, 2

    def __init__(self, index, peer_sends):
        self.worker_index, self.peer_sends = index, peer_sends

    def distribute(self, make_dataset):
        raise NotImplementedError

    def run(self, fn, args=()):
        return fn(*args)

    def all_reduce_sum(self, values, name=None):
        import tensorflow as tf
        return [v + tf.constant(p, v.dtype) for v, p in zip(values, self.peer_sends)]


def test_chief_ints_gives_the_chiefs_values_in_one_collective():
    calls = []

    class Counting(TwoWorkers):
        def all_reduce_sum(self, values, name=None):
            calls.append(len(values))
            return super().all_reduce_sum(values, name)
    # the chief sends its values, the other worker zeros (Backend.broadcast_from_chief)
    assert preemption.chief_ints(Counting(0, [np.zeros(2)]), 37, 1000) == (37, 1000)
    assert preemption.chief_ints(Counting(1, [np.array([37.0, 1000.0])]), 999, 3) == (37, 1000)
    assert calls == [1, 1]  # one all-reduce of one tensor per worker
    assert preemption.chief_ints(FakeBackend(0, 1), 5, 2) == (5, 2)  # one worker: no collective


# --------------------------------------------------------------------------- the watchdog's hold
PREEMPTED = textwrap.dedent("""
    import os, sys, time
    from distbatch import interrupts
    interrupts.install(grace_seconds=1, hold_seconds=float(sys.argv[2]))
    assert interrupts.arm_preemption()
    print("READY", os.getpid(), flush=True)
    while not interrupts.preemption_requested():
        time.sleep(0.01)
    interrupts.hold_watchdog()
    time.sleep(float(sys.argv[1]))          # "saving": longer than the grace
    interrupts.release_watchdog()
    print("SAVED", flush=True)
    time.sleep(float(sys.argv[3]))          # exiting
    interrupts.exit_now_if_installed(75)
""")


def _preempt(save_s: float, hold_s: float, exit_s: float):
    p = subprocess.Popen([PY, "-c", PREEMPTED, str(save_s), str(hold_s), str(exit_s)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert p.stdout.readline().startswith("READY")
    time.sleep(0.3)  # the watchdog is up
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    try:
        code = p.wait(timeout=30)
    finally:
        p.kill()
    return code, time.monotonic() - t0, p.stdout.read(), p.stderr.read()


def test_watchdog_holds_while_a_preemption_checkpoint_is_saved():
    code, elapsed, out, err = _preempt(save_s=2.0, hold_s=5.0, exit_s=0.0)
    assert code == 75 and out == "SAVED\n" and err == "", (code, out, err)
    assert 2.0 <= elapsed < 4.5


def test_watchdog_grace_applies_again_after_the_save():
    code, elapsed, out, err = _preempt(save_s=0.1, hold_s=5.0, exit_s=10.0)
    assert code == -signal.SIGKILL and out == "SAVED\n" and 1.0 <= elapsed < 4, (code, elapsed)
    assert "SIGTERM received but TensorFlow did not return within 1 s" in err


def test_watchdog_hold_is_bounded():
    code, elapsed, out, err = _preempt(save_s=10.0, hold_s=2.0, exit_s=0.0)
    assert code == -signal.SIGKILL and out == "" and 2.0 <= elapsed < 5, (code, elapsed)
    assert "did not finish its preemption checkpoint within 2 s" in err


# --------------------------------------------------------------------------- CLI usage errors
@pytest.mark.parametrize("argv, message", [
    (["multiworker", "--workers", "2", "--max-restarts", "-1", "--", "distbatch", "train"],
     "--max-restarts must be an integer >= 0, got -1"),
    (["multiworker", "--workers", "2", "--max-restarts", "1", "--", "python", "x.py"],
     "--max-restarts needs a `distbatch train ...` or `distbatch sweep ...` worker command"),
    (["multiworker", "--hosts", "a,b", "--max-restarts", "1", "--", "distbatch", "train"],
     "--max-restarts 1 restarts the workers of a local job; with --hosts each host runs its own worker"),
    (["horovod", "-np", "2", "--max-restarts", "2", "--dry-run", "--", "python", "x.py"],
     "--max-restarts needs a `distbatch train ...`"),
])
def test_bad_max_restarts_is_one_line_exit_2(argv, message):
    p = subprocess.run([PY, "-m", "distbatch.cli.launch", "launch", *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"distbatch: error: {message}"), p.stderr


def test_dry_run_with_restarts_shows_the_checkpoint_cadence():
    env = {k: v for k, v in os.environ.items() if k != "DISTBATCH_CHECKPOINT_EVERY_SECONDS"}
    p = subprocess.run([PY, "-m", "distbatch.cli.launch", "launch", "horovod", "--gloo", "-np", "2",
                        "--max-restarts", "2", "--dry-run", "--", "distbatch", "train", "--out", "o"],
                       capture_output=True, text=True, env={**env, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    assert "#   DISTBATCH_CHECKPOINT_EVERY_SECONDS=300" in p.stdout.splitlines()


# =========================================================================== real processes (slow)
TINY = ["--dataset", "mnist1d", "--train-size", "256", "--val-size", "64", "--global-batch-size", "32",
        "--seed", "3"]
RUN = [*TINY, "--steps", "48", "--checkpoint-every", "4"]  # evaluations every 8 steps
EVAL_STEPS = [8, 16, 24, 32, 40, 48]


def _done(ckpt_dir: Path, step: int) -> bool:
    """TF rewrites `checkpoint` only once ckpt-<step> is complete."""
    try:
        return f'ckpt-{step}"' in (ckpt_dir / "checkpoint").read_text()
    except OSError:
        return False


def _worker_pid(root: int, rank: int) -> int:
    """The `distbatch train` process of `rank` below process `root`, found by its environment."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for r in rows:
        if r.strip():
            pid, ppid = map(int, r.split())
            children.setdefault(ppid, []).append(pid)
    todo, seen = [root], []
    while todo:
        for c in children.get(todo.pop(), []):
            seen.append(c)
            todo.append(c)
    for pid in seen:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" not in cmd or not any(c.endswith(b"distbatch") for c in cmd):
            continue
        if f"HOROVOD_RANK={rank}".encode() in env or any(
                e.startswith(b"TF_CONFIG=") and f'"index": {rank}}}'.encode() in e for e in env):
            return pid
    raise AssertionError(f"no rank-{rank} worker below {root}")


def _launch(argv: list[str], out: Path, *, signal_rank: int | None = None, sig=signal.SIGKILL,
            after_step: int = 12, timeout: float = 240):
    """Run `distbatch launch ...`; optionally send `sig` to one worker once checkpoint
    `after_step` is complete. Returns (exit status, output, seconds from the signal to the end)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        p = subprocess.Popen([DISTBATCH, *argv], env=cli_env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        t0 = None
        try:
            if signal_rank is not None:
                deadline = time.monotonic() + timeout
                while not _done(out / "checkpoints", after_step):
                    assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.005)
                os.kill(_worker_pid(p.pid, signal_rank), sig)
                t0 = time.monotonic()
            code = p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return code, log.read_text(), (time.monotonic() - t0 if t0 else None)


def _check_same_run(full: Path, other: Path) -> None:
    diff = max_weight_diff(load_weights(full), load_weights(other))
    assert diff <= 1e-6, f"weights differ from the uninterrupted run by {diff}"
    a, b = load_summary(full), load_summary(other)
    assert a["steps"] == b["steps"]
    assert [r["step"] for r in b["history"]] == [r["step"] for r in a["history"]]  # none twice, none missing
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (rb["step"], k)


def _worker(backend: str) -> list[str]:
    return [DISTBATCH, "train", "--backend", backend, *RUN]


LAUNCH = {"multiworker": ["launch", "multiworker", "--workers", "2"],
          "horovod": ["launch", "horovod", "--gloo", "-np", "2"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-worker runs, one per backend, made when first needed."""
    made = {}

    def get(backend: str) -> Path:
        if backend not in made:
            out = tmp_path_factory.mktemp("ref") / backend
            code, log, _ = _launch([*LAUNCH[backend], "--", *_worker(backend), "--out", str(out)], out)
            assert code == 0, log[-3000:]
            assert [r["step"] for r in load_summary(out)["history"]] == EVAL_STEPS
            made[backend] = out
        return made[backend]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_sigkilled_worker_is_restarted_and_the_job_matches_the_uninterrupted_run(
        backend, reference, tmp_path, dataset_cache):
    out = tmp_path / "cut"
    code, log, seconds = _launch([*LAUNCH[backend], "--max-restarts", "1", "--", *_worker(backend),
                                  "--out", str(out)], out, signal_rank=1)
    assert code == 0, log[-4000:]
    restart = re.search(r"^distbatch launch: restart 1/1: rank 1 failed with (signal 9 \(SIGKILL\)|exit code 137 "
                        r"\(SIGKILL\)); restarting all 2 workers with --resume from step (\d+) \(\S+\)$", log, re.M)
    assert restart, log[-4000:]
    step = int(restart.group(2))
    assert 12 <= step < 48
    assert re.search(rf"resumed from \S+ckpt-{step} at step {step}$", log, re.M), log[-4000:]
    _check_same_run(reference(backend), out)
    print(f"\n{backend}: SIGKILL of rank 1 -> job finished {seconds:.1f} s later (restart from step {step})")


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_everywhere_at_one_step_then_resume_matches(
        reference, tmp_path, dataset_cache):
    out = tmp_path / "term"
    argv = [*LAUNCH["multiworker"], "--", *_worker("multiworker"), "--out", str(out)]
    code, log, seconds = _launch(argv, out, signal_rank=1, sig=signal.SIGTERM)
    assert code == 75, log[-4000:]
    saved = re.findall(r"^\[rank (\d)\] distbatch: preempted by SIGTERM: every worker saved a checkpoint "
                       r"at step (\d+) in \S+; continue with --resume$", log, re.M)
    assert sorted(r for r, _ in saved) == ["0", "1"] and saved[0][1] == saved[1][1], log[-4000:]
    step = int(saved[0][1])
    assert 12 <= step < 48 and _done(out / "checkpoints", step)
    assert not (out / "summary.json").exists()
    assert seconds < 30, seconds
    code, log, _ = _launch([*argv, "--resume"], out)
    assert code == 0, log[-4000:]
    assert f"resumed from {out}/checkpoints/ckpt-{step} at step {step}" in log
    _check_same_run(reference("multiworker"), out)
    print(f"\nSIGTERM to rank 1 -> both ranks saved step {step} and exited 75 after {seconds:.2f} s")


ES = ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "256", "--val-size", "200",
      "--global-batch-size", "32", "--epochs", "60", "--base-lr", "0.05", "--warmup", "none",
      "--decay", "constant", "--early-stopping-metric", "val_loss", "--early-stopping-patience", "3",
      "--checkpoint-every", "8"]  # at every evaluation (8 steps/epoch; the default is once a minute)


def _kill_after(argv: list[str], ckpt_dir: Path, step: int) -> None:
    p = subprocess.Popen([DISTBATCH, *argv], env=cli_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while p.poll() is None and not _done(ckpt_dir, step) and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, f"ended ({p.returncode}) before the kill\n{err[-2000:]}"


@pytest.mark.slow
def test_early_stopping_killed_and_resumed_matches_the_uninterrupted_run(tmp_path, dataset_cache):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli([*ES, "--out", str(full)])
    s = load_summary(full)
    assert s["stopped_early"] and s["best_step"] < s["steps"] < s["total_steps"]
    # Killed after the first evaluation without improvement: the best weights (an earlier
    # step's) and the patience counter must come back from the checkpoint.
    kill_at = s["best_step"] + s["steps_per_epoch"]
    _kill_after([*ES, "--out", str(cut)], cut / "checkpoints", kill_at)
    resumed = run_cli([*ES, "--out", str(cut), "--resume"])
    step = int(re.search(r"resumed from \S+ at step (\d+)", resumed.stderr).group(1))
    assert kill_at <= step, resumed.stderr[-2000:]
    r = load_summary(cut)
    for k in ("steps", "best_step", "best_epoch", "stopped_epoch", "stopped_early", "restored_value"):
        assert r[k] == s[k], k
    assert r["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)
    _check_same_run(full, cut)
    # Killed after the stopping checkpoint (before summary.json): resume takes no more steps.
    again = tmp_path / "again"
    _kill_after([*ES, "--out", str(again)], again / "checkpoints", s["steps"])
    if not (again / "summary.json").exists():
        run_cli([*ES, "--out", str(again), "--resume"])
        assert load_summary(again)["steps"] == s["steps"]
        _check_same_run(full, again)


SLOW_SAVE = textwrap.dedent("""
    # Test-only: make the checkpoint of step $SLOW_SAVE_STEP stop for 60 s after its state file
    # and best weights are written and before TensorFlow writes the checkpoint itself.
    import os, time
    import distbatch.training.run_checkpoints as rc
    _orig = rc.RunCheckpoint.save
    def _slow(self, step, *a, **k):
        if step == int(os.environ["SLOW_SAVE_STEP"]):
            save = self.manager.save
            def slow_save(*a2, **k2):
                open(os.environ["SLOW_SAVE_FLAG"], "w").close()
                time.sleep(60)
                return save(*a2, **k2)
            self.manager.save = slow_save
        return _orig(self, step, *a, **k)
    rc.RunCheckpoint.save = _slow
""")


@pytest.mark.slow
def test_kill_during_checkpoint_writes_then_resume_matches(tmp_path, dataset_cache):
    argv = ["train", "--backend", "single", *TINY, "--steps", "48", "--checkpoint-every", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli([*argv, "--out", str(full)])
    # 1. Deterministic: killed between state-12.json and TensorFlow's files of ckpt-12.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE)
    flag = tmp_path / "saving"
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", REPO)]),
                   "SLOW_SAVE_STEP": "12", "SLOW_SAVE_FLAG": str(flag)})
    p = subprocess.Popen([DISTBATCH, *argv, "--out", str(cut)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not flag.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:]
        time.sleep(0.01)
    p.kill()
    p.communicate()
    ck = cut / "checkpoints"
    assert (ck / "state-12.json").exists() and not (ck / "ckpt-12.index").exists()
    # 2. At random moments while a checkpoint is written at every step (seeded, reproducible).
    rng = random.Random(16)
    for _ in range(3):
        p = subprocess.Popen([DISTBATCH, *argv, "--out", str(cut), "--resume"], env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = candidates(str(ck))[0][0]
        while p.poll() is None and not _done(ck, start + 1):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        p.kill()
        err = p.communicate()[1]
        assert "Traceback" not in err, err[-2000:]
    resumed = run_cli([*argv, "--out", str(cut), "--resume"])
    assert "resumed from" in resumed.stderr and "Traceback" not in resumed.stderr
    _check_same_run(full, cut)
