"""Never hang: cluster set-up deadline, signals inside TensorFlow's C++ waits, launcher attribution.

Fast tests use sockets, threads and tiny ``python -c`` programs (no
TensorFlow). The slow ones run the real `distbatch train --backend
multiworker` with a peer that never starts, and a diverging Horovod run.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import free_ports
from distbatch.launch import supervisor
from distbatch.backends import choose_backend
from distbatch.backends.strategy import parse_tf_config
from distbatch.backends.cluster import DEFAULT_CLUSTER_TIMEOUT, rendezvous, resolve_cluster_timeout
from distbatch.errors import ClusterSetupError, UsageError

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}




def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- TF_CONFIG
def tfc(cluster, task=None) -> str:
    return json.dumps({"cluster": cluster, "task": task or {"type": "worker", "index": 0}})


@pytest.mark.parametrize("raw, message", [
    (tfc({"worker": ["a:1", "b:2"], "ps": ["p:3"]}),
     "TF_CONFIG cluster has job(s) 'ps': distbatch runs MultiWorkerMirroredStrategy, whose cluster "
     "has only 'worker' (and optionally one 'chief'); parameter servers and evaluators are not supported"),
    (tfc({"worker": ["a:1"], "evaluator": ["e:1"]}), "TF_CONFIG cluster has job(s) 'evaluator'"),
    (tfc({"worker": "a:1"}), "TF_CONFIG cluster 'worker' must be a list of 'host:port' addresses, got 'a:1'"),
    (tfc({"worker": ["a:1", "b"]}), "TF_CONFIG: worker address must be host:port with a port in 1..65535, got 'b'"),
    (tfc({"worker": ["a:1", "b:0"]}), "got 'b:0'"),
    (tfc({"worker": ["a:1", "b:99999"]}), "got 'b:99999'"),
    (tfc({"worker": ["a:1", 7]}), "TF_CONFIG: worker address must be a 'host:port' string, got 7"),
    (tfc({"worker": ["a:1", "a:1"]}), "TF_CONFIG cluster names 'a:1' more than once"),
    (tfc({"chief": ["c:1", "d:1"], "worker": ["a:1"]}), "TF_CONFIG cluster 'chief' must have at most one address"),
    (tfc({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": True}), "TF_CONFIG task index True is out of range"),
    (tfc({"worker": ["a:1", "b:1"]}, {"type": "ps", "index": 0}), "task type must be 'worker' or 'chief', got 'ps'"),
    ("[" * 100000, "TF_CONFIG is not valid JSON"),
    ('{"cluster": 5, "task": {}}', "TF_CONFIG needs 'cluster' and 'task' objects"),
])
def test_tf_config_refuses_other_jobs_and_malformed_values(raw, message):
    with pytest.raises(UsageError) as e:
        parse_tf_config(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cluster", [{"worker": ["a:1"], "ps": ["p:1"]}, {"worker": ["a:1"], "evaluator": ["e:1"]}])
def test_auto_backend_sends_a_ps_cluster_to_multiworker_which_refuses_it(cluster):
    """A 1-worker TF_CONFIG with a ps job used to pick `single` and run, ignoring the ps job."""
    name, reason = choose_backend({"TF_CONFIG": tfc(cluster)}, 0)
    assert name == "multiworker" and "TF_CONFIG names job(s)" in reason


# --------------------------------------------------------------------------- timeout value
def test_cluster_timeout_from_flag_env_or_default():
    assert resolve_cluster_timeout(None, {}) == DEFAULT_CLUSTER_TIMEOUT == 120
    assert resolve_cluster_timeout(None, {"DISTBATCH_CLUSTER_TIMEOUT": "7.5"}) == 7.5
    assert resolve_cluster_timeout(3, {"DISTBATCH_CLUSTER_TIMEOUT": "7.5"}) == 3.0


@pytest.mark.parametrize("flag, env, message", [
    (0.0, {}, "cluster_timeout must be a number of seconds > 0, got 0.0"),
    (-1.0, {}, "cluster_timeout must be a number of seconds > 0, got -1.0"),
    (float("nan"), {}, "cluster_timeout must be a number of seconds > 0, got nan"),
    (float("inf"), {}, "cluster_timeout must be a number of seconds > 0, got inf"),
    (None, {"DISTBATCH_CLUSTER_TIMEOUT": "soon"},
     "$DISTBATCH_CLUSTER_TIMEOUT must be a number of seconds > 0, got 'soon'"),
])
def test_bad_cluster_timeouts_are_one_line(flag, env, message):
    with pytest.raises(UsageError) as e:
        resolve_cluster_timeout(flag, env)
    assert str(e.value) == message


# --------------------------------------------------------------------------- rendezvous
def _meet(workers, index, timeout, results, delay=0.0):
    time.sleep(delay)
    try:
        results[index] = rendezvous(workers, index, timeout, say=lambda m: None)
    except Exception as e:  # noqa: BLE001 - reported by the test
        results[index] = e


def test_rendezvous_three_workers_one_starting_late():
    workers = [f"localhost:{p}" for p in free_ports(3)]
    results = {}
    threads = [threading.Thread(target=_meet, args=(workers, i, 20, results, 1.5 if i == 2 else 0))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(results[i], float) for i in range(3)), results
    assert results[0] >= 1.0  # worker 0 really waited for the late one
    # every listener is closed: the ports are free again for TensorFlow
    for w in workers:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(w.rpartition(":")[2])))
        s.close()


def test_rendezvous_names_the_worker_that_never_came():
    p0, p1 = free_ports(2)
    workers = [f"localhost:{p0}", f"localhost:{p1}"]
    t0 = time.monotonic()
    with pytest.raises(ClusterSetupError) as e:
        rendezvous(workers, 0, 1.0, say=lambda m: None)
    assert time.monotonic() - t0 < 4
    assert str(e.value) == (
        f"cluster set-up timed out after 1 s: worker 1 at localhost:{p1} never came (nothing accepts "
        "connections there); start every worker with the same TF_CONFIG cluster, or raise cluster_timeout")


def test_rendezvous_does_not_mistake_another_program_for_a_worker():
    p0, p1 = free_ports(2)
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stranger.bind(("127.0.0.1", p1))
    stranger.listen(8)

    def serve():
        while True:
            try:
                c, _ = stranger.accept()
            except OSError:
                return
            c.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(ClusterSetupError, match=rf"worker 1 at localhost:{p1} never came \(something "
                                                    r"else answers on that port"):
            rendezvous([f"localhost:{p0}", f"localhost:{p1}"], 0, 1.0, say=lambda m: None)
    finally:
        stranger.close()


def test_rendezvous_port_in_use_is_one_line():
    blocker = socket.socket()
    blocker.bind(("", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        with pytest.raises(UsageError, match=rf"cannot listen on this worker's address 'localhost:{port}' "
                                             rf"from the cluster spec: port {port} is already in use"):
            rendezvous([f"localhost:{port}", "localhost:1"], 0, 1.0)
    finally:
        blocker.close()


def test_rendezvous_says_what_it_waits_for():
    p0, p1 = free_ports(2)
    said = []
    import distbatch.backends.cluster as cluster
    old, cluster.WAITING_NOTICE_AFTER = cluster.WAITING_NOTICE_AFTER, 0.3
    try:
        with pytest.raises(ClusterSetupError):
            rendezvous([f"localhost:{p0}", f"localhost:{p1}"], 0, 1.0, say=said.append)
    finally:
        cluster.WAITING_NOTICE_AFTER = old
    assert said == [f"distbatch: worker 0 waiting for worker 1 at localhost:{p1} "
                    "(gives up after cluster_timeout 1 s)"]


# --------------------------------------------------------------------------- signals
BLOCKED = textwrap.dedent("""
    import ctypes, os, sys, time
    from distbatch import interrupts
    interrupts.install(grace_seconds=1)
    print("READY", os.getpid(), interrupts._watchdog.pid, flush=True)
    try:
        if sys.argv[1] == "c":  # C code holding the GIL and resuming after signals, like TF's waits
            import signal
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.siginterrupt(s, False)  # SA_RESTART: read() goes on blocking
            r, w = os.pipe()
            ctypes.PyDLL(None).read(r, ctypes.create_string_buffer(1), 1)
        else:
            time.sleep(60)
    except KeyboardInterrupt as e:
        print("UNWOUND", type(e).__name__, flush=True)
        interrupts.exit_now_if_installed(128 + getattr(e, "signum", 2))
""")


def _start_blocked(mode):
    p = subprocess.Popen([PY, "-c", BLOCKED, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    ready = p.stdout.readline().split()
    assert ready[:1] == ["READY"], (ready, p.stderr.read() if p.poll() is not None else "")
    time.sleep(0.3)  # the watchdog process is up and reading
    return p, int(ready[2])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_c_code_holds_the_gil_kills_within_grace(sig):
    p, watchdog = _start_blocked("c")
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        code = p.wait(timeout=10)
    finally:
        p.kill()
    elapsed = time.monotonic() - t0
    assert code == -signal.SIGKILL and 0.9 < elapsed < 4, (code, elapsed)
    assert p.stderr.read() == (f"distbatch: {signal.Signals(sig).name} received but TensorFlow did not "
                               "return within 1 s (blocked in C++ code, e.g. waiting for another worker); "
                               f"killing process {p.pid}\n")
    time.sleep(0.3)
    assert not alive(watchdog)


@pytest.mark.parametrize("sig, name, code", [(signal.SIGTERM, "Terminated", 143),
                                             (signal.SIGINT, "KeyboardInterrupt", 130)])
def test_signal_in_python_unwinds_and_the_watchdog_leaves(sig, name, code):
    p, watchdog = _start_blocked("py")
    t0 = time.monotonic()
    p.send_signal(sig)
    assert p.wait(timeout=10) == code
    assert time.monotonic() - t0 < 0.9  # before the grace: the watchdog did not have to act
    assert p.stdout.read() == f"UNWOUND {name}\n" and p.stderr.read() == ""
    time.sleep(0.3)
    assert not alive(watchdog)


# --------------------------------------------------------------------------- launcher attribution
@pytest.mark.parametrize("codes, states, failed, expected", [
    ([1, None], [None, "T"], 0, (1, "was stopped (SIGSTOP or SIGTSTP)")),
    ([1, -9], [None, None], 0, (1, "failed with signal 9 (SIGKILL)")),
    ([1, 143], [None, None], 0, (1, "failed with exit code 143 (SIGTERM)")),
    ([None, 1], ["S", None], 1, (1, "failed with exit code 1")),
    ([3, None, None], [None, "S", "R"], 0, (0, "failed with exit code 3")),
])
def test_root_cause_table(codes, states, failed, expected):
    assert supervisor.root_cause(codes, states, failed) == expected


def test_stopped_rank_is_named_not_the_peer_that_then_failed():
    """Rank 1 stops itself (SIGSTOP); rank 0 then fails like a collective would: name rank 1."""
    worker = textwrap.dedent("""
        import os, signal, sys, time
        print("PID", os.getpid(), flush=True)
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(1.5)
        sys.exit(1)
    """)
    specs = supervisor.rank_specs([({"RANK": str(i)}, [PY, "-c", worker]) for i in range(2)])
    out, err = io.StringIO(), io.StringIO()
    code = supervisor.run_workers(specs, stdout=out, stderr=err, grace_seconds=1)
    assert code == 1
    assert err.getvalue().splitlines()[-1] == (
        "distbatch launch: rank 1 was stopped (SIGSTOP or SIGTSTP); rank 0 then failed with exit "
        "code 1; stopping the other 1 worker(s)")
    pids = [int(m) for m in re.findall(r"PID (\d+)", out.getvalue())]
    time.sleep(0.2)
    assert len(pids) == 2 and not any(alive(p) for p in pids)


def test_launcher_returns_the_first_failed_ranks_own_status():
    """horovodrun exits 1 whatever its ranks did; the ranks' recorded statuses win."""
    fake = textwrap.dedent("""
        import os, sys, time
        from distbatch.launch.supervisor import record_exit_code
        d = os.environ["DISTBATCH_EXIT_DIR"]
        record_exit_code(0, {"DISTBATCH_EXIT_DIR": d, "HOROVOD_RANK": "0"})
        record_exit_code(3, {"DISTBATCH_EXIT_DIR": d, "HOROVOD_RANK": "1"})
        time.sleep(0.01)
        record_exit_code(1, {"DISTBATCH_EXIT_DIR": d, "OMPI_COMM_WORLD_RANK": "2"})
        sys.exit(1)
    """)
    err = io.StringIO()
    code = supervisor.run_launcher([PY, "-c", fake], stdout=io.StringIO(), stderr=err, grace_seconds=1)
    assert code == 3
    assert err.getvalue().splitlines()[-1] == (
        "distbatch launch: rank 1 exited first, with exit code 3; exiting with that status "
        f"({os.path.basename(PY)} reported exit code 1)")
    # nothing recorded (not a distbatch rank): the launcher's own status, no extra line
    err = io.StringIO()
    assert supervisor.run_launcher([PY, "-c", "import sys; sys.exit(4)"], stdout=io.StringIO(),
                                   stderr=err, grace_seconds=1) == 4
    assert "exited first" not in err.getvalue()


# --------------------------------------------------------------------------- real TensorFlow (slow)
def _absent_peer_train(tmp_path, *extra):
    p0, p1 = free_ports(2)
    env = {**ENV, "TF_CONFIG": tfc({"worker": [f"localhost:{p0}", f"localhost:{p1}"]})}
    argv = [str(Path(PY).parent / "distbatch"), "train", "--backend", "multiworker", "--train-size", "256",
            "--val-size", "64", "--global-batch-size", "32", "--steps", "4", "--out", str(tmp_path / "out"),
            *extra]
    return p1, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_real_multiworker_absent_peer_times_out_naming_it(tmp_path):
    p1, p = _absent_peer_train(tmp_path, "--cluster-timeout", "6")
    t0 = time.monotonic()
    try:
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 1, err
    lines = err.splitlines()
    assert lines[-1] == (f"distbatch: error: cluster set-up timed out after 6 s: worker 1 at localhost:{p1} "
                         "never came (nothing accepts connections there); start every worker with the same "
                         "TF_CONFIG cluster, or raise --cluster-timeout"), err
    assert lines[:-1] == [f"distbatch: worker 0 waiting for worker 1 at localhost:{p1} "
                          "(gives up after --cluster-timeout 6 s)"], err
    assert time.monotonic() - t0 < 6 + 60  # start-up (TF import) + the timeout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "distbatch: stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "distbatch: interrupted")])
def test_real_multiworker_waiting_for_a_peer_stops_on_signal(tmp_path, sig, code, line):
    _, p = _absent_peer_train(tmp_path, "--cluster-timeout", "300")
    try:
        first = p.stderr.readline()  # the waiting notice: it is in the rendezvous now
        assert "waiting for worker 1" in first, first
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == code and elapsed < 10, (p.returncode, elapsed)
    assert p.stderr.read().splitlines() == [line]


@pytest.mark.slow
def test_real_horovod_divergence_exits_3(tmp_path):
    pytest.importorskip("horovod.tensorflow")
    distbatch = str(Path(PY).parent / "distbatch")
    p = subprocess.run([distbatch, "launch", "horovod", "--gloo", "-np", "2", "--", distbatch, "train",
                        "--backend", "horovod", "--train-size", "256", "--val-size", "64",
                        "--global-batch-size", "32", "--base-lr", "1e6", "--warmup", "none", "--decay",
                        "constant", "--steps", "10", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-3000:]
    assert re.search(r"^distbatch launch: rank [01] exited first, with exit code 3; exiting with that "
                     r"status \(horovodrun reported exit code 1\)$", p.stderr, re.M), p.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["diverged"] is True
