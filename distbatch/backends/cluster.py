"""Multi-worker start-up that cannot hang: a rendezvous with a deadline before TensorFlow.

MultiWorkerMirroredStrategy waits for every worker in its cluster inside C++
code that holds Python's GIL: while it waits, no Python runs (no signal
handler, no watchdog thread), nothing is printed, and TensorFlow's own
registration timeout is an hour. A worker that never starts (wrong address,
crashed before TensorFlow, never launched) therefore used to hang the others
silently.

So every worker first meets the others here, in plain Python sockets that a
signal interrupts, on its own TF_CONFIG port:

1. it listens on its port (the one TensorFlow binds next) and answers each
   peer's hello with its index (a background thread);
2. it connects to every peer's port and says hello (token = hash of the
   cluster, so a stranger on that port is not mistaken for a worker);
3. it is done when it reached every peer AND every peer reached it. A worker
   closes its listener only after all peers have reached it, so no peer can
   still be waiting to reach a closed port: done on one worker implies done
   on all of them.

If that does not happen within ``timeout`` seconds (``--cluster-timeout``,
``$DISTBATCH_CLUSTER_TIMEOUT``, default 120), the worker stops with one line
naming each worker address that never came, before TensorFlow is involved.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import select
import socket
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

from distbatch.errors import ClusterSetupError, UsageError

DEFAULT_CLUSTER_TIMEOUT = 120.0
TIMEOUT_ENV = "DISTBATCH_CLUSTER_TIMEOUT"
PROTOCOL = "distbatch-rendezvous/1"
WAITING_NOTICE_AFTER = 5.0  # seconds of waiting before saying what we wait for


def check_timeout(value, where: str) -> float:
    """A positive, finite number of seconds; UsageError naming ``where`` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"{where} must be a number of seconds > 0, got {value!r}")
    return seconds


def resolve_cluster_timeout(flag: float | None, env: Mapping[str, str] | None = None) -> float:
    """--cluster-timeout if given, else $DISTBATCH_CLUSTER_TIMEOUT, else 120 s."""
    env = os.environ if env is None else env
    if flag is not None:
        return check_timeout(flag, "--cluster-timeout")
    if env.get(TIMEOUT_ENV):
        return check_timeout(env[TIMEOUT_ENV], f"${TIMEOUT_ENV}")
    return DEFAULT_CLUSTER_TIMEOUT


def check_tf_config_entries(workers: Sequence[str], task: Mapping) -> None:
    """UsageError for what TF_CONFIG's own checks let through (distbatch/backends/strategy.py
    parse_tf_config calls this once the addresses are well-formed):

    * a task index that is not a JSON integer ("0" would be reported as out of range);
    * one worker named twice in spellings that differ (host names ignore case, as DNS does;
      "[::1]" and "[0::1]" are one address): both workers would bind the same port, and the
      job would wait out --cluster-timeout instead of failing at once.
    """
    index = task.get("index")
    # JSON true/false stays with the range check below it (tests/test_hangs.py pins that line).
    if not isinstance(index, int):
        kind = {str: "a string", float: "a decimal number", type(None): "missing or null",
                list: "a list", dict: "an object"}.get(type(index), type(index).__name__)
        raise UsageError(f"TF_CONFIG task index must be a JSON integer such as 0, got {index!r} "
                         f"({kind})")
    seen: dict[tuple[str, int], str] = {}
    for address in workers:
        key = _same_worker_key(address)
        if key in seen:
            why = "host names ignore case" if seen[key].lower() == address.lower() else "one address"
            raise UsageError(f"TF_CONFIG cluster names one worker twice: {seen[key]!r} and {address!r} "
                             f"({why}); every task needs its own host:port")
        seen[key] = address


def _same_worker_key(address: str) -> tuple[str, int]:
    """(host, port) with the host as the network sees it: lower case, one spelling per IP."""
    import ipaddress
    host, port = split_address(address)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower().rstrip(".")  # a DNS name: case and a trailing dot do not matter
    return host, port


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def cluster_token(workers: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(workers)).encode()).hexdigest()[:16]


def _read_line(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", errors="replace").strip()


class _Listener(threading.Thread):
    """Answers peers' hellos on this worker's port; records which peers reached it."""

    def __init__(self, sock: socket.socket, token: str, index: int) -> None:
        super().__init__(daemon=True, name="distbatch-rendezvous")
        self.sock, self.token, self.index = sock, token, index
        self.reached_by: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.settimeout(2.0)
                    words = _read_line(conn).split()
                    if len(words) == 3 and words[0] == PROTOCOL and words[1] == self.token:
                        conn.sendall(f"{PROTOCOL} ok {self.index}\n".encode())
                        self.reached_by.add(int(words[2]))
                        conn.recv(1)  # wait for the peer to close first (no TIME_WAIT on our port)
                    else:
                        conn.sendall(f"{PROTOCOL} other-cluster\n".encode())
                except (OSError, ValueError):
                    pass


def _hello(address: str, token: str, index: int, timeout: float) -> str:
    """'ok' if the worker at ``address`` answered as worker of this cluster, else why not."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(f"{PROTOCOL} {token} {index}\n".encode())
            reply = _read_line(conn)
    except ConnectionRefusedError:
        return "nothing accepts connections there"
    except socket.timeout:
        return "no answer (host unreachable or port filtered?)"
    except socket.gaierror as e:
        return f"cannot resolve host {host!r} ({e.strerror})"
    except OSError as e:
        return e.strerror or type(e).__name__
    if reply.startswith(f"{PROTOCOL} ok "):
        return "ok"
    return "something else answers on that port (not a distbatch worker of this cluster)"


def bind_worker_port(address: str) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "", port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on this worker's address {address!r} from the cluster "
                         f"spec: port {port} {'is already in use' if e.errno == 98 else e.strerror}; "
                         "choose other ports") from None
    return sock


def rendezvous(workers: Sequence[str], index: int, timeout: float, *,
               say: Callable[[str], None] | None = None, poll: float = 0.2) -> float:
    """Block until every worker in ``workers`` is up (see module docstring); return the seconds waited.

    Raises ClusterSetupError naming the missing workers after ``timeout`` seconds.
    """
    if len(workers) < 2:
        return 0.0
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    token = cluster_token(workers)
    peers = [j for j in range(len(workers)) if j != index]
    started = time.monotonic()
    deadline = started + timeout
    listener = _Listener(bind_worker_port(workers[index]), token, index)
    listener.start()
    reached: set[int] = set()
    why: dict[int, str] = {}
    noticed = False
    try:
        while True:
            for j in peers:
                if j not in reached:
                    why[j] = _hello(workers[j], token, index, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                    if why[j] == "ok":
                        reached.add(j)
            missing = [j for j in peers if j not in reached or j not in listener.reached_by]
            if not missing:
                return time.monotonic() - started
            now = time.monotonic()
            if now >= deadline:
                raise ClusterSetupError(timeout_message(workers, index, missing, reached, why, timeout))
            if not noticed and now - started >= WAITING_NOTICE_AFTER:
                noticed = True
                say(f"distbatch: worker {index} waiting for "
                    + ", ".join(f"worker {j} at {workers[j]}" for j in missing)
                    + f" (gives up after --cluster-timeout {timeout:g} s)")
            time.sleep(poll)
    finally:
        listener.stop.set()
        listener.join(timeout=3.0)
        listener.sock.close()


def timeout_message(workers: Sequence[str], index: int, missing: Sequence[int], reached: set[int],
                    why: Mapping[int, str], timeout: float) -> str:
    """One line: which workers never came, and why as far as this worker can tell."""
    parts = []
    for j in missing:
        if j in reached:  # it answered us but never reached our port
            parts.append(f"worker {j} at {workers[j]} is up but never reached this worker "
                         f"(worker {index} at {workers[index]}; firewall or wrong address?)")
        else:
            parts.append(f"worker {j} at {workers[j]} never came ({why.get(j, 'no answer')})")
    return (f"cluster set-up timed out after {timeout:g} s: " + "; ".join(parts)
            + "; start every worker with the same TF_CONFIG cluster, or raise --cluster-timeout")
