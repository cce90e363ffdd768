"""Pure builders for launch command lines: horovodrun and mpirun here; TF_CONFIG and the
multiworker scripts in :mod:`distbatch.launch.multiworker`, sbatch in
:mod:`distbatch.launch.slurm`, the shared input checks in :mod:`distbatch.launch.checks`
(all importable from this module too).

Every function returns data (an argument list, a JSON string, a script
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

import math
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from distbatch.errors import UsageError
# The checks, the multiworker builders and Slurm live in their own modules; every name stays
# importable from here (distbatch.cli.launch and the tests use launcher.<name>).
from distbatch.launch.checks import (  # noqa: F401
    _HOST_RE, _whole, check_command, check_host, check_np, check_port)
from distbatch.launch.elastic import elastic_args
from distbatch.launch.multiworker import (  # noqa: F401
    check_ports_free, env_command_line, find_free_ports, host_script, host_worker_addresses,
    local_worker_addresses, multiworker_specs, tf_config)
from distbatch.launch.slurm import (  # noqa: F401
    _SBATCH_EXPECTED, _SBATCH_VALUE, _SLURM_TIME, SLURM_SECRET_LINES, SLURM_TIME_FORMATS,
    check_sbatch_value, check_slurm_time, slurm_script)

LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Variables mpirun forwards to every rank with ``-x NAME`` when they are set.
# Open MPI does not forward the launcher's environment to remote ranks by
# default, so a rank on another host would otherwise miss the venv's PATH.
MPI_EXPORT_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL",
                    "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")
MPI_EXPORT_PREFIXES = ("HOROVOD_", "NCCL_", "DISTBATCH_")


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
                    min_np: int | None = None, max_np: int | None = None,
                    host_discovery_script: str | None = None,
                    executable: str | None = None) -> list[str]:
    """Build the horovodrun argument list (Sergeev & Del Balso 2018, arXiv:1802.05799).

    ``hosts`` defaults to ``localhost:np``. ``--gloo`` selects Horovod's own
    Gloo controller (no MPI needed; what runs here), ``--mpi`` forces Open MPI.
    Tuning flags map one to one to horovodrun's: tensor fusion buffer size
    (MB), background cycle time (ms), a Chrome-trace timeline file, Bayesian
    autotuning of those two knobs, the rendezvous timeout (s), and a folder for
    per-rank logs. ``min_np``/``max_np``/``host_discovery_script`` make it a Horovod Elastic
    job (:mod:`distbatch.launch.elastic`; the hosts then come from the script).

    >>> horovod_command(np=2, hosts="localhost:2", gloo=True, command=["python", "x.py"],
    ...                 executable="/v/bin/horovodrun")
    ['/v/bin/horovodrun', '-np', '2', '-H', 'localhost:2', '--gloo', 'python', 'x.py']
    """
    check_np(np)
    cmd = check_command(command)
    if gloo and mpi:
        raise UsageError("--gloo and --mpi are exclusive; got both (pick one controller)")
    argv = [executable or resolve_executable("horovodrun"), "-np", str(np)]
    elastic = elastic_args(np=np, min_np=min_np, max_np=max_np, mpi=mpi, hosts=hosts, hostfile=hostfile,
                           host_discovery_script=host_discovery_script)
    argv += elastic if host_discovery_script else elastic + _host_args(np, hosts, hostfile,
                                                                       strict_hostfile=True)
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
