"""Pure builders for launch command lines: horovodrun, mpirun, TF_CONFIG, sbatch.

Every function here returns data (an argument list, a JSON string, a script
text) and runs nothing, so each launcher is tested as an exact argument list
and ``--dry-run`` prints exactly what would run. Executing is one call into
:mod:`distbatch.launch.supervisor`.

Conventions shared by all launchers:

* ``np`` (number of processes) counts *processes*; for Horovod on GPUs that is
  one process per GPU, each pinned to GPU ``hvd.local_rank()``.
* Hosts are given as ``host:slots`` (``-H a:4,b:4``) where ``slots`` is the
  number of processes that host runs; the slots must add up to at least ``np``.
* TF_CONFIG for MultiWorkerMirroredStrategy follows TensorFlow's format
  ``{"cluster": {"worker": [addr0, addr1, ...]}, "task": {"type": "worker",
  "index": i}}``; worker 0 is the chief.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from distbatch.backends.cluster import SECRET_ENV
from distbatch.errors import UsageError

LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Variables mpirun forwards to every rank with ``-x NAME`` when they are set.
# Open MPI does not forward the launcher's environment to remote ranks by
# default, so a rank on another host would otherwise miss the venv's PATH.
MPI_EXPORT_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL",
                    "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")
MPI_EXPORT_PREFIXES = ("HOROVOD_", "NCCL_", "DISTBATCH_")


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def check_np(np: int, flag: str = "-np") -> int:
    """Return ``np`` if it is an int >= 1, else raise UsageError naming it."""
    if isinstance(np, bool) or not isinstance(np, int) or np < 1:
        raise UsageError(f"{flag} must be an integer >= 1, got {np!r}")
    return np


def check_command(command: Sequence[str]) -> list[str]:
    """Return the worker command as a list; an empty one is a usage error.

    A leading ``--`` (argparse.REMAINDER keeps it) is dropped.
    """
    cmd = list(command or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError(f"missing COMMAND after '--' (e.g. '-- python train.py'), got {cmd!r}")
    return cmd


def check_port(port: int, flag: str = "--port") -> int:
    """Return ``port`` if it is a usable TCP port (1..65535), else raise UsageError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{flag} must be a TCP port in 1..65535, got {port!r}")
    return port


# Host names and IPv4/IPv6 addresses; nothing a shell, ssh or TF_CONFIG could misread.
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")


def check_host(host: str, where: str) -> str:
    """Return ``host`` if it is a plain host name or address, else raise UsageError naming ``where``."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise UsageError(f"{where}: host must be a host name or IP address (letters, digits, '.', '-', "
                         f"'_'), got {host!r}")
    return host


# Worker commands a user types from the README; resolved next to the running Python when the
# venv is not on PATH ("env: 'distbatch': No such file or directory" otherwise).
BARE_PROGRAMS = ("distbatch", "python", "python3")


def resolve_worker_command(command: Sequence[str], bin_dir: str | os.PathLike) -> list[str]:
    """Replace a bare ``distbatch``/``python``/``python3`` at the start of ``command`` with the
    program of that name in ``bin_dir`` (the running interpreter's bin directory, i.e. the venv)
    when it exists there; anything else is returned unchanged.

    >>> resolve_worker_command(["ls", "-l"], "/v/bin")
    ['ls', '-l']
    """
    cmd = list(command or [])
    start = 1 if cmd[:1] == ["--"] else 0
    if len(cmd) > start and cmd[start] in BARE_PROGRAMS:
        candidate = Path(bin_dir) / cmd[start]
        if candidate.is_file() and os.access(candidate, os.X_OK):
            cmd[start] = str(candidate)
    return cmd


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """Parse ``"h1:2,h2:4"`` into ``[("h1", 2), ("h2", 4)]`` (horovodrun's -H syntax)."""
    if not isinstance(hosts, str) or not hosts.strip():
        raise UsageError(f"-H must be host:slots[,host:slots...], got {hosts!r}")
    parsed = []
    for item in hosts.split(","):
        name, sep, slots = item.strip().rpartition(":")
        if not sep or not name or not _whole(slots) or int(slots) < 1:
            raise UsageError(f"-H entry must be host:slots with slots >= 1, got {item!r} in {hosts!r}")
        parsed.append((check_host(name, f"-H entry {item!r}"), int(slots)))
    return parsed


def parse_hostfile(path: str | os.PathLike, *, strict: bool = False) -> list[tuple[str, int]]:
    """Read an Open MPI style hostfile: one ``host slots=N`` per line.

    Open MPI also accepts ``#`` comments, blank lines and a bare ``host``
    (one slot). horovodrun's own parser does not (it splits every line at
    ``=``), so ``strict=True`` rejects those, naming the line, instead of
    letting horovodrun fail with a traceback.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--hostfile not found: {str(path)!r}")
    expected = "'host slots=N' (horovodrun accepts nothing else)" if strict else "'host [slots=N]'"
    parsed = []
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw if strict else raw.split("#", 1)[0]
        fields = line.split()
        if not fields and not strict:
            continue
        where = f"--hostfile {str(path)!r} line {lineno}"
        if fields and not fields[0].startswith("#"):  # the launcher passes it on to ssh
            check_host(fields[0], where)
        slots = [f.partition("=")[2] for f in fields[1:] if f.startswith("slots=")]
        # horovodrun reads 'host slots=N' and nothing else (it splits the line at '=')
        exact = len(fields) == 2 and len(slots) == 1
        ok = bool(fields) and (exact or not strict) and all(_whole(s) and int(s) >= 1 for s in slots)
        if not ok:
            raise UsageError(f"{where}: expected {expected}, got {raw!r}")
        parsed.append((fields[0], int(slots[0]) if slots else 1))
    if not parsed:
        raise UsageError(f"--hostfile {str(path)!r} lists no hosts")
    return parsed


def _whole(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '²' and other scripts' digits)."""
    return text.isascii() and text.isdigit()


# Linux interface names (at most IFNAMSIZ - 1 = 15 bytes), as plain identifiers: eth0, ens5f1,
# bond0.100, br-1a2b; horovodrun passes them on to every host.
_NIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def check_network_interfaces(value: str) -> str:
    """Return ``value`` if it is one interface name or a comma-separated list of them, else
    raise UsageError naming it (horovodrun would fail with its own traceback)."""
    names = value.split(",") if isinstance(value, str) else [value]
    if not all(isinstance(n, str) and _NIC_RE.fullmatch(n) for n in names):
        raise UsageError(f"--network-interface must be interface name(s) such as eth0 or eth0,eth1 "
                         f"(letters, digits, '_', '.', '-'; at most 15 each), got {value!r}")
    return value


def check_slots(hosts: Sequence[tuple[str, int]], np: int, where: str) -> None:
    """Raise UsageError when the hosts' slots add up to fewer than ``np`` processes."""
    total = sum(slots for _, slots in hosts)
    if total < np:
        raise UsageError(f"{where} provides {total} slot(s) but -np is {np}; add hosts or slots")


def is_local_only(hosts: Sequence[tuple[str, int]] | None) -> bool:
    """True when every host names this machine (or no hosts were given)."""
    return not hosts or all(name in LOCAL_HOSTNAMES for name, _ in hosts)


def resolve_executable(name: str, *, required: bool = True) -> str:
    """Find ``name`` next to the running Python first (the venv's bin), then on PATH.

    With ``required=False`` the bare name is returned when it is not found, so
    ``--dry-run`` can still print the command on a machine without it.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    if required:
        raise UsageError(f"{name!r} not found next to {sys.executable} or on PATH; "
                         "run 'bash scripts/bootstrap.sh setup' or install it")
    return name


def _host_args(np: int, hosts: str | None, hostfile: str | None, strict_hostfile: bool = False) -> list[str]:
    """The -H / --hostfile part shared by horovodrun and mpirun (validated)."""
    if hosts and hostfile:
        raise UsageError(f"give -H or --hostfile, not both (got -H {hosts!r} and --hostfile {hostfile!r})")
    if hostfile:
        check_slots(parse_hostfile(hostfile, strict=strict_hostfile), np, f"--hostfile {hostfile!r}")
        return ["--hostfile", str(hostfile)]
    hosts = hosts or f"localhost:{np}"
    check_slots(parse_hosts(hosts), np, f"-H {hosts!r}")
    return ["-H", hosts]


def _fmt_number(x: float) -> str:
    """Print 5.0 as '5' and 2.5 as '2.5' so commands read as a user would type them."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# --------------------------------------------------------------------------- #
# horovodrun
# --------------------------------------------------------------------------- #
def horovod_command(*, np: int, command: Sequence[str], hosts: str | None = None,
                    hostfile: str | None = None, gloo: bool = False, mpi: bool = False,
                    network_interface: str | None = None,
                    fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None,
                    timeline_filename: str | None = None, autotune: bool = False,
                    start_timeout: int | None = None, output_filename: str | None = None,
                    executable: str | None = None) -> list[str]:
    """Build the horovodrun argument list (Sergeev & Del Balso 2018, arXiv:1802.05799).

    ``hosts`` defaults to ``localhost:np``. ``--gloo`` selects Horovod's own
    Gloo controller (no MPI needed; what runs here), ``--mpi`` forces Open MPI.
    Tuning flags map one to one to horovodrun's: tensor fusion buffer size
    (MB), background cycle time (ms), a Chrome-trace timeline file, Bayesian
    autotuning of those two knobs, the rendezvous timeout (s), and a folder for
    per-rank logs.

    >>> horovod_command(np=2, hosts="localhost:2", gloo=True, command=["python", "x.py"],
    ...                 executable="/v/bin/horovodrun")
    ['/v/bin/horovodrun', '-np', '2', '-H', 'localhost:2', '--gloo', 'python', 'x.py']
    """
    check_np(np)
    cmd = check_command(command)
    if gloo and mpi:
        raise UsageError("--gloo and --mpi are exclusive; got both (pick one controller)")
    argv = [executable or resolve_executable("horovodrun"), "-np", str(np)]
    argv += _host_args(np, hosts, hostfile, strict_hostfile=True)
    if gloo:
        argv.append("--gloo")
    if mpi:
        argv.append("--mpi")
    if network_interface:
        check_network_interfaces(network_interface)
        # horovodrun takes one NIC per --network-interface, a list via --network-interfaces.
        flag = "--network-interfaces" if "," in network_interface else "--network-interface"
        argv += [flag, network_interface]
    if fusion_threshold_mb is not None:
        if isinstance(fusion_threshold_mb, bool) or not isinstance(fusion_threshold_mb, int) \
                or fusion_threshold_mb < 0:
            raise UsageError(f"--fusion-threshold-mb must be an integer >= 0 (0 disables fusion), "
                             f"got {fusion_threshold_mb!r}")
        argv += ["--fusion-threshold-mb", str(fusion_threshold_mb)]
    if cycle_time_ms is not None:
        if not (math.isfinite(cycle_time_ms) and 0 < cycle_time_ms <= 60_000):
            raise UsageError(f"--cycle-time-ms must be a number of milliseconds in (0, 60000], "
                             f"got {cycle_time_ms}")
        argv += ["--cycle-time-ms", _fmt_number(cycle_time_ms)]
    if timeline_filename:
        argv += ["--timeline-filename", timeline_filename]
    if autotune:
        argv.append("--autotune")
    if start_timeout is not None:
        if start_timeout < 1:
            raise UsageError(f"--start-timeout must be >= 1 second, got {start_timeout}")
        argv += ["--start-timeout", str(start_timeout)]
    if output_filename:
        argv += ["--output-filename", output_filename]
    return argv + cmd


# --------------------------------------------------------------------------- #
# mpirun (Open MPI)
# --------------------------------------------------------------------------- #
def mpi_export_names(env: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """Names to forward with ``mpirun -x``: the known ones and prefixes that are set, plus ``extra``."""
    names = [n for n in MPI_EXPORT_NAMES if n in env]
    names += sorted(n for n in env if n.startswith(MPI_EXPORT_PREFIXES) and n not in names)
    for n in extra:
        if n not in names:
            names.append(n)
    return names


def mpirun_command(*, np: int, command: Sequence[str], hosts: str | None = None,
                   hostfile: str | None = None, is_root: bool = False,
                   local_cores: int | None = None, env: Mapping[str, str] | None = None,
                   export: Sequence[str] = (), bind_to_none: bool = True,
                   executable: str = "mpirun") -> list[str]:
    """Build an Open MPI ``mpirun`` argument list.

    * As root Open MPI refuses to start without ``--allow-run-as-root``.
    * On a localhost-only run with more processes than cores, Open MPI refuses
      too unless ``--oversubscribe`` is given.
    * ``--tag-output`` labels every output line with ``[jobid,rank]<stdout>:``.
    * ``--bind-to none --map-by slot`` is Horovod's documented recommendation:
      Open MPI's default core binding would confine each TensorFlow process
      (and its thread pools) to one core.
    * ``-x NAME`` forwards the variables in :data:`MPI_EXPORT_NAMES` and those
      prefixed ``HOROVOD_``/``NCCL_``/``DISTBATCH_`` that are set in ``env``,
      plus ``export``; ``-x`` of an unset name would make Open MPI fail.
    """
    check_np(np)
    cmd = check_command(command)
    env = {} if env is None else env
    argv = [executable, "-np", str(np)]
    if is_root:
        argv.append("--allow-run-as-root")
    argv += _host_args(np, hosts, hostfile)
    host_list = parse_hosts(hosts) if hosts else (None if hostfile else [("localhost", np)])
    if host_list is not None and is_local_only(host_list) and local_cores is not None and np > local_cores:
        argv.append("--oversubscribe")
    argv.append("--tag-output")
    if bind_to_none:
        argv += ["--bind-to", "none", "--map-by", "slot"]
    for name in mpi_export_names(env, export):
        argv += ["-x", name]
    return argv + cmd


# --------------------------------------------------------------------------- #
# MultiWorkerMirroredStrategy: TF_CONFIG per worker
# --------------------------------------------------------------------------- #
def tf_config(workers: Sequence[str], index: int) -> str:
    """TF_CONFIG JSON for worker ``index`` of a cluster whose workers are ``workers`` (host:port)."""
    if not 0 <= index < len(workers):
        raise UsageError(f"worker index must be in 0..{len(workers) - 1}, got {index}")
    return json.dumps({"cluster": {"worker": list(workers)},
                       "task": {"type": "worker", "index": index}})


def local_worker_addresses(workers: int, port: int) -> list[str]:
    """``localhost:port``, ``localhost:port+1``, ... for ``workers`` local processes."""
    check_np(workers, "--workers")
    check_port(port)
    check_port(port + workers - 1, f"--port {port} + {workers} workers - 1")
    return [f"localhost:{port + i}" for i in range(workers)]


def host_worker_addresses(hosts: str, port: int, workers: int | None = None) -> list[str]:
    """One worker per entry of ``"h1,h2"`` (or ``"h1:p1,h2:p2"``), each at ``port`` unless it has its own."""
    check_port(port)
    entries = [h.strip() for h in (hosts or "").split(",")]
    if not hosts or not all(entries):
        raise UsageError(f"--hosts must be host[,host...] (optionally host:port), got {hosts!r}")
    addresses = []
    for entry in entries:
        name, sep, own = entry.rpartition(":")
        if not sep:
            addresses.append(f"{check_host(entry, f'--hosts entry {entry!r}')}:{port}")
        elif name and own.isdigit():
            check_host(name, f"--hosts entry {entry!r}")
            addresses.append(f"{name}:{check_port(int(own), f'--hosts entry {entry!r} port')}")
        else:
            raise UsageError(f"--hosts entry must be host or host:port, got {entry!r}")
    if workers is not None and workers != len(addresses):
        raise UsageError(f"--workers {workers} does not match the {len(addresses)} host(s) in --hosts {hosts!r}")
    if len({a.lower() for a in addresses}) != len(addresses):  # host names ignore case
        raise UsageError(f"--hosts gives the same host:port twice: {addresses}")
    return addresses


def multiworker_specs(addresses: Sequence[str], command: Sequence[str], secret: str | None = None
                      ) -> list[tuple[dict[str, str], list[str]]]:
    """Per worker: (environment overrides, argv). Only TF_CONFIG differs between workers; with
    ``secret`` every worker also gets it as $DISTBATCH_CLUSTER_SECRET (the start-up rendezvous's
    key, distbatch/backends/cluster.py)."""
    cmd = check_command(command)
    shared = {SECRET_ENV: secret} if secret else {}
    return [({"TF_CONFIG": tf_config(addresses, i), **shared}, list(cmd)) for i in range(len(addresses))]


def env_command_line(env: Mapping[str, str], argv: Sequence[str]) -> str:
    """A shell line ``NAME='value' ... cmd args`` that a user can paste on the host."""
    assigns = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " ".join(assigns + [shlex.join(argv)])


def host_script(env: Mapping[str, str], argv: Sequence[str], *, host: str, index: int) -> str:
    """A small bash script that starts worker ``index`` on ``host`` (written owner-only when its
    environment holds the job's secret)."""
    keep = (f"# It holds the job's {SECRET_ENV}: keep it readable by you only (copy it with scp).\n"
            if SECRET_ENV in env else "")
    return ("#!/usr/bin/env bash\n"
            f"# Worker {index} of a MultiWorkerMirroredStrategy job. Run this on {host}:\n"
            f"#   bash worker{index}.sh\n"
            + keep +
            "set -euo pipefail\n"
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
            + f"exec {shlex.join(argv)}\n")


def check_ports_free(ports: Sequence[int], flag: str = "--port") -> None:
    """UsageError naming the first of ``ports`` that this machine cannot listen on (impure)."""
    for i, port in enumerate(ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("", port))
        except OSError as e:
            what = "is already in use" if e.errno == 98 else f"cannot be used ({e.strerror})"
            raise UsageError(f"{flag} {ports[0]}: port {port} (worker {i}) {what} on this machine; "
                             f"choose another {flag} or leave it out to use free ports") from None
        finally:
            s.close()


def find_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the OS for ``n`` distinct free TCP ports (impure; race-prone but standard practice)."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


# --------------------------------------------------------------------------- #
# Slurm
# --------------------------------------------------------------------------- #
# Values written into "#SBATCH --name=value" lines. sbatch reads those lines itself (not a
# shell): whitespace ends a value, a newline starts a new line of the script, so anything
# outside these characters could silently change the job or inject commands.
_SBATCH_VALUE = {
    "--job-name": re.compile(r"[A-Za-z0-9_.+-]{1,128}"),
    "--partition": re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"),
    "--log": re.compile(r"[A-Za-z0-9_./%+@=,:-]+"),
    "--srun-mpi": re.compile(r"[A-Za-z0-9_]+"),
}
_SBATCH_EXPECTED = {
    "--job-name": "letters, digits, '_', '.', '+', '-' (at most 128)",
    "--partition": "partition names (letters, digits, '_', '.', '-'), comma-separated",
    "--log": "a file name pattern of letters, digits and _ . / % + @ = , : -",
    "--srun-mpi": "a plugin name such as pmix or pmi2",
}
# Slurm's time formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"(?:(\d+)-(\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?|(\d+)(?::(\d{1,2})(?::(\d{1,2}))?)?)")
SLURM_TIME_FORMATS = "MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS"


def check_sbatch_value(value: str, flag: str) -> str:
    """Return ``value`` if it can go into an ``#SBATCH`` line as it is, else raise UsageError."""
    if not isinstance(value, str) or not _SBATCH_VALUE[flag].fullmatch(value):
        raise UsageError(f"{flag} must be {_SBATCH_EXPECTED[flag]}, got {value!r}")
    return value


def check_slurm_time(time: str) -> str:
    """Return ``time`` if it is a positive Slurm time limit (see SLURM_TIME_FORMATS), else UsageError."""
    m = _SLURM_TIME.fullmatch(time) if isinstance(time, str) else None
    if m:
        days, d_hours, d_minutes, d_seconds, minutes, m_seconds, h_seconds = (
            int(g) if g is not None else None for g in m.groups())
        if days is not None:
            ok = d_hours < 24 and (d_minutes or 0) < 60 and (d_seconds or 0) < 60
            total = ((days * 24 + d_hours) * 60 + (d_minutes or 0)) * 60 + (d_seconds or 0)
        elif h_seconds is not None:  # HOURS:MINUTES:SECONDS
            ok = m_seconds < 60 and h_seconds < 60
            total = (minutes * 60 + m_seconds) * 60 + h_seconds
        else:  # MINUTES or MINUTES:SECONDS
            ok = (m_seconds or 0) < 60
            total = minutes * 60 + (m_seconds or 0)
        if ok and total > 0:
            return time
    raise UsageError(f"--time must be a Slurm time limit > 0 ({SLURM_TIME_FORMATS}), got {time!r}")


# The multiworker job's rendezvous secret, made when the job starts (never written into the
# script): srun hands the batch script's environment to every task. od and /dev/urandom are in
# every Linux base system, unlike python3 on some compute nodes' PATH.
SLURM_SECRET_LINES = [
    f"# The workers' start-up rendezvous accepts only peers that hold this job's {SECRET_ENV}",
    "# (docs/security.md); a fresh random one per job unless you export your own.",
    f"export {SECRET_ENV}=\"${{{SECRET_ENV}:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')}}\""]


def slurm_script(*, nodes: int, gpus_per_node: int, command: Sequence[str],
                 backend: str = "horovod", tasks_per_node: int | None = None,
                 time: str | None = None, partition: str | None = None,
                 job_name: str = "distbatch", log: str = "%x-%j.out",
                 cpus_per_task: int | None = None, srun_mpi: str | None = None) -> str:
    """Text of an sbatch script that runs ``command`` under srun.

    * ``horovod``: one task per GPU (``--ntasks-per-node=G``); every task sees
      all the node's GPUs and pins GPU ``hvd.local_rank()``; Horovod's MPI
      controller initialises from Slurm's PMI (pass ``srun_mpi="pmix"`` or
      ``"pmi2"`` if the site's srun needs it).
    * ``multiworker``: one task per node; the training process builds its
      cluster from Slurm's variables with
      ``tf.distribute.cluster_resolver.SlurmClusterResolver`` and uses all the
      node's GPUs through MultiWorkerMirroredStrategy (NCCL between GPUs).
    """
    check_np(nodes, "--nodes")
    cmd = check_command(command)
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node must be an integer >= 0, got {gpus_per_node!r}")
    if backend not in ("horovod", "multiworker"):
        raise UsageError(f"--backend must be 'horovod' or 'multiworker', got {backend!r}")
    if tasks_per_node is None:
        tasks_per_node = max(gpus_per_node, 1) if backend == "horovod" else 1
    check_np(tasks_per_node, "--tasks-per-node")
    if backend == "multiworker" and tasks_per_node != 1:
        raise UsageError(f"--backend multiworker runs one task per node, got --tasks-per-node {tasks_per_node}")
    check_sbatch_value(job_name, "--job-name")
    check_sbatch_value(log, "--log")
    if partition is not None:
        check_sbatch_value(partition, "--partition")
    if srun_mpi is not None:
        check_sbatch_value(srun_mpi, "--srun-mpi")
    if time is not None:
        check_slurm_time(time)
    if cpus_per_task is not None:
        check_np(cpus_per_task, "--cpus-per-task")
    lines = ["#!/usr/bin/env bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task is not None:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if time is not None:
        lines.append(f"#SBATCH --time={time}")
    if partition is not None:
        lines.append(f"#SBATCH --partition={partition}")
    lines.append(f"#SBATCH --output={log}")
    total = nodes * tasks_per_node
    if backend == "horovod":
        what = (f"# {total} Horovod process(es): {tasks_per_node} per node, one per GPU, "
                "each pinned to GPU hvd.local_rank().")
    else:
        what = (f"# {nodes} MultiWorkerMirroredStrategy worker(s), one per node; the cluster comes "
                "from Slurm's environment (SlurmClusterResolver), not TF_CONFIG.")
    srun = ["srun"] + ([f"--mpi={srun_mpi}"] if srun_mpi is not None else []) + [
        f"--ntasks-per-node={tasks_per_node}", "--kill-on-bad-exit=1"]
    lines += ["", "# Generated by 'distbatch launch slurm'. Submit with: sbatch <this file>", what,
              "set -euo pipefail",
              "export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}"]
    if backend == "multiworker":
        lines += SLURM_SECRET_LINES
    lines += ["", shlex.join(srun + cmd), ""]
    return "\n".join(lines)
