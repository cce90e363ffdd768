"""Issue 28, item 3: `distbatch launch multiworker --max-restarts K --min-workers M` continues on
the surviving workers when one stays dead (docs/reliability.md, "A worker that stays dead").

Fast: the dead-worker rule (distbatch/launch/survivors.py) with a fake checkpoint and clock, the
restart loop with a fake attempt, the CLI with a fake supervisor (the TF_CONFIG each start gets),
the record OUT/world_sizes.json, and bad input. Slow: a real 2-worker job whose rank 1 is
SIGKILLed and then stays dead ends on 1 worker within 1e-4 of the uninterrupted 2-worker run.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DISTBATCH, cli_env, load_summary
from distbatch.cli import launch as launch_cli
from distbatch.errors import UsageError
from distbatch.launch import restarts, survivors
from distbatch.launch.survivors import Survivors
from distbatch.training.preemption import CHECKPOINT_SECONDS_ENV

PY = sys.executable
CMD = ["distbatch", "train", "--out", "OUT"]
KILLED = ("rank 1", "failed with signal 9 (SIGKILL)")
EXITED = ("rank 1", "failed with exit code 1")


class FakeCheckpoints:
    """newest_checkpoint replaced: the test sets the newest step (None: no checkpoint)."""

    def __init__(self):
        self.step = None

    def __call__(self, out):
        return None if self.step is None else (self.step, f"{out}/checkpoints")


@pytest.fixture
def rule(tmp_path):
    """A Survivors of 3 workers (min 1) whose --out exists, with a fake checkpoint."""
    (tmp_path / "OUT").mkdir()
    ck = FakeCheckpoints()

    def make(workers=3, min_workers=1, dead_after=None):
        return Survivors(workers, min_workers, dead_after, checkpoint=ck), ck
    return make


def _attempt(world, who_how, code=1, *, step_after=None, ck=None, resume=True, out=None):
    """One attempt: started, the newest checkpoint moved to `step_after` (progress), failed."""
    world.started([*CMD[:-1], out or CMD[-1], *(["--resume"] if resume else [])])
    if step_after is not None:
        ck.step = step_after
    return world.failed(*who_how, code)


# =========================================================================== the rule
def test_a_worker_that_fails_twice_with_no_new_checkpoint_in_between_stayed_dead(rule, tmp_path):
    world, ck = rule(workers=2)
    out = str(tmp_path / "OUT")
    assert _attempt(world, KILLED, 137, step_after=12, ck=ck, resume=False, out=out) is None
    assert world.strikes == {1: 1} and world.size == 2
    decision = _attempt(world, EXITED, out=out)
    assert decision == survivors.Decision(
        1, "worker 1 stayed dead (failed twice in a row with no new checkpoint in between; the last "
           "time: rank 1 failed with exit code 1)", stop=False)
    assert world.alive == [0] and world.labels() == ["rank 0"] and world.strikes == {}


def test_progress_between_two_failures_starts_the_count_again(rule, tmp_path):
    world, ck = rule(workers=2)
    out = str(tmp_path / "OUT")
    assert _attempt(world, KILLED, step_after=12, ck=ck, out=out) is None
    assert _attempt(world, KILLED, step_after=20, ck=ck, out=out) is None   # a new checkpoint: 1 again
    assert world.strikes == {1: 1}
    assert _attempt(world, KILLED, out=out).worker == 1                      # none since: dead


def test_a_failure_of_another_worker_in_between_starts_the_count_again(rule, tmp_path):
    world, ck = rule(workers=3)
    out = str(tmp_path / "OUT")
    assert _attempt(world, KILLED, out=out) is None
    assert _attempt(world, ("rank 2", "failed with exit code 1"), out=out) is None
    assert world.strikes == {2: 1}
    assert _attempt(world, KILLED, out=out) is None                          # rank 1: 1, not 2
    assert _attempt(world, KILLED, out=out).worker == 1


@pytest.mark.parametrize("dead_after, failures_to_drop", [(1, 1), (2, 2), (3, 3)])
def test_dead_after_is_the_number_of_failures_in_a_row(rule, tmp_path, dead_after, failures_to_drop):
    world, ck = rule(workers=2, dead_after=dead_after)
    out = str(tmp_path / "OUT")
    decisions = [_attempt(world, EXITED, out=out) for _ in range(failures_to_drop)]
    assert decisions[:-1] == [None] * (failures_to_drop - 1)
    assert decisions[-1].worker == 1 and world.alive == [0]
    times = {1: "once", 2: "twice", 3: "3 times"}[dead_after]
    assert f"(failed {times} in a row" in decisions[-1].reason


def test_below_min_workers_it_stops_with_one_line_naming_the_worker(rule, tmp_path):
    world, ck = rule(workers=2, min_workers=2)
    out = str(tmp_path / "OUT")
    _attempt(world, KILLED, 137, out=out)
    decision = _attempt(world, KILLED, 137, out=out)
    assert decision.stop and world.alive == [0, 1]
    assert decision.line == (
        "distbatch launch: not restarting: worker 1 stayed dead (failed twice in a row with no new "
        "checkpoint in between; the last time: rank 1 failed with signal 9 (SIGKILL)); 1 worker would "
        "remain, fewer than --min-workers 2; exiting with status 137")


def test_ranks_are_renumbered_and_named_after_their_original_worker(rule, tmp_path):
    world, ck = rule(workers=3, dead_after=1)
    out = str(tmp_path / "OUT")
    assert _attempt(world, ("rank 0", "failed with exit code 1"), out=out).worker == 0
    assert world.labels() == ["rank 0 (worker 1)", "rank 1 (worker 2)"]
    assert world.worker_of("rank 1 (worker 2)") == 2 and world.worker_of("rank 1") is None
    assert _attempt(world, ("rank 1 (worker 2)", "failed with exit code 1"), out=out).worker == 2
    assert world.labels() == ["rank 0 (worker 1)"]


def test_a_failure_no_rank_is_named_for_charges_nobody(rule, tmp_path):
    world, ck = rule(workers=2, dead_after=1)
    assert _attempt(world, ("distbatch launch", "failed"), out=str(tmp_path / "OUT")) is None
    assert world.strikes == {} and world.size == 2


# =========================================================================== the restart loop
class Job:
    """A fake run_once for run_with_restarts: each attempt is a list of (time, action) events on
    a fake clock; actions are output lines, 'ckpt N' (writes checkpoint N, mtime = that time),
    or the end: (code, [failures])."""

    def __init__(self, out: Path, world: Survivors, clock: list, attempts):
        self.out, self.world, self.clock, self.attempts = out, world, clock, list(attempts)
        self.sizes, self.commands = [], []
        clock[0] = self.attempts[0][0]

    def sleep(self, seconds):
        """The back-off: the clock moves to the next attempt's start."""
        self.clock[0] = self.attempts[0][0]

    def __call__(self, cmd, failures):
        self.sizes.append(self.world.size)
        self.commands.append(list(cmd))
        start, events, (code, fails) = self.attempts.pop(0)
        assert self.clock[0] == start
        for t, action in events:
            self.clock[0] = t
            if action.startswith("ckpt "):
                step, ck = int(action.split()[1]), self.out / "checkpoints"
                ck.mkdir(parents=True, exist_ok=True)
                (ck / f"state-{step}.json").write_text("{}")
                (ck / f"ckpt-{step}.index").write_text("x")
                os.utime(ck / f"ckpt-{step}.index", (t, t))
            else:
                self.world.on_line(action + "\n")
        failures.extend(fails)
        return code


def _owned_out(tmp_path) -> Path:
    out = tmp_path / "OUT"
    out.mkdir()
    (out / ".distbatch-run").write_text("x")
    (out / "config.json").write_text("{}")
    return out


def test_restart_loop_drops_the_dead_worker_and_records_steps_and_seconds_lost(tmp_path):
    out = _owned_out(tmp_path)
    clock = [0.0]
    world = Survivors(2, 1, clock=lambda: clock[0])
    job = Job(out, world, clock, [
        # 2 workers from the start: training at 1003, checkpoint 12 at 1010, step 16 printed, killed
        (1000.0, [(1003.0, "distbatch: compiling the train step (the first step takes longer)..."),
                  (1010.0, "ckpt 12"),
                  (1012.0, "epoch   2.00 step 16/48  loss 1.7723 acc 0.3789")],
         (137, [KILLED])),
        # 2 workers again: worker 1's host is gone, it exits at once
        (1020.0, [], (1, [EXITED])),
        # 1 worker: compiles at 1033, resumes from 12 at 1035 (training again), finishes
        (1030.0, [(1033.0, "distbatch: compiling the train step (the first step takes longer)..."),
                  (1035.0, f"resumed from {out}/checkpoints/ckpt-12 at step 12")], (0, [])),
    ])
    err = io.StringIO()
    code = restarts.run_with_restarts(job, ["distbatch", "train", "--out", str(out)], max_restarts=3,
                                      workers=2, stderr=err, backoff=1.0, backoff_max=1.0,
                                      sleep=job.sleep, world=world)
    clock[0] = 1050.0
    assert code == 0 and job.sizes == [2, 2, 1]
    assert [c[-1] for c in job.commands] == [str(out), "--resume", "--resume"]
    ck = f"{out}/checkpoints"
    assert [ln for ln in err.getvalue().splitlines() if "waiting" not in ln] == [
        f"distbatch launch: restart 1/3: rank 1 failed with signal 9 (SIGKILL); restarting all 2 workers "
        f"with --resume from step 12 ({ck})",
        "distbatch launch: restart 2/3: worker 1 stayed dead (failed twice in a row with no new checkpoint "
        f"in between; the last time: rank 1 failed with exit code 1); continuing on 1 worker "
        f"(--min-workers 1) with --resume from step 12 ({ck})",
        "distbatch launch: world sizes 2 -> 2 -> 1 over 3 starts; the 2 restart(s) lost 25.0 s and 4 "
        f"step(s); recorded in {out}/world_sizes.json"]
    record = json.loads((out / "world_sizes.json").read_text())
    assert record == [
        {"started": 1000.0, "workers": 2, "worker_ids": [0, 1], "from_step": 0, "resumed": False,
         "trained_at": 1003.0, "last_step": 16, "ended": 1012.0, "exit": 137,
         "failure": "rank 1 failed with signal 9 (SIGKILL)"},
        # 16 - 12 = 4 steps thrown away; this start never trained: its seconds are the next one's
        {"started": 1020.0, "workers": 2, "worker_ids": [0, 1], "from_step": 12, "resumed": True,
         "after": "rank 1 failed with signal 9 (SIGKILL)", "steps_lost": 4, "ended": 1020.0, "exit": 1,
         "failure": "rank 1 failed with exit code 1"},
        # from checkpoint 12's write (1010) to training again (1035): 25 s
        {"started": 1030.0, "workers": 1, "worker_ids": [0], "from_step": 12, "resumed": True,
         "after": "rank 1 failed with exit code 1", "dropped": [1], "steps_lost": 0,
         "trained_at": 1035.0, "seconds_lost": 25.0, "ended": 1035.0, "exit": 0},
    ]


def test_seconds_lost_are_not_counted_twice_when_a_restart_trains_without_a_new_checkpoint(tmp_path):
    out = _owned_out(tmp_path)
    clock = [0.0]
    world = Survivors(2, 1, clock=lambda: clock[0])
    resumed = f"resumed from {out}/checkpoints/ckpt-8 at step 8"
    job = Job(out, world, clock, [
        (0.0, [(2.0, "distbatch: compiling the train step"), (5.0, "ckpt 8")], (137, [KILLED])),
        (10.0, [(14.0, resumed)], (137, [("rank 0", "failed with signal 9 (SIGKILL)")])),  # no checkpoint
        (20.0, [(23.0, resumed)], (0, [])),
    ])
    assert restarts.run_with_restarts(job, ["distbatch", "train", "--out", str(out)], max_restarts=3,
                                      workers=2, stderr=io.StringIO(), backoff=1.0, backoff_max=1.0,
                                      sleep=job.sleep, world=world) == 0
    lost = [e.get("seconds_lost") for e in world.record()]
    assert lost == [None, 9.0, 9.0]  # 5 -> 14, then 14 -> 23: the whole 5 -> 23 once
    assert [e["steps_lost"] for e in world.record()[1:]] == [None, None]  # no step line after the checkpoint


def test_the_record_is_written_only_into_distbatchs_own_out_once_the_job_trained(tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")       # not distbatch's: never written
    world = Survivors(2, 1)
    world.started(["distbatch", "train", "--out", str(out)])
    world.on_line("distbatch: compiling the train step\n")
    world.ended(0)
    assert sorted(os.listdir(out)) == ["mine.txt"]
    out2 = tmp_path / "OUT2"
    out2.mkdir()
    (out2 / ".distbatch-run").write_text("x")
    world = Survivors(2, 1)
    world.started(["distbatch", "train", "--out", str(out2)])
    world.failed(*KILLED, 137)                        # never trained (e.g. refused its --out): nothing
    assert not (out2 / "world_sizes.json").exists()
    world.started(["distbatch", "train", "--out", str(out2), "--resume"])
    world.on_line("distbatch: compiling the train step\n")
    assert world.ended(0)[0].endswith(f"; recorded in {out2}/world_sizes.json")
    assert [e["workers"] for e in json.loads((out2 / "world_sizes.json").read_text())] == [2, 2]


def test_without_min_workers_the_loop_is_unchanged(tmp_path, monkeypatch):
    """world=None: every restart restarts all workers, whoever failed and how often."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OUT").mkdir()
    (tmp_path / "OUT" / "config.json").write_text("{}")
    codes = [(1, [EXITED])] * 3 + [(0, [])]
    calls = []

    def once(cmd, failures):
        calls.append(cmd)
        code, fails = codes.pop(0)
        failures.extend(fails)
        return code

    err = io.StringIO()
    assert restarts.run_with_restarts(once, CMD, max_restarts=3, workers=2, stderr=err,
                                      sleep=lambda s: None) == 0
    assert len(calls) == 4 and all("restarting all 2 workers" in ln for ln in err.getvalue().splitlines())


# =========================================================================== the CLI
def _fake_workers(monkeypatch, out: Path, script):
    """launch multiworker's run_workers replaced: records each start (TF_CONFIG of every rank,
    labels, argv), runs the scripted attempt (lines, checkpoints) and returns its outcome."""
    starts = []

    def run_workers(specs, *, grace_seconds, failures, on_line=None):
        starts.append({"configs": [json.loads(s.env["TF_CONFIG"]) for s in specs],
                       "labels": [s.label for s in specs], "argv": list(specs[0].argv)})
        lines, step, (code, fails) = script.pop(0)
        out.mkdir(exist_ok=True)
        (out / ".distbatch-run").write_text("x")
        (out / "config.json").write_text("{}")
        for line in lines:
            on_line(line + "\n")
        if step is not None:
            ck = out / "checkpoints"
            ck.mkdir(exist_ok=True)
            (ck / f"state-{step}.json").write_text("{}")
            (ck / f"ckpt-{step}.index").write_text("x")
        if failures is not None:
            failures.extend(fails)
        return code

    monkeypatch.setattr(launch_cli.supervisor, "run_workers", run_workers)
    monkeypatch.setenv(CHECKPOINT_SECONDS_ENV, "300")  # the CLI sets it; restored afterwards
    return starts


def test_cli_continues_on_fewer_workers_with_a_new_tf_config_then_stops_below_min(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "OUT"
    train = "distbatch: compiling the train step"
    starts = _fake_workers(monkeypatch, out, [
        ([train], 8, (137, [KILLED])),                                   # 3 workers, killed after ckpt 8
        ([], None, (1, [EXITED])),                                       # worker 1 gone: dropped
        ([f"resumed from {out}/checkpoints/ckpt-8 at step 8"], 16,       # 2 workers; worker 2 killed
         (137, [("rank 1 (worker 2)", "failed with signal 9 (SIGKILL)")])),
        ([], None, (1, [("rank 1 (worker 2)", "failed with exit code 1")])),  # and gone: 1 < min 2
    ])
    code = launch_cli.main(["launch", "multiworker", "--workers", "3", "--max-restarts", "5",
                            "--min-workers", "2", "--restart-backoff", "0", "--",
                            "distbatch", "train", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(starts) == 4
    sizes = [[len(c["cluster"]["worker"]) for c in s["configs"]] for s in starts]
    assert sizes == [[3] * 3, [3] * 3, [2] * 2, [2] * 2]
    assert [[c["task"]["index"] for c in s["configs"]] for s in starts][2] == [0, 1]
    assert starts[2]["labels"] == ["rank 0", "rank 1 (worker 2)"]
    assert [s["argv"][-1] for s in starts] == [str(out), "--resume", "--resume", "--resume"]
    ck = f"{out}/checkpoints"
    assert err[:4] == [
        f"distbatch launch: restart 1/5: rank 1 failed with signal 9 (SIGKILL); restarting all 3 workers "
        f"with --resume from step 8 ({ck})",
        "distbatch launch: restart 2/5: worker 1 stayed dead (failed twice in a row with no new checkpoint "
        "in between; the last time: rank 1 failed with exit code 1); continuing on 2 workers "
        f"(--min-workers 2) with --resume from step 8 ({ck})",
        "distbatch launch: restart 3/5: rank 1 (worker 2) failed with signal 9 (SIGKILL); restarting all 2 "
        f"workers with --resume from step 16 ({ck})",
        "distbatch launch: not restarting: worker 2 stayed dead (failed twice in a row with no new "
        "checkpoint in between; the last time: rank 1 (worker 2) failed with exit code 1); 1 worker would "
        "remain, fewer than --min-workers 2; exiting with status 1"]
    assert re.fullmatch(r"distbatch launch: world sizes 3 -> 3 -> 2 -> 2 over 4 starts; the 3 restart\(s\) "
                        rf"lost \d+\.\d s and 0 step\(s\) \(steps not known for 2\); recorded in "
                        rf"{re.escape(str(out))}/world_sizes\.json", err[4]), err[4]
    assert len(err) == 5
    record = json.loads((out / "world_sizes.json").read_text())
    assert [(e["workers"], e["worker_ids"], e["from_step"], e.get("dropped")) for e in record] == [
        (3, [0, 1, 2], 0, None), (3, [0, 1, 2], 8, None), (2, [0, 2], 8, [1]), (2, [0, 2], 16, None)]
    assert [e["exit"] for e in record] == [137, 1, 137, 1]


def test_cli_min_workers_equal_to_workers_stops_when_a_worker_stays_dead(tmp_path, monkeypatch, capsys):
    """--min-workers N (= --workers): never shrink, but stop at once instead of using up restarts."""
    out = tmp_path / "OUT"
    starts = _fake_workers(monkeypatch, out, [([], None, (1, [EXITED]))] * 2)
    code = launch_cli.main(["launch", "multiworker", "--workers", "2", "--max-restarts", "9",
                            "--min-workers", "2", "--restart-backoff", "0", "--",
                            "distbatch", "train", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert (code, len(starts)) == (1, 2)
    assert err[-2].startswith("distbatch launch: not restarting: worker 1 stayed dead (failed twice")
    assert err[-1] == ("distbatch launch: world sizes 2 -> 2 over 2 starts; the 1 restart(s) never got back "
                       "to training")
    assert not (out / "world_sizes.json").exists()  # the job never trained there


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2", "--max-restarts", "1", "--min-workers", "0"],
     "--min-workers must be an integer >= 1, got 0"),
    (["--workers", "2", "--max-restarts", "1", "--min-workers", "-1"],
     "--min-workers must be an integer >= 1, got -1"),
    (["--workers", "2", "--max-restarts", "1", "--min-workers", "3"],
     "--min-workers 3 is more than --workers 2; expected 1..2 (the fewest workers the job may continue on)"),
    (["--workers", "2", "--min-workers", "1"],
     "--min-workers 1 continues on the surviving workers at a restart; it needs --max-restarts K (K >= 1)"),
    (["--workers", "2", "--max-restarts", "0", "--min-workers", "1"],
     "--min-workers 1 continues on the surviving workers at a restart; it needs --max-restarts K (K >= 1)"),
    (["--workers", "2", "--max-restarts", "1", "--min-workers", "1", "--dead-after", "0"],
     "--dead-after must be an integer >= 1, got 0"),
    (["--workers", "2", "--max-restarts", "1", "--dead-after", "2"],
     "--dead-after 2 applies only with --min-workers M (it says when a worker stayed dead and the job "
     "continues without it)"),
    (["--workers", "0", "--max-restarts", "1", "--min-workers", "1"], "--workers must be an integer >= 1, got 0"),
    (["--workers", "2", "--max-restarts", "1", "--min-workers", "abc"],
     "argument --min-workers: invalid int value: 'abc'"),
])
def test_bad_min_workers_is_one_line_exit_2(tmp_path, argv, message):
    p = subprocess.run([DISTBATCH, "launch", "multiworker", *argv, "--", "distbatch", "train", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"distbatch: error: {message}"), p.stderr
    assert not (tmp_path / "o").exists()


def test_a_sweep_is_not_shrunk():
    with pytest.raises(UsageError, match=r"^--min-workers 1 \(below --workers 2\) continues a `distbatch "
                                         r"train` run on fewer workers; a `distbatch sweep` is restarted"):
        survivors.check_min_workers(1, workers=2, max_restarts=1, dead_after=None,
                                    command=["distbatch", "sweep", "--batch-sizes", "32"])
    survivors.check_min_workers(2, workers=2, max_restarts=1, dead_after=None,   # never shrinks: fine
                                command=["distbatch", "sweep", "--batch-sizes", "32"])


def test_dry_run_with_min_workers_prints_the_commands(capsys, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_SECONDS_ENV, "300")
    code = launch_cli.main(["launch", "multiworker", "--workers", "2", "--max-restarts", "1",
                            "--min-workers", "1", "--dry-run", "--", "distbatch", "train", "--out", "o"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("TF_CONFIG=") == 2


# =========================================================================== real processes (slow)
# Test-only stand-in for a host that is gone for good: worker 1 of the 2-worker cluster runs
# its first start normally (and leaves FLAG); every later start of worker 1 of 2 exits at once,
# as a worker whose host no longer answers fails to start. Any other worker runs normally.
DEAD_HOST = r'''
import json, os, sys
flag, argv = sys.argv[1], sys.argv[2:]
config = json.loads(os.environ["TF_CONFIG"])
if config["task"]["index"] == 1 and len(config["cluster"]["worker"]) == 2:
    if os.path.exists(flag):
        print("dead_host.py: the host of worker 1 is gone", file=sys.stderr, flush=True)
        sys.exit(1)
    open(flag, "w").close()
os.execv(argv[0], argv)
'''


@pytest.mark.slow
def test_worker_killed_then_dead_the_job_ends_on_one_worker_like_the_uninterrupted_run(
        tmp_path, dataset_cache):
    from test_restarts import RUN, _launch
    from test_resume_world_size import _same_run
    worker = [DISTBATCH, "train", "--backend", "multiworker", *RUN]
    full = tmp_path / "full"
    code, log, _ = _launch(["launch", "multiworker", "--workers", "2", "--", *worker, "--out", str(full)],
                           full)
    assert code == 0, log[-3000:]

    script, flag, out = tmp_path / "dead_host.py", tmp_path / "worker1-started", tmp_path / "cut"
    script.write_text(DEAD_HOST)
    code, log, seconds = _launch(
        ["launch", "multiworker", "--workers", "2", "--max-restarts", "3", "--min-workers", "1", "--",
         PY, str(script), str(flag), *worker, "--out", str(out)], out, signal_rank=1, after_step=12)
    assert code == 0, log[-5000:]
    first = re.search(r"^distbatch launch: restart 1/3: rank 1 failed with signal 9 \(SIGKILL\); restarting "
                      r"all 2 workers with --resume from step (\d+) \(\S+\)$", log, re.M)
    assert first, log[-5000:]
    step = int(first.group(1))
    assert 12 <= step < 48, step
    assert re.search(r"^distbatch launch: restart 2/3: worker 1 stayed dead \(failed twice in a row with no "
                     r"new checkpoint in between; the last time: rank 1 failed with exit code 1\); continuing "
                     rf"on 1 worker \(--min-workers 1\) with --resume from step {step} \(\S+\)$", log, re.M), \
        log[-5000:]
    assert f"resumed from {out}/checkpoints/ckpt-{step} at step {step}" in log, log[-5000:]
    assert "resuming on 1 replicas (the run used 2)" in log, log[-5000:]
    assert load_summary(out)["workers"] == 1
    diff = _same_run(full, out)   # <= 1e-4, the same evaluations

    record = json.loads((out / "world_sizes.json").read_text())
    assert [(e["workers"], e["from_step"], e.get("dropped"), e["exit"]) for e in record] == [
        (2, 0, None, 137), (2, step, None, 1), (1, step, [1], 0)], (record, log[-3000:])
    assert record[1].get("trained_at") is None and record[2]["steps_lost"] == 0, record
    lost = record[2]["seconds_lost"]
    # At least from the end of the killed attempt (every checkpoint was written before it) to
    # training again; at most since the first start was training. (Not from the kill: the chief
    # may still finish a checkpoint of steps done before it.)
    assert record[2]["trained_at"] - record[0]["ended"] <= lost <= (
        record[2]["trained_at"] - record[0]["trained_at"]), (record, log[-3000:])
    summary = re.search(r"^distbatch launch: world sizes 2 -> 2 -> 1 over 3 starts; the 2 restart\(s\) lost "
                        r"(\d+\.\d) s and (\d+) step\(s\)", log, re.M)
    assert summary and float(summary.group(1)) == pytest.approx(lost, abs=0.051), log[-2000:]
    print(f"\nrank 1 SIGKILLed after checkpoint {step}, then dead: finished on 1 worker, max weight diff "
          f"{diff:.2e} vs the uninterrupted 2-worker run; seconds lost {lost:.1f} (kill to job end "
          f"{seconds:.1f} s); steps lost after the kill: {record[1].get('steps_lost')}")
