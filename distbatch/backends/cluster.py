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
   peer's hello (a background thread). It listens only where its own address
   says: on loopback when the address is ``localhost``/127.x/::1, else on the
   address its host name resolves to here (:func:`listen_hosts`); on every
   interface only when that cannot work, with one line saying why;
2. it connects to every peer's port, and both sides prove that they hold the
   same key without sending it (HMAC-SHA256 over fresh nonces, both ways). The
   key is ``$DISTBATCH_CLUSTER_SECRET``, a random secret per job that `distbatch
   launch` hands the workers (and the Slurm script makes); a hand-written
   TF_CONFIG job without it falls back to a hash of the cluster's address list,
   which tells a stray program from a worker but is no secret (docs/security.md);
3. it is done when it reached every peer AND every peer reached it. A worker
   closes its listener only after all peers have reached it, so no peer can
   still be waiting to reach a closed port: done on one worker implies done
   on all of them.

If that does not happen within ``timeout`` seconds (``cluster_timeout``,
``$DISTBATCH_CLUSTER_TIMEOUT``, default 120), the worker stops with one line
naming each worker address that never came, before TensorFlow is involved.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import select
import socket
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

from distbatch.errors import ClusterSetupError, ParameterError, UsageError, param_name

DEFAULT_CLUSTER_TIMEOUT = 120.0
TIMEOUT_ENV = "DISTBATCH_CLUSTER_TIMEOUT"
PROTOCOL = "distbatch-rendezvous/2"  # /2: HMAC proofs both ways instead of a token in the clear
SECRET_ENV = "DISTBATCH_CLUSTER_SECRET"  # set by `distbatch launch` and the Slurm script; never printed
MIN_SECRET_CHARS = 16
WAITING_NOTICE_AFTER = 5.0  # seconds of waiting before saying what we wait for


def check_timeout(value, where: str, *params: str) -> float:
    """A positive, finite number of seconds; UsageError naming ``where`` otherwise (a
    ParameterError when ``where`` writes parameters `params` as ``{name}``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        message = f"{where} must be a number of seconds > 0, got {value!r}"
        raise ParameterError(message, *params) if params else UsageError(message)
    return seconds


def resolve_cluster_timeout(flag: float | None, env: Mapping[str, str] | None = None) -> float:
    """cluster_timeout (`flag`) if given, else $DISTBATCH_CLUSTER_TIMEOUT, else 120 s."""
    env = os.environ if env is None else env
    if flag is not None:
        return check_timeout(flag, "{cluster_timeout}", "cluster_timeout")
    if env.get(TIMEOUT_ENV):
        return check_timeout(env[TIMEOUT_ENV], f"${TIMEOUT_ENV}")
    return DEFAULT_CLUSTER_TIMEOUT


def check_tf_config_entries(workers: Sequence[str], task: Mapping) -> None:
    """UsageError for what TF_CONFIG's own checks let through (distbatch/backends/strategy.py
    parse_tf_config calls this once the addresses are well-formed):

    * a task index that is not a JSON integer ("0" would be reported as out of range);
    * one worker named twice in spellings that differ (host names ignore case, as DNS does;
      "[::1]" and "[0::1]" are one address): both workers would bind the same port, and the
      job would wait out the cluster timeout instead of failing at once.
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
    """A hash of the address list: the fallback key when no secret is given (not a secret)."""
    return hashlib.sha256(json.dumps(list(workers)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the shared secret
def resolve_secret(env: Mapping[str, str] | None = None) -> str | None:
    """$DISTBATCH_CLUSTER_SECRET, or None when it is unset or empty (a hand-written TF_CONFIG job).

    A secret that is set must be at least MIN_SECRET_CHARS characters: a short one is guessable
    and more likely a mistake. The error never shows the value, only its length."""
    env = os.environ if env is None else env
    value = env.get(SECRET_ENV, "")
    if not value:
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise UsageError(f"${SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters (e.g. python3 -c "
                         f"'import secrets; print(secrets.token_hex(16))'), got {len(value)} character(s)")
    return value


class _Key:
    """What both ends of a hello must hold: the secret, else the cluster hash ("cluster" mode).

    The cluster hash is also in every MAC, so two jobs that share a secret still do not mix."""

    def __init__(self, workers: Sequence[str], secret: str | None) -> None:
        self.mode = "secret" if secret else "cluster"
        self.cluster = cluster_token(workers)
        self.key = (secret or self.cluster).encode()

    def mac(self, role: str, sender: int, receiver: int, nonce_c: str, nonce_s: str) -> str:
        text = f"{PROTOCOL} {role} {sender} {receiver} {nonce_c} {nonce_s} {self.cluster}"
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()


def _read_line(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", errors="replace").strip()


def _nonce_ok(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


class _Listener(threading.Thread):
    """Answers peers' hellos on this worker's port; records which peers proved they are workers."""

    def __init__(self, sock: socket.socket, key: _Key, index: int, workers: int) -> None:
        super().__init__(daemon=True, name="distbatch-rendezvous")
        self.sock, self.key, self.index, self.workers = sock, key, index, workers
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
                    peer = self._answer(conn)
                    if peer is not None:
                        self.reached_by.add(peer)
                        conn.recv(1)  # wait for the peer to close first (no TIME_WAIT on our port)
                except (OSError, ValueError):
                    pass

    def _answer(self, conn: socket.socket) -> int | None:
        """One hello: challenge, check the peer's proof; the peer's index once it proved it."""
        words = _read_line(conn).split()
        if not (len(words) == 4 and words[:2] == [PROTOCOL, "hello"] and words[2].isdigit()
                and int(words[2]) < self.workers and int(words[2]) != self.index and _nonce_ok(words[3])):
            conn.sendall(f"{PROTOCOL} other-cluster\n".encode())
            return None
        peer, nonce_c, nonce_s = int(words[2]), words[3], secrets.token_hex(16)
        proof = self.key.mac("server", self.index, peer, nonce_c, nonce_s)
        conn.sendall(f"{PROTOCOL} challenge {self.key.mode} {nonce_s} {proof}\n".encode())
        words = _read_line(conn).split()
        expected = self.key.mac("client", peer, self.index, nonce_c, nonce_s)
        if len(words) == 3 and words[:2] == [PROTOCOL, "proof"] and hmac.compare_digest(words[2], expected):
            conn.sendall(f"{PROTOCOL} ok {self.index}\n".encode())
            return peer
        conn.sendall(f"{PROTOCOL} refused\n".encode())
        return None


STRANGER = "something else answers on that port (not a distbatch worker of this cluster)"


def _hello(address: str, key: _Key, index: int, peer: int, timeout: float) -> str:
    """'ok' if the worker at ``address`` proved it is worker ``peer`` of this job (and accepted
    this worker's proof), else why not."""
    host, port = split_address(address)
    nonce_c = secrets.token_hex(16)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(f"{PROTOCOL} hello {index} {nonce_c}\n".encode())
            words = _read_line(conn).split()
            if not (len(words) == 5 and words[:2] == [PROTOCOL, "challenge"]):
                return STRANGER
            mode, nonce_s, proof = words[2:]
            if mode != key.mode:
                return mismatch_reason(mine=key.mode, theirs=mode)
            if not hmac.compare_digest(proof, key.mac("server", peer, index, nonce_c, nonce_s)):
                return f"a distbatch worker of another job answers there (another ${SECRET_ENV} or TF_CONFIG cluster)"
            conn.sendall(f"{PROTOCOL} proof {key.mac('client', index, peer, nonce_c, nonce_s)}\n".encode())
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
    return f"the worker there refused this worker's proof (another ${SECRET_ENV}?)"


def mismatch_reason(*, mine: str, theirs: str) -> str:
    """Why two workers cannot meet when one has the secret and the other has not."""
    has = {"secret": "has", "cluster": "has no"}
    return (f"the worker there {has[theirs]} ${SECRET_ENV} and this one {has[mine]}; give every "
            "worker the same secret, or none")


# --------------------------------------------------------------------------- where to listen
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """True for localhost (and *.localhost), 127.0.0.0/8 and ::1."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _resolve(host: str) -> list[str]:
    """The IP addresses ``host`` resolves to on this machine, in getaddrinfo's order."""
    seen: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


def listen_hosts(workers: Sequence[str], index: int,
                 resolve: Callable[[str], list[str]] = _resolve) -> tuple[list[str], str | None]:
    """Where worker ``index``'s rendezvous listens: (addresses to try in order, None), or
    ([], why) for every interface.

    * its address is loopback (a local job): there, 127.0.0.1 for the name localhost;
    * a host name or IP: what it resolves to here, less loopback addresses (other hosts must
      reach it; Debian maps the machine's own name to 127.0.1.1), or only loopback when every
      worker is on this machine.
    Every interface only when the name does not resolve here, or only to loopback in a job
    that spans other hosts (TensorFlow's server listens there next in any case)."""
    host, _ = split_address(workers[index])
    if is_loopback(host):
        return (["127.0.0.1"] if not _is_ip(host) else [host]), None
    try:
        addresses = [host] if _is_ip(host) else resolve(host)
    except OSError as e:
        return [], f"host {host!r} does not resolve here ({getattr(e, 'strerror', None) or e})"
    outside = [a for a in addresses if not is_loopback(a)]
    if outside:
        return outside, None
    peers = {split_address(w)[0].lower() for j, w in enumerate(workers) if j != index}
    if all(is_loopback(p) or p == host.lower() for p in peers):
        return addresses, None  # every worker on this machine: loopback is enough
    return [], (f"host {host!r} resolves to {', '.join(addresses) or 'nothing'} here, loopback only, "
                "but other hosts must reach it")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bind_worker_port(workers: Sequence[str], index: int, *, say: Callable[[str], None] | None = None,
                     resolve: Callable[[str], list[str]] = _resolve) -> socket.socket:
    """A listening socket on worker ``index``'s TF_CONFIG port, on :func:`listen_hosts`'
    addresses (the first that this machine has), else on every interface with one line why."""
    address = workers[index]
    _, port = split_address(address)
    hosts, why = listen_hosts(workers, index, resolve)
    for host in hosts:
        sock = _listen(address, host, port, last=False)
        if sock is not None:
            return sock
    if hosts:
        why = f"{', '.join(hosts)} is not an address of this machine (NAT?)"
    sock = _listen(address, "::" if ":" in split_address(address)[0] else "", port, last=True)
    (say or _say)(f"distbatch: worker {index}: {why}; its start-up rendezvous listens on every "
                  f"interface, port {port}")
    return sock


def _listen(address: str, host: str, port: int, *, last: bool) -> socket.socket | None:
    """A socket listening on (host, port). A port in use is one line (UsageError) at once;
    another failure (the address is not on this machine, a link-local address without its
    interface) is None, so the next address is tried, unless this is the ``last`` one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRINUSE and not last:
            return None
        what = "is already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise UsageError(f"cannot listen on this worker's address {address!r} from the cluster "
                         f"spec: port {port} {what}; choose other ports") from None
    return sock


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the rendezvous
def rendezvous(workers: Sequence[str], index: int, timeout: float, *,
               say: Callable[[str], None] | None = None, poll: float = 0.2,
               secret: str | None = None, env: Mapping[str, str] | None = None,
               resolve: Callable[[str], list[str]] = _resolve) -> float:
    """Block until every worker in ``workers`` is up (see module docstring); return the seconds waited.

    ``secret``: the job's shared secret; by default $DISTBATCH_CLUSTER_SECRET from ``env``
    (os.environ), and without one the cluster hash. Raises ClusterSetupError naming the
    missing workers after ``timeout`` seconds.
    """
    if len(workers) < 2:
        return 0.0
    say = say or _say
    key = _Key(workers, secret if secret is not None else resolve_secret(env))
    peers = [j for j in range(len(workers)) if j != index]
    started = time.monotonic()
    deadline = started + timeout
    listener = _Listener(bind_worker_port(workers, index, say=say, resolve=resolve), key, index,
                         len(workers))
    listener.start()
    reached: set[int] = set()
    why: dict[int, str] = {}
    noticed = False
    try:
        while True:
            for j in peers:
                if j not in reached:
                    why[j] = _hello(workers[j], key, index, j,
                                    timeout=min(2.0, max(0.1, deadline - time.monotonic())))
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
                    + f" (gives up after {param_name('cluster_timeout')} {timeout:g} s)")
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
            + f"; start every worker with the same TF_CONFIG cluster, or raise "
            f"{param_name('cluster_timeout')}")
