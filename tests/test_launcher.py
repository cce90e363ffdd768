"""Launch command builders as exact argument lists, and the `distbatch launch` CLI.

Fast tests build commands and scripts and compare them word for word; the two
slow tests run real 2-process jobs (horovodrun --gloo, mpirun) on localhost
and check the allreduced VALUES each rank prints.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distbatch.cli import launch as launch_cli
from distbatch.launch import launcher
from distbatch.errors import UsageError

HVD = "/v/bin/horovodrun"
CMD = ["python", "x.py"]
# `distbatch launch` resolves a bare distbatch/python in the worker command next to the
# running interpreter (the venv), which need not be on PATH.
BIN = os.path.dirname(sys.executable)


# --------------------------------------------------------------------------- horovodrun
def test_horovod_issue_example_exact():
    assert launcher.horovod_command(np=2, hosts="localhost:2", gloo=True, command=CMD, executable=HVD) == \
        [HVD, "-np", "2", "-H", "localhost:2", "--gloo", "python", "x.py"]


def test_horovod_defaults_to_localhost_slots_and_drops_leading_dashdash():
    assert launcher.horovod_command(np=3, command=["--", "python", "-c", "pass"], executable=HVD) == \
        [HVD, "-np", "3", "-H", "localhost:3", "python", "-c", "pass"]


def test_horovod_every_flag_in_order():
    argv = launcher.horovod_command(
        np=8, hosts="a:4,b:4", mpi=True, network_interface="eth0,eth1", fusion_threshold_mb=64,
        cycle_time_ms=2.5, timeline_filename="/tmp/t.json", autotune=True, start_timeout=120,
        output_filename="logs", command=CMD, executable=HVD)
    assert argv == [HVD, "-np", "8", "-H", "a:4,b:4", "--mpi", "--network-interfaces", "eth0,eth1",
                    "--fusion-threshold-mb", "64", "--cycle-time-ms", "2.5",
                    "--timeline-filename", "/tmp/t.json", "--autotune", "--start-timeout", "120",
                    "--output-filename", "logs", "python", "x.py"]


def test_horovod_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=4\nnode2 slots=4\n")
    assert launcher.parse_hostfile(hf, strict=True) == [("node1", 4), ("node2", 4)]
    assert launcher.horovod_command(np=8, hostfile=str(hf), command=CMD, executable=HVD) == \
        [HVD, "-np", "8", "--hostfile", str(hf), "python", "x.py"]
    with pytest.raises(UsageError, match=r"provides 8 slot\(s\) but -np is 9"):
        launcher.horovod_command(np=9, hostfile=str(hf), command=CMD, executable=HVD)


def test_hostfile_open_mpi_forms_and_horovod_strictness(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\na slots=2 max_slots=4\n\nb   # one slot\n")
    assert launcher.parse_hostfile(hf) == [("a", 2), ("b", 1)]
    assert launcher.mpirun_command(np=3, hostfile=str(hf), command=CMD, env={}, bind_to_none=False) == \
        ["mpirun", "-np", "3", "--hostfile", str(hf), "--tag-output", "python", "x.py"]
    # horovodrun's parser would crash on the comment line: reject it, naming the line
    with pytest.raises(UsageError, match=r"line 1: expected 'host slots=N'.*got '# cluster'"):
        launcher.horovod_command(np=3, hostfile=str(hf), command=CMD, executable=HVD)
    hf.write_text("a slots=two\n")
    with pytest.raises(UsageError, match=r"line 1: .*got 'a slots=two'"):
        launcher.parse_hostfile(hf)
    hf.write_text("\n# nothing\n")
    with pytest.raises(UsageError, match="lists no hosts"):
        launcher.parse_hostfile(hf)


@pytest.mark.parametrize("kwargs, match", [
    (dict(np=0), r"-np must be an integer >= 1, got 0"),
    (dict(np=-2), r"got -2"),
    (dict(np=2, hosts="localhost"), r"host:slots.*'localhost'"),
    (dict(np=2, hosts="a:x"), r"'a:x'"),
    (dict(np=2, hosts="a:0"), r"'a:0'"),
    (dict(np=2, hosts="a:1,:1"), r"':1'"),
    (dict(np=5, hosts="a:2,b:2"), r"provides 4 slot\(s\) but -np is 5"),
    (dict(np=2, gloo=True, mpi=True), r"--gloo and --mpi"),
    (dict(np=2, command=[]), r"missing COMMAND"),
    (dict(np=2, command=["--"]), r"missing COMMAND"),
    (dict(np=2, hostfile="/nonexistent/hosts"), r"--hostfile not found: '/nonexistent/hosts'"),
    (dict(np=2, hosts="a:2", hostfile="/x"), r"not both"),
    (dict(np=2, cycle_time_ms=0), r"--cycle-time-ms must be a number of milliseconds in \(0, 60000\], got 0"),
    (dict(np=2, cycle_time_ms=float("nan")), r"--cycle-time-ms .*got nan"),
    (dict(np=2, cycle_time_ms=float("inf")), r"--cycle-time-ms .*got inf"),
    (dict(np=2, hosts="a b:2"), r"-H entry 'a b:2': host must be a host name or IP address"),
    (dict(np=2, fusion_threshold_mb=-1), r"--fusion-threshold-mb must be an integer >= 0 .*got -1"),
    (dict(np=2, fusion_threshold_mb=1.5), r"got 1.5"),
    (dict(np=2, start_timeout=0), r"--start-timeout must be >= 1 second, got 0"),
])
def test_horovod_bad_inputs_name_the_value(kwargs, match):
    kwargs = {"command": CMD, "executable": HVD, **kwargs}
    with pytest.raises(UsageError, match=match):
        launcher.horovod_command(**kwargs)


def test_resolve_executable_prefers_the_venv(tmp_path, monkeypatch):
    fake_py = tmp_path / "bin" / "python"
    fake_py.parent.mkdir()
    fake_py.write_text("")
    tool = tmp_path / "bin" / "horovodrun"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_py))
    assert launcher.resolve_executable("horovodrun") == str(tool)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert launcher.resolve_executable("no-such-tool-xyz", required=False) == "no-such-tool-xyz"
    with pytest.raises(UsageError, match="'no-such-tool-xyz' not found"):
        launcher.resolve_executable("no-such-tool-xyz")


# --------------------------------------------------------------------------- mpirun
def test_mpirun_as_root_oversubscribed_with_exports():
    env = {"PATH": "/p", "PYTHONPATH": "/pp", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": "/root",
           "NCCL_DEBUG": "INFO", "HOROVOD_FUSION_THRESHOLD": "0"}
    argv = launcher.mpirun_command(np=4, command=CMD, is_root=True, local_cores=2, env=env,
                                   export=["MY_VAR"])
    assert argv == ["mpirun", "-np", "4", "--allow-run-as-root", "-H", "localhost:4", "--oversubscribe",
                    "--tag-output", "--bind-to", "none", "--map-by", "slot",
                    "-x", "PATH", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL",
                    "-x", "HOROVOD_FUSION_THRESHOLD", "-x", "NCCL_DEBUG", "-x", "MY_VAR",
                    "python", "x.py"]


def test_mpirun_non_root_within_cores_remote_hosts():
    argv = launcher.mpirun_command(np=4, hosts="n1:2,n2:2", command=CMD, is_root=False,
                                   local_cores=1, env={}, bind_to_none=False, executable="/usr/bin/mpirun")
    # remote hosts: never --oversubscribe (slots say how many run there)
    assert argv == ["/usr/bin/mpirun", "-np", "4", "-H", "n1:2,n2:2", "--tag-output", "python", "x.py"]


def test_mpirun_localhost_within_cores_no_oversubscribe():
    argv = launcher.mpirun_command(np=2, command=CMD, local_cores=2, env={"PATH": "/p"}, bind_to_none=False)
    assert argv == ["mpirun", "-np", "2", "-H", "localhost:2", "--tag-output", "-x", "PATH", "python", "x.py"]


def test_mpirun_bad_inputs():
    with pytest.raises(UsageError, match=r"-np must be an integer >= 1, got 0"):
        launcher.mpirun_command(np=0, command=CMD)
    with pytest.raises(UsageError, match=r"provides 1 slot\(s\) but -np is 2"):
        launcher.mpirun_command(np=2, hosts="a:1", command=CMD)
    with pytest.raises(UsageError, match="missing COMMAND"):
        launcher.mpirun_command(np=2, command=[])


# --------------------------------------------------------------------------- TF_CONFIG
def test_tf_config_exact_json():
    text = launcher.tf_config(["localhost:5000", "localhost:5001"], 1)
    assert text == ('{"cluster": {"worker": ["localhost:5000", "localhost:5001"]}, '
                    '"task": {"type": "worker", "index": 1}}')
    assert json.loads(text) == {"cluster": {"worker": ["localhost:5000", "localhost:5001"]},
                                "task": {"type": "worker", "index": 1}}
    with pytest.raises(UsageError, match="worker index must be in 0..1, got 2"):
        launcher.tf_config(["a:1", "b:1"], 2)


def test_local_worker_addresses_and_specs():
    addrs = launcher.local_worker_addresses(3, 20000)
    assert addrs == ["localhost:20000", "localhost:20001", "localhost:20002"]
    specs = launcher.multiworker_specs(addrs, ["--", "python", "t.py"])
    assert [argv for _, argv in specs] == [["python", "t.py"]] * 3
    for i, (env, _) in enumerate(specs):
        assert list(env) == ["TF_CONFIG"]
        assert json.loads(env["TF_CONFIG"]) == {"cluster": {"worker": addrs},
                                                "task": {"type": "worker", "index": i}}


@pytest.mark.parametrize("workers, port, match", [
    (2, 0, r"--port must be a TCP port in 1..65535, got 0"),
    (2, 70000, r"got 70000"),
    (2, 65535, r"got 65536"),          # the second worker would need 65536
    (0, 5000, r"--workers must be an integer >= 1, got 0"),
])
def test_local_worker_addresses_bad(workers, port, match):
    with pytest.raises(UsageError, match=match):
        launcher.local_worker_addresses(workers, port)


def test_host_worker_addresses():
    assert launcher.host_worker_addresses("h1,h2", 2222) == ["h1:2222", "h2:2222"]
    assert launcher.host_worker_addresses("h1:1,h1:2", 9) == ["h1:1", "h1:2"]
    with pytest.raises(UsageError, match=r"--workers 3 does not match the 2 host\(s\)"):
        launcher.host_worker_addresses("h1,h2", 2222, workers=3)
    with pytest.raises(UsageError, match=r"'h1:abc'"):
        launcher.host_worker_addresses("h1:abc", 2222)
    with pytest.raises(UsageError, match=r"same host:port twice"):
        launcher.host_worker_addresses("h1,h1", 2222)
    with pytest.raises(UsageError, match=r"got 'h1,'"):
        launcher.host_worker_addresses("h1,", 2222)


def test_env_command_line_and_host_script_quote_exactly():
    env = {"TF_CONFIG": launcher.tf_config(["a:1", "b:1"], 0)}
    line = launcher.env_command_line(env, ["python", "t.py", "--name", "a b"])
    assert line == ("TF_CONFIG='{\"cluster\": {\"worker\": [\"a:1\", \"b:1\"]}, \"task\": "
                    "{\"type\": \"worker\", \"index\": 0}}' python t.py --name 'a b'")
    script = launcher.host_script(env, ["python", "t.py"], host="a", index=0)
    out = subprocess.run(["bash", "-c", script.replace("exec python t.py", 'printf %s "$TF_CONFIG"')],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["task"] == {"type": "worker", "index": 0}


# --------------------------------------------------------------------------- Slurm
def test_slurm_horovod_script_text():
    text = launcher.slurm_script(nodes=2, gpus_per_node=4, command=["python", "-m", "distbatch", "train"],
                                 time="01:00:00", partition="gpu", job_name="bs4096")
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=bs4096", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                      "#SBATCH --gpus-per-node=4", "#SBATCH --time=01:00:00", "#SBATCH --partition=gpu",
                      "#SBATCH --output=%x-%j.out"]
    assert lines[-1] == "srun --ntasks-per-node=4 --kill-on-bad-exit=1 python -m distbatch train"
    assert "8 Horovod process(es)" in text


def test_slurm_multiworker_script_one_task_per_node():
    text = launcher.slurm_script(nodes=3, gpus_per_node=8, backend="multiworker", srun_mpi="pmix",
                                 command=["python", "t.py", "--out", "a b"])
    assert "#SBATCH --ntasks-per-node=1" in text.splitlines()
    assert "#SBATCH --gpus-per-node=8" in text.splitlines()
    assert "SlurmClusterResolver" in text
    assert text.splitlines()[-1] == "srun --mpi=pmix --ntasks-per-node=1 --kill-on-bad-exit=1 python t.py --out 'a b'"


def test_slurm_cpu_only_and_bad_inputs():
    text = launcher.slurm_script(nodes=1, gpus_per_node=0, command=CMD)
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=1" in text
    with pytest.raises(UsageError, match=r"--nodes must be an integer >= 1, got 0"):
        launcher.slurm_script(nodes=0, gpus_per_node=1, command=CMD)
    with pytest.raises(UsageError, match=r"--gpus-per-node must be an integer >= 0, got -1"):
        launcher.slurm_script(nodes=1, gpus_per_node=-1, command=CMD)
    with pytest.raises(UsageError, match=r"--backend must be .*got 'mirrored'"):
        launcher.slurm_script(nodes=1, gpus_per_node=1, backend="mirrored", command=CMD)
    with pytest.raises(UsageError, match=r"one task per node, got --tasks-per-node 2"):
        launcher.slurm_script(nodes=1, gpus_per_node=1, backend="multiworker", tasks_per_node=2, command=CMD)


# --------------------------------------------------------------------------- CLI
def _cli(argv, capsys):
    """Run ``distbatch <argv>`` through a small harness like the lead's cli.py; (code, out, err)."""
    code = launch_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_add_launch_parser_on_a_foreign_parser():
    parser = argparse.ArgumentParser(prog="distbatch")
    sub = parser.add_subparsers(dest="cmd")
    launch_cli.add_launch_parser(sub)
    args = parser.parse_args(["launch", "horovod", "-np", "2", "--gloo", "--", "python", "-c", "print(1)"])
    assert (args.np, args.gloo, args.command) == (2, True, ["--", "python", "-c", "print(1)"])
    assert callable(args.func)


@pytest.mark.parametrize("tail", [["--", "python", "-c", "print(1)"], ["python", "-c", "print(1)"]])
def test_cli_horovod_dry_run_prints_exact_command(tail, capsys):
    code, out, _ = _cli(["launch", "horovod", "-np", "2", "--gloo", "--horovodrun", HVD,
                         "--fusion-threshold-mb", "32", "--dry-run", *tail], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{HVD} -np 2 -H localhost:2 --gloo --fusion-threshold-mb 32 {BIN}/python -c 'print(1)'"


def test_cli_worker_flags_after_dashdash_belong_to_the_worker(capsys):
    code, out, _ = _cli(["launch", "horovod", "-np", "2", "--horovodrun", HVD, "--dry-run",
                         "--", "python", "t.py", "-np", "7", "--gloo"], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{HVD} -np 2 -H localhost:2 {BIN}/python t.py -np 7 --gloo"


def test_cli_mpirun_dry_run(capsys, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    code, out, _ = _cli(["launch", "mpirun", "-np", "2", "--mpirun", "/usr/bin/mpirun", "-x", "FOO",
                         "--dry-run", "--", "python", "t.py"], capsys)
    assert code == 0
    first = out.splitlines()[0].split()
    assert first[:3] == ["/usr/bin/mpirun", "-np", "2"]
    assert ("--allow-run-as-root" in first) == (os.geteuid() == 0)
    assert first[-2:] == [f"{BIN}/python", "t.py"]
    assert ["-x", "TF_CPP_MIN_LOG_LEVEL"] == first[first.index("TF_CPP_MIN_LOG_LEVEL") - 1:][:2]
    assert "#   TF_CPP_MIN_LOG_LEVEL=3" in out.splitlines()


def test_cli_mpi_runs_drop_pythonunbuffered_gloo_keeps_it(capsys, monkeypatch):
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    removed = "# removed for the ranks: PYTHONUNBUFFERED (MPI output tagging splits unbuffered lines)"
    for argv, expect in ((["mpirun", "-np", "2", "--mpirun", "m"], True),
                         (["horovod", "-np", "2", "--horovodrun", HVD], True),
                         (["horovod", "-np", "2", "--horovodrun", HVD, "--mpi"], True),
                         (["horovod", "-np", "2", "--horovodrun", HVD, "--gloo"], False)):
        code, out, _ = _cli(["launch", *argv, "--dry-run", "--", "x"], capsys)
        assert code == 0 and (removed in out.splitlines()) == expect, argv


def test_cli_usage_errors_exit_2_with_one_line(capsys):
    code, _, err = _cli(["launch", "horovod", "-np", "0", "--horovodrun", HVD, "--", "x"], capsys)
    assert code == 2 and err == "distbatch: error: -np must be an integer >= 1, got 0\n"
    code, _, err = _cli(["launch", "multiworker", "--workers", "2", "--port", "65535", "--", "x"], capsys)
    assert code == 2 and "got 65536" in err
    code, _, err = _cli(["launch", "multiworker", "--", "x"], capsys)
    assert code == 2 and "needs --workers N" in err
    code, _, err = _cli(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--"], capsys)
    assert code == 2 and "missing COMMAND" in err


def test_cli_multiworker_local_dry_run_fixed_port(capsys):
    code, out, _ = _cli(["launch", "multiworker", "--workers", "2", "--port", "23456", "--dry-run",
                         "--", "python", "t.py"], capsys)
    assert code == 0
    cfg = ['{"cluster": {"worker": ["localhost:23456", "localhost:23457"]}, "task": {"type": "worker", "index": %d}}' % i
           for i in (0, 1)]
    assert out.splitlines() == ["# worker 0 on localhost", f"TF_CONFIG='{cfg[0]}' {BIN}/python t.py",
                                "# worker 1 on localhost", f"TF_CONFIG='{cfg[1]}' {BIN}/python t.py"]


def test_cli_multiworker_free_ports_are_distinct(capsys):
    code, out, _ = _cli(["launch", "multiworker", "--workers", "3", "--dry-run", "--", "x"], capsys)
    configs = [json.loads(re.search(r"TF_CONFIG='(.*)'", ln).group(1)) for ln in out.splitlines()
               if ln.startswith("TF_CONFIG")]
    workers = configs[0]["cluster"]["worker"]
    assert code == 0 and len(set(workers)) == 3 and all(c["cluster"]["worker"] == workers for c in configs)
    assert [c["task"]["index"] for c in configs] == [0, 1, 2]


def test_cli_multiworker_hosts_prints_and_writes_scripts(tmp_path, capsys):
    code, out, _ = _cli(["launch", "multiworker", "--hosts", "10.0.0.1,10.0.0.2", "--port", "7000",
                         "--", "python", "t.py"], capsys)
    assert code == 0
    assert '"worker": ["10.0.0.1:7000", "10.0.0.2:7000"]' in out and "# worker 1 on 10.0.0.2" in out
    code, out, _ = _cli(["launch", "multiworker", "--hosts", "10.0.0.1,10.0.0.2", "--port", "7000",
                         "--write-scripts", str(tmp_path), "--", "python", "t.py"], capsys)
    assert code == 0
    scripts = sorted(p.name for p in tmp_path.iterdir())
    assert scripts == ["worker0.sh", "worker1.sh"]
    text = (tmp_path / "worker1.sh").read_text()
    assert '"task": {"type": "worker", "index": 1}' in text and text.rstrip().endswith(f"exec {BIN}/python t.py")
    assert os.access(tmp_path / "worker1.sh", os.X_OK)


def test_cli_slurm_writes_script_and_says_how_to_submit(tmp_path, capsys):
    path = tmp_path / "job.sbatch"
    code, out, _ = _cli(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--output", str(path),
                         "--", "distbatch", "train", "--backend", "horovod"], capsys)
    assert code == 0
    assert out.splitlines() == [f"wrote {path}", f"submit with: sbatch {path}"]
    assert path.read_text().splitlines()[-1] == \
        f"srun --ntasks-per-node=2 --kill-on-bad-exit=1 {BIN}/distbatch train --backend horovod"
    subprocess.run(["bash", "-n", str(path)], check=True)   # valid bash


# --------------------------------------------------------------------------- real runs (slow)
HOROVOD_SCRIPT = textwrap.dedent("""
    import numpy as np, horovod.tensorflow as hvd
    hvd.init()
    r = hvd.rank()
    x = np.array([r + 1.0, 10.0 * (r + 1)], dtype=np.float32)
    s = hvd.allreduce(x, op=hvd.Sum).numpy()
    a = hvd.allreduce(x, op=hvd.Average).numpy()
    print(f"RESULT rank={r} size={hvd.size()} sum={s.tolist()} avg={a.tolist()}", flush=True)
""")

MPI4PY_SCRIPT = textwrap.dedent("""
    from mpi4py import MPI
    import numpy as np
    c = MPI.COMM_WORLD
    x = np.array([c.rank + 1.0, 10.0 * (c.rank + 1)])
    s = np.empty_like(x)
    c.Allreduce(x, s, op=MPI.SUM)
    print(f"RESULT rank={c.rank} size={c.size} sum={s.tolist()}", flush=True)
""")


def _run_cli_subprocess(args, tmp_path, timeout=240):
    # PYTHONUNBUFFERED=1 on purpose: the launcher must keep MPI-tagged lines whole anyway
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "distbatch.cli.launch", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _results(stdout):
    return sorted(re.findall(r"RESULT rank=(\d) size=(\d) sum=(\[[^\]]*\])(?: avg=(\[[^\]]*\]))?", stdout))


@pytest.mark.slow
def test_real_horovod_gloo_two_ranks(tmp_path):
    pytest.importorskip("horovod.tensorflow")
    script = tmp_path / "hvd_allreduce.py"
    script.write_text(HOROVOD_SCRIPT)
    p = _run_cli_subprocess(["launch", "horovod", "--gloo", "-np", "2", "--", sys.executable, str(script)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    # ranks' values: [1, 10] and [2, 20] -> sum [3, 30], average [1.5, 15]
    assert _results(p.stdout) == [("0", "2", "[3.0, 30.0]", "[1.5, 15.0]"),
                                  ("1", "2", "[3.0, 30.0]", "[1.5, 15.0]")], p.stdout + p.stderr
    # horovodrun labels ranks itself ([0]<stdout>: with Gloo, [1,0]<stdout>: with MPI); keep that
    assert re.search(r"^\[(1,)?0\]<stdout>:RESULT rank=0", p.stdout, re.M), p.stdout


@pytest.mark.slow
def test_real_mpirun_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    script = tmp_path / "mpi_allreduce.py"
    script.write_text(MPI4PY_SCRIPT)
    p = _run_cli_subprocess(["launch", "mpirun", "-np", "2", "--", sys.executable, str(script)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert _results(p.stdout) == [("0", "2", "[3.0, 30.0]", ""), ("1", "2", "[3.0, 30.0]", "")], p.stdout + p.stderr
    assert re.search(r"^\[\d+,1\]<stdout>:RESULT rank=1 ", p.stdout, re.M), p.stdout   # --tag-output


@pytest.mark.slow
def test_real_horovod_failing_rank_ends_job_nonzero(tmp_path):
    """Rank 1 exits 3 while rank 0 hangs: the job ends non-zero within 60 s, naming rank 1.

    Rank 0 hangs in a sleep rather than in an allreduce: a rank blocked in a
    collective may notice Horovod's shutdown and exit first, and then
    horovodrun (which names the first rank it sees exit) would name rank 0.
    """
    pytest.importorskip("horovod.tensorflow")
    import time
    script = tmp_path / "hvd_fail.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, horovod.tensorflow as hvd
        hvd.init()
        print("PID", hvd.rank(), os.getpid(), flush=True)
        if hvd.rank() == 1:
            time.sleep(1)
            sys.exit(3)
        time.sleep(1000)
    """))
    t0 = time.monotonic()
    p = _run_cli_subprocess(["launch", "horovod", "--gloo", "-np", "2", "--", sys.executable, str(script)],
                            tmp_path, timeout=120)
    assert p.returncode != 0, p.stdout + p.stderr
    assert time.monotonic() - t0 < 60
    # horovodrun names the failed rank; the launcher names the child it ran
    assert re.search(r"Process name: 1\s+Exit code: 3", p.stderr), p.stderr
    assert "distbatch launch: horovodrun failed with exit code 1" in p.stderr
    hung = int(re.search(r"PID 0 (\d+)", p.stdout).group(1))
    time.sleep(0.5)
    stat = Path(f"/proc/{hung}/stat")
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"


@pytest.mark.slow
def test_real_horovod_ctrl_c_stops_every_rank(tmp_path):
    """Ctrl-C on the launcher: horovodrun gets SIGTERM and takes its ranks down; none is left."""
    pytest.importorskip("horovod.tensorflow")
    import signal
    import time
    script = tmp_path / "sleeper.py"
    script.write_text("import os, time\nprint('PID', os.getpid(), flush=True)\ntime.sleep(1000)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "distbatch.cli.launch", "launch", "horovod", "--gloo",
                          "-np", "2", "--", sys.executable, str(script)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    pids, deadline = [], time.monotonic() + 90
    while len(pids) < 2 and time.monotonic() < deadline:
        m = re.search(r"PID (\d+)", p.stdout.readline())
        if m:
            pids.append(int(m.group(1)))
    assert len(pids) == 2
    p.send_signal(signal.SIGINT)
    try:
        assert p.wait(timeout=90) == 130  # (horovodrun's own shutdown is slow on a loaded machine)
    finally:
        p.kill()
    time.sleep(0.5)
    def running(pid):   # a zombie awaiting its reaper counts as gone
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] != "Z"
    assert [pid for pid in pids if running(pid)] == []


# --------------------------------------------------------------------------- values reaching scripts
@pytest.mark.parametrize("kwargs, message", [
    (dict(job_name="a\nsrun rm -rf ~"), "--job-name must be letters, digits, '_', '.', '+', '-' (at most 128), "
                                        "got 'a\\nsrun rm -rf ~'"),
    (dict(job_name="my job"), "--job-name must be letters, digits, '_', '.', '+', '-' (at most 128), got 'my job'"),
    (dict(job_name=""), "--job-name must be letters, digits, '_', '.', '+', '-' (at most 128), got ''"),
    (dict(job_name="x" * 129), "--job-name must be"),
    (dict(time="bogus"), "--time must be a Slurm time limit > 0 (MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, "
                         "DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS), got 'bogus'"),
    (dict(time="01:00:00\n#SBATCH --nodes=99"), "--time must be a Slurm time limit"),
    (dict(time="1:61"), "got '1:61'"),
    (dict(time="1-24"), "got '1-24'"),
    (dict(time="0"), "got '0'"),
    (dict(time="-5"), "got '-5'"),
    (dict(time="1:2:3:4"), "got '1:2:3:4'"),
    (dict(partition="gpu\nx"), "--partition must be partition names"),
    (dict(partition=""), "--partition must be partition names"),
    (dict(log="out put.log"), "--log must be a file name pattern"),
    (dict(srun_mpi="pmix; rm"), "--srun-mpi must be a plugin name such as pmix or pmi2, got 'pmix; rm'"),
    (dict(cpus_per_task=0), "--cpus-per-task must be an integer >= 1, got 0"),
    (dict(cpus_per_task=-1), "--cpus-per-task must be an integer >= 1, got -1"),
])
def test_slurm_values_that_would_break_the_script_are_refused(kwargs, message):
    with pytest.raises(UsageError) as e:
        launcher.slurm_script(nodes=1, gpus_per_node=1, command=CMD, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("time", ["30", "30:15", "02:00:00", "1-0", "2-12", "2-12:30", "2-12:30:59", "100:00:00"])
def test_slurm_time_formats_accepted(time):
    text = launcher.slurm_script(nodes=1, gpus_per_node=1, command=CMD, time=time, job_name="a.b-c_1+2",
                                 partition="gpu,debug", log="logs/%x-%j.out", srun_mpi="pmix_v3", cpus_per_task=4)
    assert f"#SBATCH --time={time}" in text.splitlines()


def test_cli_slurm_bad_job_name_is_one_line_and_writes_nothing(tmp_path, capsys):
    code, out, err = _cli(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "0", "--job-name", "a\nb",
                           "--output", str(tmp_path / "j.sbatch"), "--", "x"], capsys)
    assert code == 2 and out == ""
    assert err == "distbatch: error: --job-name must be letters, digits, '_', '.', '+', '-' (at most 128), got 'a\\nb'\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hosts, message", [
    ("a b,c", "--hosts entry 'a b': host must be a host name or IP address"),
    ("a;rm,c", "--hosts entry 'a;rm': host must be"),
    ("a\nb,c", "--hosts entry 'a\\nb': host must be"),
])
def test_multiworker_hosts_must_be_host_names(hosts, message):
    with pytest.raises(UsageError) as e:
        launcher.host_worker_addresses(hosts, 7000)
    assert str(e.value).startswith(message)


def test_cli_multiworker_port_in_use_is_one_line(capsys):
    import socket
    blocker = socket.socket()
    blocker.bind(("", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        code, out, err = _cli(["launch", "multiworker", "--workers", "2", "--port", str(port - 1), "--", "x"], capsys)
    finally:
        blocker.close()
    assert code == 2 and out == ""
    assert err == (f"distbatch: error: --port {port - 1}: port {port} (worker 1) is already in use on this "
                   "machine; choose another --port or leave it out to use free ports\n")


# --------------------------------------------------------------------------- venv not on PATH
@pytest.mark.parametrize("command, expected", [
    (["distbatch", "train"], ["{bin}/distbatch", "train"]),
    (["--", "python", "-c", "1"], ["--", "{bin}/python", "-c", "1"]),
    (["python3", "t.py"], ["{bin}/python3", "t.py"]),
    (["pythonista", "t.py"], ["pythonista", "t.py"]),
    (["/opt/python", "t.py"], ["/opt/python", "t.py"]),
    (["bash", "distbatch"], ["bash", "distbatch"]),
    (["python2", "t.py"], ["python2", "t.py"]),
])
def test_resolve_worker_command(tmp_path, command, expected):
    for name in ("distbatch", "python", "python3"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert launcher.resolve_worker_command(command, tmp_path) == [e.format(bin=tmp_path) for e in expected]
    # nothing there: unchanged
    assert launcher.resolve_worker_command(command, tmp_path / "none") == command


def _no_venv_env():
    return {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_launch_runs_bare_distbatch_without_the_venv_on_path(tmp_path):
    """`.venv/bin/distbatch launch multiworker -- distbatch ...` with a PATH that lacks the venv."""
    p = subprocess.run([os.path.join(BIN, "distbatch"), "launch", "multiworker", "--workers", "2", "--",
                        "distbatch", "--version"], capture_output=True, text=True, timeout=60,
                       env=_no_venv_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["[rank 0] distbatch 0.1.0", "[rank 1] distbatch 0.1.0"]


@pytest.mark.slow
def test_real_horovod_bare_distbatch_without_the_venv_on_path(tmp_path):
    """The issue's command: 'env: distbatch: No such file or directory' before."""
    pytest.importorskip("horovod.tensorflow")
    p = subprocess.run([os.path.join(BIN, "distbatch"), "launch", "horovod", "--gloo", "-np", "2", "--",
                        "distbatch", "--version"], capture_output=True, text=True, timeout=120,
                       env=_no_venv_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(re.findall(r"^\[\d\]<stdout>:(.*)$", p.stdout, re.M)) == ["distbatch 0.1.0"] * 2, p.stdout


@pytest.mark.slow
def test_launch_scripts_work_without_the_venv_on_path(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**_no_venv_env(), "DRY_RUN": "1", "WORKERS": "2", "PORT": "23456"}
    if not (repo / ".venv" / "bin" / "distbatch").exists():  # a checkout without its own venv (worktree)
        env["DISTBATCH"] = os.path.join(BIN, "distbatch")
    p = subprocess.run(["bash", str(repo / "launch" / "local_multiworker.sh")], capture_output=True,
                       text=True, timeout=60, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("TF_CONFIG=")]
    assert len(lines) == 2
    distbatch = env.get("DISTBATCH", str(repo / ".venv" / "bin" / "distbatch"))
    assert all(f"' {distbatch} train --backend multiworker " in ln for ln in lines), lines
