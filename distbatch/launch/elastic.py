"""horovodrun's elastic part: ``--min-np``, ``--max-np``, ``--host-discovery-script``.

Pure builders and checks, as the rest of :mod:`distbatch.launch.launcher`; the workers'
side (commits, restarts from them at the new world size, the record of each change) is
distbatch/training/elastic.py, and docs/elastic.md says how the two fit.

horovodrun's own rules, checked here so that they fail at once with one line instead of a
traceback or a 10-minute wait:

* elastic jobs run on Gloo only (``--mpi`` is refused);
* hosts come from the discovery script, or from ``-H``/``--hostfile`` with at least two
  hosts (fixed hosts, fault tolerance only); not from both;
* ``min-np <= np <= max-np``;
* an elastic job finds its network interface by comparing two hosts: starting on one host
  needs ``--network-interface`` (e.g. ``lo`` on one machine), else horovodrun waits
  HOROVOD_ELASTIC_TIMEOUT (600 s) for a second host (:func:`first_hosts_notes`).
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from distbatch.errors import UsageError
from distbatch.launch.checks import _whole, check_host, check_np

# Set in the workers' environment by `distbatch launch horovod` ("MIN:MAX", MAX empty when
# unbounded): a worker checks that every allowed world size splits the global batch
# (distbatch.training.elastic.NP_ENV).
NP_ENV = "DISTBATCH_ELASTIC_NP"


def is_elastic(min_np: int | None, max_np: int | None, host_discovery_script: str | None) -> bool:
    return min_np is not None or max_np is not None or host_discovery_script is not None


def elastic_args(*, np: int, min_np: int | None = None, max_np: int | None = None,
                 host_discovery_script: str | None = None, hosts: str | None = None,
                 hostfile: str | None = None, mpi: bool = False) -> list[str]:
    """horovodrun's elastic arguments (``[]`` when none is given), validated.

    >>> elastic_args(np=2, min_np=1, max_np=3, host_discovery_script="/bin/true")
    ['--min-np', '1', '--max-np', '3', '--host-discovery-script', '/bin/true']
    """
    if not is_elastic(min_np, max_np, host_discovery_script):
        return []
    if mpi:
        raise UsageError("--mpi with --min-np/--max-np/--host-discovery-script: Horovod Elastic runs "
                         "on Gloo only; drop --mpi")
    low = np if min_np is None else check_np(min_np, "--min-np")
    if low > np:
        raise UsageError(f"--min-np {low} is greater than -np {np}; expected --min-np <= -np (the job "
                         "starts with -np processes)")
    if max_np is not None and check_np(max_np, "--max-np") < np:
        raise UsageError(f"--max-np {max_np} is less than -np {np}; expected --max-np >= -np")
    argv = ["--min-np", str(low)] + (["--max-np", str(max_np)] if max_np is not None else [])
    if host_discovery_script is not None:
        if hosts or hostfile:
            given = f"-H {hosts!r}" if hosts else f"--hostfile {hostfile!r}"
            raise UsageError(f"give --host-discovery-script or {given.split()[0]}, not both (got "
                             f"--host-discovery-script {host_discovery_script!r} and {given})")
        check_discovery_script(host_discovery_script)
        return argv + ["--host-discovery-script", str(host_discovery_script)]
    if not (hosts or hostfile):
        raise UsageError("--min-np/--max-np without --host-discovery-script need -H or --hostfile with "
                         "at least two hosts (Horovod's fixed-host elastic mode); give a discovery "
                         "script to let hosts come and go")
    return argv


def check_discovery_script(path: str) -> str:
    """The script horovodrun runs every second to list the hosts: an executable file."""
    if not os.path.isfile(path):
        raise UsageError(f"--host-discovery-script not found: {path!r}")
    if not os.access(path, os.X_OK):
        raise UsageError(f"--host-discovery-script {path!r} is not executable (chmod +x it); horovodrun "
                         "runs it every second to list the hosts")
    return path


def parse_discovered_hosts(text: str, default_slots: int | None = None) -> list[tuple[str, int]]:
    """A discovery script's output as [(host, slots)]: one ``host:slots`` (or ``host``, with
    `default_slots`) per line, blank lines skipped, as horovodrun reads it."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        host, sep, slots = line.partition(":")
        if sep and not (_whole(slots) and int(slots) >= 1):
            raise UsageError(f"--host-discovery-script printed {line!r}: expected host:slots with "
                             "slots >= 1, or host")
        if not sep and default_slots is None:
            raise UsageError(f"--host-discovery-script printed {line!r} without slots: print "
                             "host:slots")
        found.append((check_host(host, f"--host-discovery-script line {line!r}"),
                      int(slots) if sep else default_slots))
    return found


def first_hosts_notes(hosts: Sequence[tuple[str, int]], np: int,
                      network_interface: str | None) -> list[str]:
    """Notes when what the discovery script lists now will keep horovodrun waiting: fewer
    than -np slots, or one host without a network interface (see the module docstring).
    Notes, not errors: more hosts may still come."""
    notes = []
    slots = sum(s for _, s in hosts)
    if slots < np:
        notes.append(f"--host-discovery-script lists {slots} slot(s) now ({_names(hosts)}) but -np is "
                     f"{np}: horovodrun waits for -np slots (up to $HOROVOD_ELASTIC_TIMEOUT, 600 s)")
    if len({h for h, _ in hosts}) < 2 and not network_interface:
        notes.append(f"--host-discovery-script lists one host now ({_names(hosts)}): horovodrun finds an "
                     "elastic job's network interface by comparing two hosts and waits up to 600 s for "
                     "a second one; give --network-interface (lo on one machine, e.g. eth0 across "
                     "machines) to start on one host")
    return notes


def discovered_hosts(path: str, timeout: float = 30.0) -> list[tuple[str, int]]:
    """Run the discovery script once, as horovodrun will, and parse what it lists."""
    try:
        done = subprocess.run([os.path.abspath(path)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"--host-discovery-script {path!r} could not run: {e}") from None
    if done.returncode != 0:
        raise UsageError(f"--host-discovery-script {path!r} exited with {done.returncode}: "
                         f"{' '.join(done.stderr.split())[:200]}")
    return parse_discovered_hosts(done.stdout)


def _names(hosts: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{h}:{s}" for h, s in hosts) or "no hosts"
