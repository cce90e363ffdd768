"""MultiWorkerMirroredStrategy launch data: TF_CONFIG per worker, worker addresses (local ports
or hosts), the per-worker environment and command, and the scripts and lines a user runs on
each host. Pure builders, except the two port probes at the end."""
from __future__ import annotations

import json
import shlex
import socket
from collections.abc import Mapping, Sequence

from distbatch.backends.cluster import SECRET_ENV
from distbatch.errors import UsageError
from distbatch.launch.checks import check_command, check_host, check_np, check_port


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
