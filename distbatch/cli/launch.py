"""``distbatch launch {horovod,mpirun,multiworker,slurm,k8s} [options] -- COMMAND...``

Thin front door: parse flags, call a pure builder in :mod:`distbatch.launch.launcher`,
then either print the result (``--dry-run``, multi-host commands, sbatch
scripts) or run it under :mod:`distbatch.launch.supervisor`. Handlers return an int
exit code and raise :class:`~distbatch.errors.UsageError` for bad input.

Everything after ``--`` is the worker command, passed through untouched.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from distbatch.backends.cluster import SECRET_ENV, resolve_secret
from distbatch.launch import elastic
from distbatch.launch import k8s
from distbatch.launch import launcher
from distbatch.launch import restarts
from distbatch.launch import supervisor
from distbatch.launch import survivors
from distbatch.errors import UsageError
from distbatch.training.preemption import CHECKPOINT_SECONDS_ENV, LAUNCH_CHECKPOINT_SECONDS


# A reader that stops early (`--dry-run | head -1`) closes the pipe: exit as quietly as cat or
# ls do (they die of SIGPIPE, which a shell reports as 128 + 13), not with a BrokenPipeError
# traceback and a second "Exception ignored" one when Python flushes stdout at exit.
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE


def _print(*lines: str) -> None:
    _write_stdout("".join(f"{line}\n" for line in lines))


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # later flushes (at exit) go nowhere instead of failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        raise SystemExit(EXIT_STDOUT_CLOSED) from None


# Printed in place of a secret's value: --dry-run output is pasted into issues and logs.
SECRET_SHOWN_AS = "<secret, not shown>"


def _env_lines(env: Mapping[str, str]) -> list[str]:
    """Comment lines with the inherited variables that matter to the ranks (a secret's value hidden)."""
    names = launcher.mpi_export_names(env)
    return ["# environment: inherited from this shell; relevant variables:"] + [
        f"#   {n}={SECRET_SHOWN_AS if n == SECRET_ENV else env[n]}" for n in names]


# Open MPI's --tag-output labels each write() of a rank separately; an
# unbuffered Python (PYTHONUNBUFFERED) writes a print's text and its newline
# in two calls, so ranks' lines come out shredded and interleaved. Ranks keep
# Python's default buffering instead; print(..., flush=True) shows a line at once.
MPI_UNSET = ("PYTHONUNBUFFERED",)


# The running interpreter's bin directory: the venv's when distbatch runs from one.
BIN_DIR = str(Path(sys.executable).parent)


def _worker_command(args: argparse.Namespace) -> list[str]:
    """The worker command with a bare distbatch/python resolved in BIN_DIR (venv not on PATH)."""
    return launcher.resolve_worker_command(args.command, BIN_DIR)


def _path_env() -> dict[str, str]:
    """Workers started here find the venv's programs first, also from their own scripts."""
    path = os.environ.get("PATH", "")
    return {} if BIN_DIR in path.split(os.pathsep) else {"PATH": os.pathsep.join(filter(None, (BIN_DIR, path)))}


def _prepare_restarts(args: argparse.Namespace, command: list[str]) -> None:
    """--max-restarts: check it, its back-off and the worker command; workers checkpoint by time
    by default."""
    restarts.check_max_restarts(args.max_restarts)
    restarts.check_backoff(args.restart_backoff, "--restart-backoff")
    restarts.check_backoff(args.restart_backoff_max, "--restart-backoff-max")
    if args.max_restarts:
        restarts.check_restart_command(command, args.max_restarts)
        # Before commands are built: mpirun forwards DISTBATCH_* variables set here (-x).
        os.environ.setdefault(CHECKPOINT_SECONDS_ENV, f"{LAUNCH_CHECKPOINT_SECONDS:g}")


def _with_restarts(once, command: list[str], args: argparse.Namespace, workers: int) -> int:
    return restarts.run_with_restarts(once, command, max_restarts=args.max_restarts, workers=workers,
                                      backoff=args.restart_backoff, backoff_max=args.restart_backoff_max,
                                      restart_deterministic=args.restart_deterministic)


def _run_or_show(build, args: argparse.Namespace, unset: Sequence[str] = ()) -> int:
    """`build(worker command)` -> launcher argv; show it, or run it (restarting on failures)."""
    command = _worker_command(args)
    build(command)  # every check (and a missing horovodrun) before anything runs
    _prepare_restarts(args, command)
    if args.dry_run:
        removed = [f"# removed for the ranks: {n} (MPI output tagging splits unbuffered lines)"
                   for n in unset if n in os.environ]
        _print(shlex.join(build(command)), *_env_lines(os.environ), *removed)
        return 0

    def once(cmd: list[str], failures: list) -> int:
        return supervisor.run_launcher(build(cmd), env=_path_env(), unset_env=unset,
                                       grace_seconds=args.grace_seconds, failures=failures)

    return _with_restarts(once, command, args, args.np)


def _write(path: Path, text: str, flag: str, mode: int = 0o755) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created with `mode` (a script that holds a secret is never readable by others, not even
        # for a moment), and set again for a file that existed.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        path.chmod(mode)
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {str(path)!r} ({e.strerror or e})") from None


def _check_grace(args: argparse.Namespace) -> None:
    g = args.grace_seconds
    if not (math.isfinite(g) and 0 <= g <= 3600):
        raise UsageError(f"--grace-seconds must be a number of seconds in [0, 3600], got {g}")


def _horovod(args: argparse.Namespace) -> int:
    _check_grace(args)

    def build(command: list[str]) -> list[str]:
        argv = launcher.horovod_command(
            np=args.np, command=command, hosts=args.hosts, hostfile=args.hostfile,
            gloo=args.gloo, mpi=args.mpi, network_interface=args.network_interface,
            fusion_threshold_mb=args.fusion_threshold_mb, cycle_time_ms=args.cycle_time_ms,
            timeline_filename=args.timeline_filename, autotune=args.autotune,
            start_timeout=args.start_timeout, output_filename=args.output_filename,
            min_np=args.min_np, max_np=args.max_np, host_discovery_script=args.host_discovery_script,
            executable="horovodrun")
        # Resolved after validation so a bad flag is reported before a missing tool.
        argv[0] = args.horovodrun or launcher.resolve_executable("horovodrun", required=not args.dry_run)
        return argv

    if elastic.is_elastic(args.min_np, args.max_np, args.host_discovery_script):
        build(_worker_command(args))  # every check before the discovery script runs
        _elastic_start(args)
        return _run_or_show(build, args)  # Gloo only
    # Without --gloo horovodrun uses mpirun (with --tag-output) whenever MPI is available.
    return _run_or_show(build, args, unset=() if args.gloo else MPI_UNSET)


def _elastic_start(args: argparse.Namespace) -> None:
    """Horovod Elastic (docs/elastic.md): the workers learn which world sizes may come (each
    must split the global batch), and what the discovery script lists now is checked."""
    os.environ[elastic.NP_ENV] = f"{args.min_np or args.np}:{args.max_np or ''}"
    if args.host_discovery_script and not args.dry_run:
        found = elastic.discovered_hosts(args.host_discovery_script)
        for note in elastic.first_hosts_notes(found, args.np, args.network_interface):
            _note(f"distbatch launch: note: {note}")


def _mpirun(args: argparse.Namespace) -> int:
    _check_grace(args)

    def build(command: list[str]) -> list[str]:
        argv = launcher.mpirun_command(
            np=args.np, command=command, hosts=args.hosts, hostfile=args.hostfile,
            is_root=os.geteuid() == 0, local_cores=os.cpu_count(), env=os.environ,
            export=args.export or (), bind_to_none=not args.keep_binding)
        argv[0] = args.mpirun or launcher.resolve_executable("mpirun", required=not args.dry_run)
        return argv

    return _run_or_show(build, args, unset=MPI_UNSET)


def _multiworker(args: argparse.Namespace) -> int:
    _check_grace(args)
    if args.max_restarts and args.hosts:
        raise UsageError(f"--max-restarts {args.max_restarts} restarts the workers of a local job; with "
                         f"--hosts each host runs its own worker (restart them with --resume)")
    _prepare_restarts(args, _worker_command(args))
    if args.min_workers is not None and args.workers is not None:
        launcher.check_np(args.workers, "--workers")
    survivors.check_min_workers(args.min_workers, workers=args.workers, max_restarts=args.max_restarts,
                                dead_after=args.dead_after, command=_worker_command(args))

    starts = []
    world = None
    if args.min_workers is not None and not (args.dry_run or args.write_scripts):
        world = survivors.Survivors(args.workers, args.min_workers, args.dead_after)

    def once(command: list[str], failures: list) -> int:
        starts.append(command)
        return _multiworker_once(args, command, failures, check_ports=len(starts) == 1, world=world)

    if args.max_restarts and not (args.dry_run or args.write_scripts):
        if world is not None:  # --min-workers: restarts may continue on fewer workers
            return restarts.run_with_restarts(
                once, _worker_command(args), max_restarts=args.max_restarts, workers=args.workers,
                backoff=args.restart_backoff, backoff_max=args.restart_backoff_max,
                restart_deterministic=args.restart_deterministic, world=world)
        return _with_restarts(once, _worker_command(args), args, args.workers)
    return _multiworker_once(args, _worker_command(args), None)


# What the user reads instead of the secret in printed commands (stderr, after them: stdout
# stays exactly the commands, and `--dry-run | head -1` stays quiet).
DRY_RUN_SECRET_NOTE = (f"distbatch launch: --dry-run: each worker also gets {SECRET_ENV}={SECRET_SHOWN_AS} "
                       "(a random one made for each start; the workers' rendezvous key, docs/security.md)")
HOSTS_SECRET_NOTE = (f"distbatch launch: these commands set no {SECRET_ENV}: export the same one on every "
                     "host first (python3 -c 'import secrets; print(secrets.token_hex(16))'), or use "
                     "--write-scripts, which puts a new one into the scripts; without it the workers meet "
                     "with a key anyone who knows the addresses can compute (docs/security.md)")
TASK_SECRET_NOTE = (f"distbatch launch: no {SECRET_ENV} in this environment: the workers meet with a key "
                    "anyone who knows the addresses can compute; export the same secret on every host "
                    "(docs/security.md)")


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _multiworker_once(args: argparse.Namespace, command: list[str], failures: list | None,
                      check_ports: bool = True, world: survivors.Survivors | None = None) -> int:
    """One start of the multiworker job (free ports are chosen anew each time; a given --port
    is checked only at the first start: the previous workers' sockets may linger in TIME_WAIT).
    With ``world`` (--min-workers) it starts the workers still alive: a new TF_CONFIG of
    ``world.size`` workers, ranks named by world.labels()."""
    workers = world.size if world is not None else args.workers
    if args.hosts:
        addresses = launcher.host_worker_addresses(args.hosts, args.port or 12345, args.workers)
    else:
        if workers is None:
            raise UsageError("multiworker needs --workers N (local run) or --hosts h1,h2 (multi-host), got neither")
        launcher.check_np(workers, "--workers")
        if args.port is not None:
            addresses = launcher.local_worker_addresses(workers, args.port)
            if not args.dry_run and check_ports:
                launcher.check_ports_free([args.port + i for i in range(workers)])
        else:
            addresses = [f"localhost:{p}" for p in launcher.find_free_ports(workers)]
    # Printed commands never carry the secret (the value is shown nowhere); the workers started
    # here get a new one for each start, the scripts one for the job.
    specs = launcher.multiworker_specs(addresses, command)
    if args.task_index is not None and not 0 <= args.task_index < len(specs):
        raise UsageError(f"--task-index must be in 0..{len(specs) - 1}, got {args.task_index}")

    if args.write_scripts:
        out = Path(args.write_scripts)
        secret = secrets.token_hex(16)
        for i, ((env, argv), addr) in enumerate(zip(launcher.multiworker_specs(addresses, command, secret),
                                                    addresses)):
            path = out / f"worker{i}.sh"
            _write(path, launcher.host_script(env, argv, host=addr.rpartition(":")[0], index=i),
                   "--write-scripts", mode=0o700)
            _print(f"wrote {path}  (run on {addr.rpartition(':')[0]})")
        _print(f"each script holds the job's {SECRET_ENV} and is readable by you only (mode 700): "
               "copy them with scp, never to a shared place")
        return 0
    if args.dry_run or (args.hosts and args.task_index is None):
        for i, ((env, argv), addr) in enumerate(zip(specs, addresses)):
            if args.task_index is None or args.task_index == i:
                _print(f"# worker {i} on {addr.rpartition(':')[0]}", launcher.env_command_line(env, argv))
        _note(HOSTS_SECRET_NOTE if args.hosts else DRY_RUN_SECRET_NOTE)
        return 0
    if args.task_index is not None:
        # This host's worker only: the secret must be the one every host exported.
        if resolve_secret(os.environ) is None:
            _note(TASK_SECRET_NOTE)
    else:
        specs = launcher.multiworker_specs(addresses, command, secrets.token_hex(16))
    worker_specs = supervisor.rank_specs([({**_path_env(), **env}, argv) for env, argv in specs])
    if args.task_index is not None:
        worker_specs = [worker_specs[args.task_index]]
    if world is not None:  # ranks named after the original workers; their lines tell the progress
        worker_specs = [dataclasses.replace(s, label=label) for s, label in zip(worker_specs, world.labels())]
        return supervisor.run_workers(worker_specs, grace_seconds=args.grace_seconds, failures=failures,
                                      on_line=world.on_line)
    return supervisor.run_workers(worker_specs, grace_seconds=args.grace_seconds, failures=failures)


def _slurm(args: argparse.Namespace) -> int:
    text = launcher.slurm_script(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, command=_worker_command(args),
        backend=args.backend, tasks_per_node=args.tasks_per_node, time=args.time,
        partition=args.partition, job_name=args.job_name, log=args.log,
        cpus_per_task=args.cpus_per_task, srun_mpi=args.srun_mpi)
    if args.dry_run:
        _write_stdout(text)
        return 0
    path = Path(args.output or f"{args.job_name}.sbatch")
    _write(path, text, "--output")
    _print(f"wrote {path}", f"submit with: sbatch {shlex.quote(str(path))}")
    return 0


def _k8s(args: argparse.Namespace) -> int:
    job = k8s.K8sJob(
        kind=args.kind, name=args.name, image=args.image, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, command=tuple(args.command), min_workers=args.min_workers,
        max_workers=args.max_workers, max_restarts=args.max_restarts, namespace=args.namespace,
        pvc=args.pvc, mount_path=args.mount_path, cluster_secret=args.cluster_secret,
        mpi_launcher=args.mpi_launcher)
    text = k8s.render(k8s.build_manifest(job))  # every check before anything is written
    if args.dry_run or not args.output:
        _write_stdout(text)
    else:
        path = k8s.write_manifest(args.output, text)
        _print(f"wrote {path}", f"submit with: kubectl apply -f {shlex.quote(str(path))}")
    if not args.pvc:
        _note(k8s.NO_VOLUME_NOTE)
    return 0


def _common(p: argparse.ArgumentParser, *, local: bool = True) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact command(s) and environment; run nothing")
    if local:
        p.add_argument("--grace-seconds", type=float, default=5.0,
                       help="after a failure or Ctrl-C: seconds between SIGTERM and SIGKILL (default 5)")
        p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                       help="when any worker fails, stop all and start all again with --resume "
                            "added to the `distbatch train`/`sweep` command, up to N times "
                            "(default 0); workers then also checkpoint every "
                            f"{LAUNCH_CHECKPOINT_SECONDS:g} s unless --checkpoint-every-seconds "
                            "says otherwise (see docs/reliability.md)")
        p.add_argument("--restart-backoff", type=float, default=restarts.DEFAULT_BACKOFF, metavar="SECONDS",
                       help="wait before the first restart, doubled at each further one "
                            f"(default {restarts.DEFAULT_BACKOFF:g}; 0: restart at once)")
        p.add_argument("--restart-backoff-max", type=float, default=restarts.DEFAULT_BACKOFF_MAX,
                       metavar="SECONDS",
                       help=f"longest wait between two restarts (default {restarts.DEFAULT_BACKOFF_MAX:g})")
        p.add_argument("--restart-deterministic", action="store_true",
                       help="also restart after exit 2 (bad input) and 3 (divergence), which a "
                            "resumed run repeats exactly (default: exit with that status)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... (the worker command)")


def _hosts(p: argparse.ArgumentParser) -> None:
    p.add_argument("-np", "--num-proc", dest="np", type=int, required=True, help="number of processes")
    p.add_argument("-H", "--hosts", dest="hosts", help="host:slots[,host:slots...] (default localhost:NP)")
    p.add_argument("--hostfile", help="file with one 'host slots=N' per line")


def add_launch_parser(subparsers) -> None:
    """Add ``launch`` with sub-commands horovod, mpirun, multiworker, slurm, k8s to ``subparsers``."""
    launch = subparsers.add_parser("launch", help="start a distributed job (horovodrun, mpirun, TF_CONFIG, "
                                                  "Slurm, Kubernetes)",
                                   description=__doc__.split("\n\n")[0])
    which = launch.add_subparsers(dest="launcher", metavar="{horovod,mpirun,multiworker,slurm,k8s}")
    which.required = True

    h = which.add_parser("horovod", help="run horovodrun")
    _hosts(h)
    ctl = h.add_mutually_exclusive_group()
    ctl.add_argument("--gloo", action="store_true", help="Horovod's Gloo controller (no MPI needed)")
    ctl.add_argument("--mpi", action="store_true", help="the MPI controller")
    h.add_argument("--network-interface", help="NIC(s) for traffic, e.g. eth0 or eth0,eth1")
    h.add_argument("--fusion-threshold-mb", type=int, help="tensor fusion buffer, MB (0 disables fusion)")
    h.add_argument("--cycle-time-ms", type=float, help="background cycle time, ms")
    h.add_argument("--timeline-filename", help="write a Horovod timeline (Chrome trace) here")
    h.add_argument("--autotune", action="store_true", help="tune fusion threshold and cycle time")
    h.add_argument("--start-timeout", type=int, help="seconds to wait for all ranks to start")
    h.add_argument("--output-filename", help="folder for per-rank logs")
    el = h.add_argument_group("Horovod Elastic (docs/elastic.md)")
    el.add_argument("--min-np", type=int, metavar="M",
                    help="fewest processes the job continues on when workers are lost (default -np)")
    el.add_argument("--max-np", type=int, metavar="N", help="most processes the job grows to")
    el.add_argument("--host-discovery-script", metavar="SCRIPT",
                    help="executable printing the available hosts, one host:slots per line; "
                         "horovodrun runs it every second and the job grows or shrinks with it")
    h.add_argument("--horovodrun", help=argparse.SUPPRESS)  # path override, for tests
    _common(h)
    h.set_defaults(func=_horovod)

    m = which.add_parser("mpirun", help="run Open MPI's mpirun")
    _hosts(m)
    m.add_argument("-x", "--export", action="append", metavar="NAME",
                   help="also forward this environment variable (repeatable)")
    m.add_argument("--keep-binding", action="store_true",
                   help="keep Open MPI's core binding (default: --bind-to none --map-by slot)")
    m.add_argument("--mpirun", help=argparse.SUPPRESS)
    _common(m)
    m.set_defaults(func=_mpirun)

    w = which.add_parser("multiworker", help="MultiWorkerMirroredStrategy workers with TF_CONFIG")
    w.add_argument("--workers", type=int, help="number of workers (local run)")
    w.add_argument("--hosts", help="h1,h2[,...] one worker per host (multi-host; prints per-host commands)")
    w.add_argument("--port", type=int, help="local: first port (default: free ports); hosts: port (default 12345)")
    w.add_argument("--task-index", type=int, help="with --hosts: run only this worker here, supervised")
    w.add_argument("--write-scripts", metavar="DIR", help="write one worker<i>.sh per host into DIR")
    w.add_argument("--min-workers", type=int, metavar="M",
                   help="with --max-restarts: a worker that stays dead (--dead-after failures in a row, "
                        "no new checkpoint in between) is dropped and the others continue with a new "
                        "TF_CONFIG and --resume, as long as at least M remain (default: --workers, "
                        "never shrink; see docs/reliability.md)")
    w.add_argument("--dead-after", type=int, metavar="N",
                   help=f"with --min-workers: failures in a row, with no new checkpoint in between, "
                        f"after which a worker stayed dead (default {survivors.DEFAULT_DEAD_AFTER})")
    _common(w)
    w.set_defaults(func=_multiworker)

    s = which.add_parser("slurm", help="write an sbatch script")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU-only nodes")
    s.add_argument("--backend", choices=("horovod", "multiworker"), default="horovod")
    s.add_argument("--tasks-per-node", type=int,
                   help="default: gpus-per-node for horovod (min 1), 1 for multiworker")
    s.add_argument("--time", help="time limit in a Slurm format: MINUTES, MM:SS, HH:MM:SS, D-HH, "
                                  "D-HH:MM or D-HH:MM:SS, e.g. 02:00:00")
    s.add_argument("--partition")
    s.add_argument("--job-name", default="distbatch")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--srun-mpi", help="srun --mpi=VALUE for horovod, e.g. pmix or pmi2 (site specific)")
    s.add_argument("--log", default="%x-%j.out", help="#SBATCH --output pattern (default %%x-%%j.out)")
    s.add_argument("--output", help="where to write the script (default JOB_NAME.sbatch)")
    _common(s, local=False)
    s.set_defaults(func=_slurm)

    k = which.add_parser("k8s", help="write a Kubernetes MPIJob, TFJob or JobSet (docs/kubernetes.md)")
    k.add_argument("--kind", required=True, choices=("mpijob", "tfjob", "jobset"),
                   help="mpijob: MPI Operator + horovod; tfjob: Training Operator + multiworker; "
                        "jobset: JobSet + multiworker")
    k.add_argument("--name", required=True, help="the job's name (a DNS-1035 label)")
    k.add_argument("--image", required=True, help="container image with distbatch installed")
    k.add_argument("--workers", type=int, required=True, metavar="N", help="worker pods")
    k.add_argument("--gpus-per-worker", type=int, required=True, metavar="G",
                   help="nvidia.com/gpu per worker pod (0: CPU)")
    k.add_argument("--min-workers", type=int, metavar="M",
                   help="mpijob: Horovod Elastic's fewest workers (default --workers)")
    k.add_argument("--max-workers", type=int, metavar="N",
                   help="mpijob: Horovod Elastic's most workers (default --workers)")
    k.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="restarts after a failure, each resuming from --out's checkpoint "
                        "(needs --pvc; default 0)")
    k.add_argument("--pvc", metavar="CLAIM", help="PersistentVolumeClaim (ReadWriteMany) for the run's --out")
    k.add_argument("--mount-path", default="/workspace", metavar="DIR",
                   help="where --pvc is mounted, and the working directory (default /workspace)")
    k.add_argument("--namespace", metavar="NS", help="metadata.namespace (default: kubectl's)")
    k.add_argument("--cluster-secret", metavar="SECRET",
                   help=f"tfjob/jobset: Kubernetes Secret whose key 'secret' becomes ${SECRET_ENV}")
    k.add_argument("--mpi-launcher", choices=("mpirun", "horovodrun"),
                   help="mpijob: the launcher's program (default mpirun; horovodrun when elastic)")
    k.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (atomically; default stdout)")
    k.add_argument("--dry-run", action="store_true", help="print the YAML, even with -o; write nothing")
    k.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... (the worker command)")
    k.set_defaults(func=_k8s)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m distbatch.cli.launch launch horovod ...`` (same as ``distbatch launch``)."""
    parser = argparse.ArgumentParser(prog="distbatch")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_launch_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"distbatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
