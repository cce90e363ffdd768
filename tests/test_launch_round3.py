"""Issue 27, "Trust, round 3": restarts that know when to stop, and listening only where needed.

A. Restarts: deterministic failures (exit 2, 3) are not restarted; restarts back off
   (exponential, capped); one attempt is described one way (the exit-status line and the
   restart line name the same rank and status); `--max-restarts` with `train
   --global-batch-size auto` is refused up front; horovodrun's own traceback is filtered out.
B. Listening: the start-up rendezvous listens on loopback for a local job and on the job's own
   address otherwise; its key is a per-job random secret handed through the environment and
   never printed; workers without it fall back to the cluster hash.

Fast tests use fake clocks, fake workers (monkeypatched run_workers), threads and sockets in
this process. The slow ones start real horovodrun / worker processes.
"""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from distbatch.backends import cluster
from distbatch.backends.cluster import SECRET_ENV, listen_hosts, rendezvous
from distbatch.cli import launch as launch_cli
from distbatch.errors import ClusterSetupError, UsageError
from distbatch.launch import horovodrun_output, launcher, restarts, supervisor
from conftest import free_ports

PY = sys.executable
BIN = os.path.dirname(PY)
REPO = str(Path(__file__).resolve().parents[1])
SECRET = "0123456789abcdef" * 2  # what the monkeypatched secrets.token_hex returns
OTHER_SECRET = "fedcba9876543210" * 2


def _cli(argv, capsys):
    code = launch_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# =========================================================================== A1: back-off
@pytest.mark.parametrize("base, cap, delays", [
    (1.0, 60.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
    (0.5, 3.0, [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0]),
    (0.0, 60.0, [0.0] * 8),      # --restart-backoff 0: restart at once
    (5.0, 0.0, [0.0] * 8),       # --restart-backoff-max 0: never wait
])
def test_backoff_delay_doubles_up_to_the_cap(base, cap, delays):
    assert [restarts.backoff_delay(k, base, cap) for k in range(1, 9)] == delays


def test_backoff_delay_of_a_huge_restart_count_is_the_cap():
    assert restarts.backoff_delay(10_000, 1.0, 60.0) == 60.0


@pytest.mark.parametrize("value, flag", [(-1.0, "--restart-backoff"), (float("nan"), "--restart-backoff"),
                                         (float("inf"), "--restart-backoff-max"), (1e30, "--restart-backoff-max")])
def test_bad_backoff_is_one_line(value, flag):
    with pytest.raises(UsageError) as e:
        restarts.check_backoff(value, flag)
    assert str(e.value) == f"{flag} must be a number of seconds in [0, 86400], got {value!r}"


class Attempts:
    """A fake run_once: each call pops (exit status, failures) and records the command."""

    def __init__(self, outcomes):
        self.outcomes, self.commands = list(outcomes), []

    def __call__(self, cmd, failures):
        self.commands.append(list(cmd))
        code, fails = self.outcomes.pop(0)
        failures.extend(fails)
        return code


CMD = ["distbatch", "train", "--out", "OUT-with-a-run"]
KILLED = (137, [("rank 1", "failed with signal 9 (SIGKILL)")])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """CMD's --out exists and holds a run's file, so restarts add --resume."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OUT-with-a-run").mkdir()
    (tmp_path / "OUT-with-a-run" / "config.json").write_text("{}")
    return tmp_path


def test_a_run_that_wrote_nothing_restarts_without_resume(tmp_path, monkeypatch):
    """--resume refuses a missing or empty --out, so an attempt that died before writing
    anything is restarted as it was."""
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    attempts = Attempts([KILLED, (0, [])])
    assert restarts.run_with_restarts(attempts, CMD, max_restarts=1, workers=2, stderr=err,
                                      sleep=lambda s: None) == 0
    assert attempts.commands == [CMD, CMD]
    assert err.getvalue().splitlines()[-1] == (
        "distbatch launch: restart 1/1: rank 1 failed with signal 9 (SIGKILL); restarting all 2 "
        "workers from the start, without --resume (the run wrote nothing yet)")


def test_restarts_back_off_exponentially_with_one_line_each(in_tmp):
    slept, err = [], io.StringIO()
    attempts = Attempts([KILLED, KILLED, KILLED, (0, [])])
    code = restarts.run_with_restarts(attempts, CMD, max_restarts=3, workers=2, stderr=err,
                                      backoff=1.5, backoff_max=4.0, sleep=slept.append)
    assert code == 0 and slept == [1.5, 3.0, 4.0]
    assert len(attempts.commands) == 4 and attempts.commands[1:] == [CMD + ["--resume"]] * 3
    why = ("rank 1 failed with signal 9 (SIGKILL); restarting all 2 workers with --resume from the start "
           "(no checkpoint yet)")
    assert err.getvalue().splitlines() == [
        "distbatch launch: waiting 1.5 s before restart 1/3 (--restart-backoff 1.5 s, doubled at each "
        "restart, at most --restart-backoff-max 4 s)",
        f"distbatch launch: restart 1/3: {why}",
        "distbatch launch: waiting 3 s before restart 2/3 (--restart-backoff 1.5 s, doubled at each "
        "restart, at most --restart-backoff-max 4 s)",
        f"distbatch launch: restart 2/3: {why}",
        "distbatch launch: waiting 4 s before restart 3/3 (--restart-backoff 1.5 s, doubled at each "
        "restart, at most --restart-backoff-max 4 s)",
        f"distbatch launch: restart 3/3: {why}",
    ]


@pytest.mark.parametrize("code, why", [(3, "the run diverged"), (2, "bad input")])
def test_deterministic_failure_is_not_restarted(code, why):
    slept, err = [], io.StringIO()
    attempts = Attempts([(code, [("rank 1", f"failed with exit code {code}")])] * 4)
    assert restarts.run_with_restarts(attempts, CMD, max_restarts=3, workers=2, stderr=err,
                                      backoff=1.0, backoff_max=60.0, sleep=slept.append) == code
    assert len(attempts.commands) == 1 and slept == []
    assert err.getvalue() == (
        f"distbatch launch: not restarting: rank 1 failed with exit code {code} ({why}), which a restart "
        f"from the checkpoint would repeat; exiting with status {code} (--restart-deterministic "
        "restarts anyway)\n")


def test_restart_deterministic_restarts_exit_3_anyway(in_tmp):
    err = io.StringIO()
    attempts = Attempts([(3, [("rank 1", "failed with exit code 3")])] * 3)
    assert restarts.run_with_restarts(attempts, CMD, max_restarts=2, workers=2, stderr=err,
                                      restart_deterministic=True, sleep=lambda s: None) == 3
    assert len(attempts.commands) == 3
    assert [ln for ln in err.getvalue().splitlines() if "restart " in ln] == [
        "distbatch launch: restart 1/2: rank 1 failed with exit code 3; restarting all 2 workers with "
        "--resume from the start (no checkpoint yet)",
        "distbatch launch: restart 2/2: rank 1 failed with exit code 3; restarting all 2 workers with "
        "--resume from the start (no checkpoint yet)"]
    assert err.getvalue().splitlines()[-1] == "distbatch launch: giving up after 2 restart(s)"


def test_without_max_restarts_a_divergence_prints_nothing_more():
    err = io.StringIO()
    assert restarts.run_with_restarts(Attempts([(3, [("rank 0", "failed with exit code 3")])]), CMD,
                                      max_restarts=0, workers=2, stderr=err) == 3
    assert err.getvalue() == ""


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_during_the_back_off_stops_without_restarting(sig, code, name):
    err = io.StringIO()
    attempts = Attempts([KILLED, (0, [])])
    before = signal.getsignal(signal.SIGTERM)
    # An in-process `distbatch train` earlier in this pytest process installed distbatch's
    # signal watchdog (it SIGKILLs a process that does not exit within seconds of a signal);
    # the launcher process never has it. Detach it for this signal.
    wakeup = signal.set_wakeup_fd(-1)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), sig))
    timer.start()
    t0 = time.monotonic()
    try:
        got = restarts.run_with_restarts(attempts, CMD, max_restarts=2, workers=2, stderr=err,
                                         backoff=30.0, backoff_max=30.0)
    finally:
        timer.cancel()
        signal.set_wakeup_fd(wakeup)
    assert got == code and time.monotonic() - t0 < 5 and len(attempts.commands) == 1
    assert err.getvalue().splitlines()[-1] == f"distbatch launch: {name} while waiting to restart; not restarting"
    assert signal.getsignal(signal.SIGTERM) == before  # the launcher's own handling is back


# =========================================================================== A1: one description
@pytest.mark.parametrize("reported, recorded, cause", [
    # Both ranks diverged; horovodrun noticed rank 0 first, rank 1 recorded its exit first.
    ([(0, 3), (1, 143)], {0: (10.5, 3), 1: (10.0, 3)}, (1, 3)),
    # Rank 1 SIGKILLed (records nothing); rank 0 then failed in its collective.
    ([(1, 137), (0, 1)], {0: (12.0, 1)}, (1, 137)),
    # Not distbatch ranks: only the launcher's lines.
    ([(0, 3), (1, 143)], {}, (0, 3)),
    # Only records (mpirun named nobody).
    ([], {0: (1.0, 0), 1: (2.0, 3), 2: (3.0, 1)}, (1, 3)),
    ([], {0: (1.0, 0)}, None),
])
def test_failed_first_is_one_answer(reported, recorded, cause):
    assert supervisor.failed_first(reported, recorded) == cause


def test_exit_status_line_and_restart_line_name_the_same_rank(monkeypatch, tmp_path, in_tmp):
    """Was: 'rank 1 exited first, with exit code 3' then 'restart 2/3: rank 0 failed with exit code 3'."""
    def fake_run_single(argv, *, env, failures, on_line, stderr, **kwargs):
        d = env[supervisor.EXIT_DIR_ENV]
        supervisor.record_exit_code(3, {supervisor.EXIT_DIR_ENV: d, "HOROVOD_RANK": "1"})
        time.sleep(0.01)
        supervisor.record_exit_code(3, {supervisor.EXIT_DIR_ENV: d, "HOROVOD_RANK": "0"})
        for line in ("Process 0 exit with status code 3.\n", "Process 1 exit with status code 143.\n"):
            on_line(line)
        failures.append(("horovodrun", "failed with exit code 1"))
        return 1

    monkeypatch.setattr(supervisor, "run_single", fake_run_single)
    err = io.StringIO()

    def once(cmd, failures):
        return supervisor.run_launcher(["/v/bin/horovodrun"], stderr=err, failures=failures)

    assert restarts.run_with_restarts(once, CMD, max_restarts=3, workers=2, stderr=err,
                                      restart_deterministic=True, sleep=lambda s: None) == 3
    lines = err.getvalue().splitlines()
    assert lines[:2] == [
        "distbatch launch: rank 1 exited first, with exit code 3; exiting with that status (horovodrun "
        "reported exit code 1)",
        "distbatch launch: restart 1/3: rank 1 failed with exit code 3; restarting all 2 workers with "
        "--resume from the start (no checkpoint yet)"]
    # and without --restart-deterministic, the not-restarting line names it the same way
    err.truncate(0), err.seek(0)
    assert restarts.run_with_restarts(once, CMD, max_restarts=3, workers=2, stderr=err,
                                      sleep=lambda s: None) == 3
    assert err.getvalue().splitlines()[-1].startswith(
        "distbatch launch: not restarting: rank 1 failed with exit code 3 (the run diverged)")


# =========================================================================== A1/A2: the CLI
def _fake_workers(monkeypatch, outcomes, calls):
    """launch multiworker's run_workers replaced: records each start's specs, pops outcomes."""
    def run_workers(specs, *, grace_seconds, failures):
        calls.append([dict(s.env) for s in specs])
        code, fails = outcomes.pop(0)
        if failures is not None:
            failures.extend(fails)
        return code
    monkeypatch.setattr(launch_cli.supervisor, "run_workers", run_workers)


def test_cli_divergence_under_max_restarts_exits_3_at_once(monkeypatch, capsys):
    calls, slept = [], []
    _fake_workers(monkeypatch, [(3, [("rank 1", "failed with exit code 3")])] * 4, calls)
    monkeypatch.setattr(restarts, "_sleep", slept.append)
    code, out, err = _cli(["launch", "multiworker", "--workers", "2", "--max-restarts", "3", "--",
                           "distbatch", "train", "--out", "o"], capsys)
    assert (code, len(calls), slept) == (3, 1, [])
    assert err.splitlines() == [
        "distbatch launch: not restarting: rank 1 failed with exit code 3 (the run diverged), which a "
        "restart from the checkpoint would repeat; exiting with status 3 (--restart-deterministic restarts "
        "anyway)"]


def test_cli_backoff_flags_reach_the_loop(monkeypatch, capsys):
    calls, slept = [], []
    _fake_workers(monkeypatch, [KILLED, KILLED, (0, [])], calls)
    monkeypatch.setattr(restarts, "_sleep", slept.append)
    code, _, err = _cli(["launch", "multiworker", "--workers", "2", "--max-restarts", "3",
                         "--restart-backoff", "2", "--restart-backoff-max", "3", "--",
                         "distbatch", "train", "--out", "o"], capsys)
    assert code == 0 and len(calls) == 3 and slept == [2.0, 3.0]
    # the defaults: 1 s, doubled, at most 60 s
    calls.clear(), slept.clear()
    _fake_workers(monkeypatch, [KILLED, KILLED, (0, [])], calls)
    assert _cli(["launch", "multiworker", "--workers", "2", "--max-restarts", "3", "--",
                 "distbatch", "train", "--out", "o"], capsys)[0] == 0
    assert slept == [1.0, 2.0]


@pytest.mark.parametrize("auto", [["--global-batch-size", "auto"], ["--global-batch-size=auto"],
                                  ["--global-batch", "auto"]])
def test_cli_max_restarts_with_auto_batch_is_refused_up_front(monkeypatch, capsys, auto):
    calls = []
    _fake_workers(monkeypatch, [], calls)
    code, out, err = _cli(["launch", "multiworker", "--workers", "2", "--max-restarts", "2", "--",
                           "distbatch", "train", *auto, "--max-global-batch-size", "512", "--out", "o"], capsys)
    assert (code, out, calls) == (2, "", [])
    assert err == ("distbatch: error: --max-restarts 2 restarts the workers with --resume, which `train "
                   "--global-batch-size auto` refuses; give --global-batch-size a number, or leave out "
                   "--max-restarts\n")


def test_auto_batch_without_restarts_or_a_number_with_them_is_fine():
    restarts.check_restart_command(["distbatch", "train", "--global-batch-size", "256"], 2)
    restarts.check_restart_command(["distbatch", "sweep", "--batch-sizes", "32"], 2)
    with pytest.raises(UsageError):
        restarts.check_restart_command(["python", "-m", "distbatch", "train", "--global-batch-size", "auto"], 1)


@pytest.mark.parametrize("flag, value", [("--restart-backoff", "nan"), ("--restart-backoff-max", "-1")])
def test_cli_bad_backoff_is_one_line_exit_2(capsys, flag, value):
    code, out, err = _cli(["launch", "horovod", "-np", "2", "--horovodrun", "/v/bin/horovodrun", flag, value,
                           "--dry-run", "--", "x"], capsys)
    assert (code, out) == (2, "")
    assert err == f"distbatch: error: {flag} must be a number of seconds in [0, 86400], got {float(value)!r}\n"


# =========================================================================== A3: horovodrun's traceback
RANK_LINES = """\
[1]<stdout>:hi 1
Process 0 exit with status code 3.
Terminating remaining workers after failure of Process 0.
[1]<stderr>:Terminated
[0]<stderr>:Traceback (most recent call last):
[0]<stderr>:  File "x.py", line 1, in <module>
[0]<stderr>:ValueError: a rank's own traceback stays
"""
HOROVODRUN_FAILED = RANK_LINES + """\
Traceback (most recent call last):
  File "/v/bin/horovodrun", line 6, in <module>
    sys.exit(run_commandline())
             ^^^^^^^^^^^^^^^^^
  File "/v/lib/python3.11/site-packages/horovod/runner/gloo_run.py", line 284, in launch_gloo
    raise RuntimeError('Horovod detected that one or more processes exited with non-zero '
RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing the job to be terminated. The first process to do so was:
Process name: 0
Exit code: 3

after
"""
# what the filter shows of it: the controller's traceback, its RuntimeError line and the blank
# after its message go; everything else stays
HOROVODRUN_FAILED_SHOWN = RANK_LINES + "Process name: 0\nExit code: 3\nafter\n"


def _filtered(text: str) -> str:
    f = horovodrun_output.LauncherTracebackFilter()
    shown = [ln for line in text.splitlines(keepends=True) for ln in f.feed(line)]
    return "".join(shown + f.flush())


def test_horovodrun_traceback_is_dropped_and_every_other_line_kept():
    """15 lines (the traceback, the RuntimeError line, a blank) go; horovodrun's naming of the
    first failed process stays."""
    assert _filtered(HOROVODRUN_FAILED) == HOROVODRUN_FAILED_SHOWN


def test_mpirun_controller_traceback_is_dropped():
    text = ("Traceback (most recent call last):\n  File \"h\", line 1, in <module>\n"
            "RuntimeError: mpirun failed with exit code 1\n")
    assert _filtered(text) == ""


@pytest.mark.parametrize("text", [
    # another failure of horovodrun itself: its traceback is the only explanation, kept whole
    "Traceback (most recent call last):\n  File \"h\", line 655, in _run_static\n"
    "RuntimeError: could not connect to some hosts via ssh\n",
    # cut short at the end of the stream: shown as it is
    "Traceback (most recent call last):\n  File \"h\", line 1, in <module>\n",
])
def test_other_tracebacks_are_kept(text):
    assert _filtered(text) == text


SAFE_SHELL_EXEC = "/v/lib/python3.11/site-packages/horovod/runner/common/util/safe_shell_exec.py"
TEARDOWN_RACE = f"""\
Exception in thread Thread-1 (fn):
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
[1]<stderr>:Terminated
  File "{SAFE_SHELL_EXEC}", line 48, in terminate_executor_shell_and_children
    gone, alive = psutil.wait_procs(p.children(), timeout=GRACEFUL_TERMINATION_TIME_S)
  File "/v/lib/python3.11/site-packages/psutil/_pslinux.py", line 1, in wrapper
ProcessLookupError: [Errno 3] assumed

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "{SAFE_SHELL_EXEC}", line 48, in terminate_executor_shell_and_children
psutil.NoSuchProcess: process no longer exists (pid=7)
"""


def test_horovodrun_teardown_race_in_a_thread_is_dropped_with_the_controller_traceback():
    """The traceback horovodrun's rank helper prints when it loses a race with the rank's exit
    while stopping it goes, chained part included; a rank line arriving meanwhile is shown."""
    assert _filtered(TEARDOWN_RACE + HOROVODRUN_FAILED) == "[1]<stderr>:Terminated\n" + HOROVODRUN_FAILED_SHOWN
    assert _filtered(TEARDOWN_RACE) == "[1]<stderr>:Terminated\n"  # at the end of the stream too


def test_a_thread_traceback_elsewhere_is_kept_whole():
    text = ("Exception in thread Thread-3 (prefix_connection):\nTraceback (most recent call last):\n"
            f"  File \"{SAFE_SHELL_EXEC}\", line 120, in prefix_connection\n"
            "OSError: [Errno 9] Bad file descriptor\n\nlater line\n")
    assert _filtered(text) == text
    assert _filtered(text.removesuffix("later line\n")) == text.removesuffix("later line\n")  # at the end


# =========================================================================== B4: where to listen
def _resolver(table):
    def resolve(host):
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return table[host]
    return resolve


@pytest.mark.parametrize("workers, index, table, expected", [
    (["localhost:1", "localhost:2"], 0, {}, (["127.0.0.1"], None)),
    (["127.0.0.1:1", "127.0.0.2:2"], 1, {}, (["127.0.0.2"], None)),
    (["[::1]:1", "[::1]:2"], 0, {}, (["::1"], None)),
    (["10.0.0.1:1", "10.0.0.2:1"], 1, {}, (["10.0.0.2"], None)),
    (["node1:1", "node2:1"], 0, {"node1": ["127.0.1.1", "10.0.0.1"]}, (["10.0.0.1"], None)),
    # Debian's /etc/hosts maps the machine's own name to 127.0.1.1: loopback only is fine when
    # every worker is on this machine...
    (["box:1", "box:2"], 0, {"box": ["127.0.1.1"]}, (["127.0.1.1"], None)),
    # ...but not when another host must reach it: every interface, saying why
    (["box:1", "node2:1"], 0, {"box": ["127.0.1.1"]},
     ([], "host 'box' resolves to 127.0.1.1 here, loopback only, but other hosts must reach it")),
    (["ghost:1", "node2:1"], 0, {},
     ([], "host 'ghost' does not resolve here (Name or service not known)")),
])
def test_listen_hosts(workers, index, table, expected):
    assert listen_hosts(workers, index, _resolver(table)) == expected


def test_local_rendezvous_listens_on_loopback_only():
    p0, p1 = free_ports(2)
    sock = cluster.bind_worker_port([f"localhost:{p0}", f"localhost:{p1}"], 0)
    try:
        assert sock.getsockname() == ("127.0.0.1", p0)
    finally:
        sock.close()


def test_an_address_not_of_this_machine_falls_back_to_every_interface_with_one_line():
    (p0,) = free_ports(1)
    said = []
    # 192.0.2.1 (TEST-NET-1) is on no interface here: bind() fails with EADDRNOTAVAIL
    sock = cluster.bind_worker_port([f"192.0.2.1:{p0}", "192.0.2.77:1"], 0, say=said.append)
    try:
        assert sock.getsockname() == ("0.0.0.0", p0)
    finally:
        sock.close()
    assert said == [f"distbatch: worker 0: 192.0.2.1 is not an address of this machine (NAT?); its start-up "
                    f"rendezvous listens on every interface, port {p0}"]


# =========================================================================== B4: the secret
def _meet(workers, secrets_by_index, timeout=4.0):
    results = {}

    def one(i):
        try:
            results[i] = rendezvous(workers, i, timeout, say=lambda m: None, secret=secrets_by_index[i],
                                    env={})
        except Exception as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results


@pytest.mark.parametrize("secrets_by_index", [[SECRET, SECRET], [None, None]],
                         ids=["same secret", "no secret (hand-written TF_CONFIG): cluster hash"])
def test_workers_with_the_same_key_meet(secrets_by_index):
    workers = [f"localhost:{p}" for p in free_ports(2)]
    results = _meet(workers, secrets_by_index)
    assert all(isinstance(results[i], float) for i in (0, 1)), results


@pytest.mark.parametrize("mine, theirs, why", [
    (SECRET, OTHER_SECRET, "a distbatch worker of another job answers there (another "
                           "$DISTBATCH_CLUSTER_SECRET or TF_CONFIG cluster)"),
    (SECRET, None, "the worker there has no $DISTBATCH_CLUSTER_SECRET and this one has; give every "
                   "worker the same secret, or none"),
    (None, SECRET, "the worker there has $DISTBATCH_CLUSTER_SECRET and this one has no; give every "
                   "worker the same secret, or none"),
])
def test_a_worker_with_another_secret_is_not_taken_for_a_peer(mine, theirs, why):
    workers = [f"localhost:{p}" for p in free_ports(2)]
    # 3 s: under a loaded machine the peer's first answer (which gives the reason) took over 1.5 s
    results = _meet(workers, [mine, theirs], timeout=3.0)
    assert isinstance(results[0], ClusterSetupError), results
    assert str(results[0]) == (
        f"cluster set-up timed out after 3 s: worker 1 at {workers[1]} never came ({why}); start every "
        "worker with the same TF_CONFIG cluster, or raise cluster_timeout")


def test_the_secret_never_crosses_the_wire():
    """Both directions carry nonces and HMACs only: record every byte a listener receives."""
    p0, p1 = free_ports(2)
    workers = [f"localhost:{p0}", f"localhost:{p1}"]
    seen = []
    original = cluster._read_line

    def spy(conn, limit=256):
        line = original(conn, limit)
        seen.append(line)
        return line

    cluster._read_line = spy
    try:
        results = _meet(workers, [SECRET, SECRET])
    finally:
        cluster._read_line = original
    assert all(isinstance(results[i], float) for i in (0, 1)), results
    assert any(" proof " in ln for ln in seen) and any(" challenge secret " in ln for ln in seen)
    assert not any(SECRET in ln for ln in seen), seen


@pytest.mark.parametrize("value, message", [
    ("short", "$DISTBATCH_CLUSTER_SECRET must be at least 16 characters (e.g. python3 -c 'import secrets; "
              "print(secrets.token_hex(16))'), got 5 character(s)"),
])
def test_a_short_secret_is_one_line_without_its_value(value, message):
    with pytest.raises(UsageError) as e:
        cluster.resolve_secret({SECRET_ENV: value})
    assert str(e.value) == message and value not in str(e.value)
    assert cluster.resolve_secret({SECRET_ENV: ""}) is None and cluster.resolve_secret({}) is None


@pytest.fixture
def known_secret(monkeypatch):
    monkeypatch.setattr(launch_cli.secrets, "token_hex", lambda n=16: SECRET)
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_local_job_hands_each_worker_the_secret_and_prints_none(monkeypatch, capsys, known_secret):
    calls = []
    _fake_workers(monkeypatch, [(0, [])], calls)
    code, out, err = _cli(["launch", "multiworker", "--workers", "2", "--", "python", "t.py"], capsys)
    assert code == 0 and [env[SECRET_ENV] for env in calls[0]] == [SECRET, SECRET]
    assert SECRET not in out + err


def test_dry_run_shows_a_placeholder_not_the_secret(capsys, known_secret):
    code, out, err = _cli(["launch", "multiworker", "--workers", "2", "--port", "23456", "--dry-run", "--",
                           "python", "t.py"], capsys)
    assert code == 0 and SECRET not in out + err and SECRET_ENV not in out
    assert err.splitlines() == [
        "distbatch launch: --dry-run: each worker also gets DISTBATCH_CLUSTER_SECRET=<secret, not shown> "
        "(a random one made for each start; the workers' rendezvous key, docs/security.md)"]


def test_horovod_dry_run_hides_an_exported_secret(capsys, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    code, out, _ = _cli(["launch", "horovod", "-np", "2", "--horovodrun", "/v/bin/horovodrun", "--dry-run",
                         "--", "x"], capsys)
    assert code == 0 and SECRET not in out
    assert "#   DISTBATCH_CLUSTER_SECRET=<secret, not shown>" in out.splitlines()


def test_write_scripts_puts_one_secret_in_owner_only_scripts(tmp_path, capsys, known_secret):
    code, out, err = _cli(["launch", "multiworker", "--hosts", "10.0.0.1,10.0.0.2", "--write-scripts",
                           str(tmp_path), "--", "python", "t.py"], capsys)
    assert code == 0 and SECRET not in out + err
    for i in (0, 1):
        path = tmp_path / f"worker{i}.sh"
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert f"export {SECRET_ENV}={SECRET}\n" in path.read_text()
    assert out.splitlines()[-1] == ("each script holds the job's DISTBATCH_CLUSTER_SECRET and is readable by "
                                    "you only (mode 700): copy them with scp, never to a shared place")


def test_printed_host_commands_say_how_to_share_a_secret(capsys, known_secret):
    code, out, err = _cli(["launch", "multiworker", "--hosts", "10.0.0.1,10.0.0.2", "--", "python", "t.py"],
                          capsys)
    assert code == 0 and SECRET not in out + err and SECRET_ENV not in out
    assert err.splitlines() == [launch_cli.HOSTS_SECRET_NOTE]


def test_task_index_uses_the_exported_secret_or_says_it_falls_back(monkeypatch, capsys):
    calls = []
    _fake_workers(monkeypatch, [(0, []), (0, [])], calls)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    argv = ["launch", "multiworker", "--hosts", "10.0.0.1,10.0.0.2", "--task-index", "1", "--", "x"]
    code, out, err = _cli(argv, capsys)
    assert code == 0 and SECRET_ENV not in calls[0][0]
    assert err.splitlines() == [
        "distbatch launch: no DISTBATCH_CLUSTER_SECRET in this environment: the workers meet with a key anyone "
        "who knows the addresses can compute; export the same secret on every host (docs/security.md)"]
    monkeypatch.setenv(SECRET_ENV, OTHER_SECRET)  # inherited by the worker, not copied into its spec
    code, out, err = _cli(argv, capsys)
    assert code == 0 and err == "" and SECRET_ENV not in calls[1][0] and OTHER_SECRET not in out


def test_task_index_with_a_short_secret_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv(SECRET_ENV, "abc")
    code, out, err = _cli(["launch", "multiworker", "--hosts", "a,b", "--task-index", "0", "--", "x"], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1 and "abc" not in err
    assert err.startswith("distbatch: error: $DISTBATCH_CLUSTER_SECRET must be at least 16 characters")


def test_slurm_multiworker_script_makes_a_secret_at_run_time():
    text = launcher.slurm_script(nodes=2, gpus_per_node=0, backend="multiworker", command=["distbatch", "train"])
    assert 'export DISTBATCH_CLUSTER_SECRET="${DISTBATCH_CLUSTER_SECRET:-$(od -An -N16 -tx1 /dev/urandom ' \
           "| tr -d ' \\n')}\"" in text.splitlines()
    assert SECRET_ENV not in launcher.slurm_script(nodes=2, gpus_per_node=0, command=["distbatch", "train"])


def test_multiworker_specs_with_a_secret():
    specs = launcher.multiworker_specs(["a:1", "b:1"], ["x"], SECRET)
    assert [sorted(env) for env, _ in specs] == [["DISTBATCH_CLUSTER_SECRET", "TF_CONFIG"]] * 2
    assert {env[SECRET_ENV] for env, _ in specs} == {SECRET}


# =========================================================================== real processes (slow)
FAKE_DISTBATCH = textwrap.dedent("""\
    #!{py}
    # A stand-in `distbatch train` rank: records exit 3 like a diverged distbatch rank would.
    # Rank 1 records first and exits last, so horovodrun reports rank 0 first.
    import os, sys, time
    from distbatch.launch.supervisor import record_exit_code
    rank = int(os.environ["HOROVOD_RANK"])
    print("attempt", rank, " ".join(sys.argv[1:]), flush=True)
    if rank == 1:
        record_exit_code(3)
        time.sleep(1.5)
    else:
        time.sleep(0.5)
        record_exit_code(3)
    sys.exit(3)
""")


def _fake_distbatch(tmp_path) -> str:
    path = tmp_path / "bin" / "distbatch"
    path.parent.mkdir()
    path.write_text(FAKE_DISTBATCH.format(py=PY))
    path.chmod(0o755)
    return str(path)


def _env():
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.mark.slow
def test_real_horovod_divergence_is_not_restarted_and_described_one_way(tmp_path):
    pytest.importorskip("horovod")
    worker = _fake_distbatch(tmp_path)
    p = subprocess.run([os.path.join(BIN, "distbatch"), "launch", "horovod", "--gloo", "-np", "2",
                        "--max-restarts", "3", "--", worker, "train", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    assert len(re.findall(r"attempt 0", p.stdout)) == 1  # one attempt, no restart
    mine = [ln for ln in p.stderr.splitlines() if ln.startswith("distbatch launch:")]
    assert mine == [
        "distbatch launch: horovodrun failed with exit code 1",
        "distbatch launch: rank 1 exited first, with exit code 3; exiting with that status (horovodrun "
        "reported exit code 1)",
        "distbatch launch: not restarting: rank 1 failed with exit code 3 (the run diverged), which a restart "
        "from the checkpoint would repeat; exiting with status 3 (--restart-deterministic restarts anyway)"]
    assert "Traceback" not in p.stdout + p.stderr and "RuntimeError" not in p.stderr
    assert "Process 0 exit with status code 3." in p.stdout  # horovodrun's own lines stay
    assert re.search(r"^Process name: 0\nExit code: 3\n", p.stderr, re.M), p.stderr


@pytest.mark.slow
def test_real_horovod_restarts_back_off_and_name_the_same_rank(tmp_path):
    pytest.importorskip("horovod")
    worker = _fake_distbatch(tmp_path)
    (tmp_path / "o").mkdir()  # the run wrote something, so restarts add --resume
    (tmp_path / "o" / "config.json").write_text("{}")
    t0 = time.monotonic()
    p = subprocess.run([os.path.join(BIN, "distbatch"), "launch", "horovod", "--gloo", "-np", "2",
                        "--max-restarts", "2", "--restart-deterministic", "--restart-backoff", "1",
                        "--restart-backoff-max", "1.5", "--", worker, "train", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert p.returncode == 3, p.stdout + p.stderr
    assert re.findall(r"attempt 0 (.*)", p.stdout) == [f"train --out {tmp_path / 'o'}",
                                                        f"train --out {tmp_path / 'o'} --resume",
                                                        f"train --out {tmp_path / 'o'} --resume"]
    mine = [ln for ln in p.stderr.splitlines() if ln.startswith("distbatch launch:")]
    first = ("distbatch launch: rank 1 exited first, with exit code 3; exiting with that status (horovodrun "
             "reported exit code 1)")
    assert mine == [
        "distbatch launch: horovodrun failed with exit code 1", first,
        "distbatch launch: waiting 1 s before restart 1/2 (--restart-backoff 1 s, doubled at each restart, "
        "at most --restart-backoff-max 1.5 s)",
        "distbatch launch: restart 1/2: rank 1 failed with exit code 3; restarting all 2 workers with --resume "
        "from the start (no checkpoint yet)",
        "distbatch launch: horovodrun failed with exit code 1", first,
        "distbatch launch: waiting 1.5 s before restart 2/2 (--restart-backoff 1 s, doubled at each restart, "
        "at most --restart-backoff-max 1.5 s)",
        "distbatch launch: restart 2/2: rank 1 failed with exit code 3; restarting all 2 workers with --resume "
        "from the start (no checkpoint yet)",
        "distbatch launch: horovodrun failed with exit code 1", first,
        "distbatch launch: giving up after 2 restart(s)"]
    assert elapsed >= 2.5 and "Traceback" not in p.stderr


@pytest.mark.slow
def test_real_sigterm_to_launch_horovod_shows_no_horovodrun_traceback(tmp_path):
    pytest.importorskip("horovod")
    code = "import os, time; print('up', os.environ['HOROVOD_RANK'], flush=True); time.sleep(60)"
    p = subprocess.Popen([os.path.join(BIN, "distbatch"), "launch", "horovod", "--gloo", "-np", "2",
                          "--grace-seconds", "2", "--", PY, "-c", code],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        seen = [p.stdout.readline(), p.stdout.readline()]
        assert sorted(seen) == ["[0]<stdout>:up 0\n", "[1]<stdout>:up 1\n"], seen
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out + err
    assert "Traceback" not in out + err and "RuntimeError" not in err and '  File "' not in err
    assert "distbatch launch: received SIGTERM; stopping all workers (distbatch workers save a checkpoint " \
           "first)" in err.splitlines()


RENDEZVOUS_WORKER = textwrap.dedent("""\
    import json, os, sys
    from distbatch.backends.cluster import SECRET_ENV, rendezvous
    cfg = json.loads(os.environ["TF_CONFIG"])
    workers, index = cfg["cluster"]["worker"], cfg["task"]["index"]
    rendezvous(workers, index, 60)
    print("MET", index, "secret-chars", len(os.environ.get(SECRET_ENV, "")), flush=True)
""")


@pytest.mark.slow
def test_real_local_job_meets_with_a_secret_that_is_never_printed(tmp_path):
    script = tmp_path / "meet.py"
    script.write_text(RENDEZVOUS_WORKER)
    env = {k: v for k, v in _env().items() if k != SECRET_ENV}
    p = subprocess.run([os.path.join(BIN, "distbatch"), "launch", "multiworker", "--workers", "2", "--",
                        PY, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(p.stdout.splitlines()) == ["[rank 0] MET 0 secret-chars 32", "[rank 1] MET 1 secret-chars 32"]
    assert not re.search(r"[0-9a-f]{32}", p.stdout + p.stderr), p.stdout + p.stderr


def test_tensorflow_start_up_lines_are_dropped_unless_verbose():
    """horovodrun's own process and the ranks of a user's script print TensorFlow's start-up
    notices before TF_CPP_MIN_LOG_LEVEL applies; `distbatch launch` drops them (row: start-up
    lines silenced on every rank), `distbatch --verbose launch` keeps them."""
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796668971.522614   24347 port.cc:153] oneDNN custom operations are on. You may "
        "see slightly different numerical results.\n",
        "[1]<stderr>:I0000 00:00:1796665874.609638    4331 cpu_feature_guard.cc:227] This TensorFlow "
        "binary is optimized to use available CPU instructions in performance-critical operations.\n",
        "[1]<stderr>:To enable the following instructions: AVX2 AVX512F FMA, in other operations, "
        "rebuild TensorFlow with the appropriate compiler flags.\n",
        "[1,0]<stderr>:WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR\n",
    ]
    kept = ["[0]<stdout>:epoch 1 loss 0.5\n", "[0]<stderr>:W0000 a runtime warning stays\n",
            "I0000 a line that only starts alike stays\n"]
    quiet = horovodrun_output.LauncherTracebackFilter(quiet=True)
    assert [ln for line in noise + kept for ln in quiet.feed(line)] == kept
    verbose = horovodrun_output.LauncherTracebackFilter(quiet=False)
    assert [ln for line in noise + kept for ln in verbose.feed(line)] == noise + kept
