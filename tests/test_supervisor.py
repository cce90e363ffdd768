"""The local-process supervisor: rank prefixes, fail fast, bounded shutdown, no leftovers.

Workers are tiny ``python -c`` programs, so these tests need no TensorFlow and
take a few seconds. The slow test at the end runs a real 2-worker
MultiWorkerMirroredStrategy allreduce through ``distbatch launch multiworker``.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distbatch.launch import supervisor
from distbatch.launch.supervisor import rank_specs, run_single, run_workers

PY = sys.executable
REPO = str(Path(__file__).resolve().parents[1])


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def run(specs, **kw):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    code = run_workers(specs, stdout=out, stderr=err, **kw)
    return code, out.getvalue(), err.getvalue(), time.monotonic() - t0


def test_output_lines_prefixed_by_rank_and_stream():
    specs = rank_specs([({"WHO": str(i)}, py("""
        import os, sys
        print("hello", os.environ["WHO"])
        print("warn", os.environ["WHO"], file=sys.stderr)
        sys.stdout.write("no newline at end")
    """)) for i in range(3)])
    code, out, err, _ = run(specs)
    assert code == 0
    assert sorted(out.splitlines()) == sorted(
        [f"[rank {i}] hello {i}" for i in range(3)] + [f"[rank {i}] no newline at end" for i in range(3)])
    assert sorted(err.splitlines()) == [f"[rank {i}] warn {i}" for i in range(3)]


def _pids(out: str) -> list[int]:
    return [int(p) for p in re.findall(r"PIDS (\d+) (\d+)", out)[0]]


def test_failing_rank_stops_the_others_and_is_named(tmp_path):
    """Rank 1 exits 3 after rank 0 (and rank 0's own child) are up; rank 0 would sleep forever."""
    ready = tmp_path / "ready"
    sleeper = py(f"""
        import os, subprocess, sys, time, pathlib
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        print("PIDS", os.getpid(), child.pid, flush=True)
        pathlib.Path({str(ready)!r}).write_text("x")
        time.sleep(1000)
    """)
    failer = py(f"""
        import pathlib, sys, time
        while not pathlib.Path({str(ready)!r}).exists():
            time.sleep(0.05)
        sys.exit(3)
    """)
    code, out, err, elapsed = run(rank_specs([({}, sleeper), ({}, failer)]), grace_seconds=2.0)
    assert code == 3
    assert "distbatch launch: rank 1 failed with exit code 3; stopping the other 1 worker(s)" in err.splitlines()
    assert elapsed < 60
    assert elapsed < 15      # SIGTERM ends the sleeper at once; bound is grace + polling
    worker, grandchild = _pids(out)
    time.sleep(0.2)
    assert not alive(worker) and not alive(grandchild)


def test_worker_ignoring_sigterm_is_killed_after_grace(tmp_path):
    ready = tmp_path / "ready"
    stubborn = py(f"""
        import os, signal, time, pathlib
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("PIDS", os.getpid(), os.getpid(), flush=True)
        pathlib.Path({str(ready)!r}).write_text("x")
        while True:
            time.sleep(1)
    """)
    failer = py(f"""
        import pathlib, sys, time
        while not pathlib.Path({str(ready)!r}).exists():
            time.sleep(0.05)
        sys.exit(1)
    """)
    code, out, err, elapsed = run(rank_specs([({}, stubborn), ({}, failer)]), grace_seconds=1.0)
    assert code == 1 and "rank 1 failed with exit code 1" in err
    assert 1.0 <= elapsed < 15    # waited the grace period, then SIGKILL
    assert not alive(_pids(out)[0])


def test_worker_killed_by_signal_gives_128_plus_signal():
    specs = rank_specs([({}, py("import time; time.sleep(1000)")),
                        ({}, py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))])
    code, _, err, elapsed = run(specs, grace_seconds=1.0)
    assert code == 128 + 9
    assert "rank 1 failed with signal 9 (SIGKILL)" in err
    assert elapsed < 15


def test_missing_program_is_127_and_names_the_rank():
    specs = rank_specs([({}, py("import time; time.sleep(1000)")), ({}, ["/nonexistent/prog"])])
    code, _, err, elapsed = run(specs, grace_seconds=1.0)
    assert code == 127
    assert "rank 1 could not start '/nonexistent/prog'" in err
    assert elapsed < 15


def test_run_single_forwards_code_without_prefix():
    out, err = io.StringIO(), io.StringIO()
    code = run_single(py("print('[1,0]<stdout>:kept'); raise SystemExit(5)"), stdout=out, stderr=err)
    assert code == 5
    assert out.getvalue() == "[1,0]<stdout>:kept\n"
    assert err.getvalue().startswith("distbatch launch: python")   # named by its program
    assert "failed with exit code 5" in err.getvalue()


def test_run_single_unset_env_removes_variables(monkeypatch):
    monkeypatch.setenv("DBT_GONE", "1")
    monkeypatch.setenv("DBT_KEPT", "2")
    out = io.StringIO()
    code = run_single(py("import os; print(os.environ.get('DBT_GONE'), os.environ.get('DBT_KEPT'))"),
                      unset_env=["DBT_GONE"], stdout=out, stderr=io.StringIO())
    assert code == 0 and out.getvalue() == "None 2\n"


def test_describe_and_shell_codes():
    assert supervisor.describe_exit(3) == "exit code 3"
    assert supervisor.describe_exit(-15) == "signal 15 (SIGTERM)"
    assert supervisor.shell_exit_code(-15) == 143 and supervisor.shell_exit_code(2) == 2


# --------------------------------------------------------------------------- through the CLI
def _launcher_env():
    return {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}


def test_cli_multiworker_local_gives_each_rank_its_tf_config():
    worker = ("import json, os; c = json.loads(os.environ['TF_CONFIG']); "
              "print('CFG', json.dumps(c, sort_keys=True))")
    p = subprocess.run([PY, "-m", "distbatch.cli.launch", "launch", "multiworker", "--workers", "2",
                        "--port", "31000", "--", PY, "-c", worker],
                       capture_output=True, text=True, env=_launcher_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    got = {}
    for line in p.stdout.splitlines():
        m = re.fullmatch(r"\[rank (\d)\] CFG (.*)", line)
        got[int(m.group(1))] = json.loads(m.group(2))
    for i in (0, 1):
        assert got[i] == {"cluster": {"worker": ["localhost:31000", "localhost:31001"]},
                          "task": {"index": i, "type": "worker"}}


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_on_launcher_stops_all_workers(sig, expected):
    worker = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(1000)"
    p = subprocess.Popen([PY, "-m", "distbatch.cli.launch", "launch", "multiworker", "--workers", "2",
                          "--grace-seconds", "2", "--", PY, "-c", worker],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_launcher_env())
    pids = []
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        line = p.stdout.readline()
        m = re.search(r"\] PID (\d+)", line)
        if m:
            pids.append(int(m.group(1)))
    assert len(pids) == 2
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        code = p.wait(timeout=30)
    finally:
        p.kill()
    assert code == expected
    assert time.monotonic() - t0 < 15
    assert "stopping all workers" in p.stderr.read()
    time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)


# --------------------------------------------------------------------------- real TF (slow)
MWMS_SCRIPT = textwrap.dedent("""
    import json, os
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    def step():
        ctx = tf.distribute.get_replica_context()
        x = tf.constant([index + 1.0, 10.0 * (index + 1)])
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)
    out = strategy.experimental_local_results(strategy.run(tf.function(step)))[0]
    print("RESULT", index, strategy.num_replicas_in_sync, out.numpy().tolist(), flush=True)
""")


@pytest.mark.slow
def test_real_multiworker_allreduce_two_local_workers(tmp_path):
    pytest.importorskip("tensorflow")
    script = tmp_path / "mwms.py"
    script.write_text(MWMS_SCRIPT)
    p = subprocess.run([PY, "-m", "distbatch.cli.launch", "launch", "multiworker", "--workers", "2",
                        "--", PY, str(script)], capture_output=True, text=True, timeout=240,
                       env={**_launcher_env(), "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    # workers hold [1, 10] and [2, 20]: both must see the sum [3, 30] over 2 replicas
    results = sorted(re.findall(r"^\[rank (\d)\] RESULT (\d) (\d) (\[.*\])$", p.stdout, re.M))
    assert results == [("0", "0", "2", "[3.0, 30.0]"), ("1", "1", "2", "[3.0, 30.0]")], p.stdout


def _netns_pair(tag: str):
    """Two network namespaces joined by a veth pair; returns [(ns, ip), (ns, ip)] or skips."""
    if os.geteuid() != 0:
        pytest.skip("needs root for 'ip netns add' (network namespaces)")
    names = [f"dbt{tag}a", f"dbt{tag}b"]
    ips = ["10.213.7.1", "10.213.7.2"]
    made = []
    try:
        for ns in names:
            r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"'ip netns add' not permitted here: {r.stderr.strip()}")
            made.append(ns)
        cmds = [["ip", "link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1",
                 "netns", names[1]]]
        for ns, dev, ip in zip(names, ("veth0", "veth1"), ips):
            cmds += [["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev],
                     ["ip", "-n", ns, "link", "set", dev, "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"{' '.join(c)!r} failed: {r.stderr.strip()}")
    except BaseException:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        raise
    return made, ips


@pytest.fixture
def netns_pair():
    names, ips = _netns_pair(str(os.getpid()))
    yield list(zip(names, ips))
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_real_multiworker_across_two_network_namespaces(tmp_path, netns_pair):
    """Multi-host without hosts: worker i runs in namespace i and reaches the other over a veth pair.

    Worker 0 uses ``--task-index 0`` (supervised, prefixed); worker 1 runs the
    script written by ``--write-scripts`` exactly as a user would on host 2.
    """
    pytest.importorskip("tensorflow")
    (ns0, ip0), (ns1, ip1) = netns_pair
    script = tmp_path / "mwms.py"
    script.write_text(MWMS_SCRIPT)
    env = {k: v for k, v in _launcher_env().items() if "proxy" not in k.lower()}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    launch = [PY, "-m", "distbatch.cli.launch", "launch", "multiworker", "--hosts", f"{ip0},{ip1}",
              "--port", "23456"]
    subprocess.run(launch + ["--write-scripts", str(tmp_path / "hosts"), "--", PY, str(script)],
                   check=True, capture_output=True, env=env)
    w0 = subprocess.Popen(["ip", "netns", "exec", ns0, *launch, "--task-index", "0", "--", PY, str(script)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    w1 = subprocess.Popen(["ip", "netns", "exec", ns1, "bash", str(tmp_path / "hosts" / "worker1.sh")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        out0, err0 = w0.communicate(timeout=240)
        out1, err1 = w1.communicate(timeout=60)
    finally:
        for w in (w0, w1):
            if w.poll() is None:
                w.kill()
    assert w0.returncode == 0 and w1.returncode == 0, out0 + err0 + out1 + err1
    assert re.search(r"^\[rank 0\] RESULT 0 2 \[3\.0, 30\.0\]$", out0, re.M), out0 + err0
    assert re.search(r"^RESULT 1 2 \[3\.0, 30\.0\]$", out1, re.M), out1 + err1


@pytest.mark.slow
def test_real_training_across_two_network_namespaces(tmp_path, netns_pair, dataset_cache):
    """`distbatch train --backend multiworker` with one worker per namespace ends with the weights
    of a single-device run at the same global batch."""
    from conftest import DISTBATCH, load_weights, max_weight_diff, run_cli
    (ns0, ip0), (ns1, ip1) = netns_pair
    args = ["train", "--dataset", "mnist1d", "--train-size", "520", "--val-size", "203",
            "--global-batch-size", "64", "--steps", "12", "--seed", "3"]
    run_cli([*args, "--backend", "single", "--out", str(tmp_path / "single")])
    env = {k: v for k, v in _launcher_env().items() if "proxy" not in k.lower()}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    launch = [DISTBATCH, "launch", "multiworker", "--hosts", f"{ip0},{ip1}", "--port", "23457"]
    worker = [DISTBATCH, *args, "--backend", "multiworker", "--out", str(tmp_path / "mw")]
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, *launch, "--task-index", str(i), "--", *worker],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i, ns in enumerate((ns0, ns1))]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert max_weight_diff(load_weights(tmp_path / "mw"), load_weights(tmp_path / "single")) < 1e-5
