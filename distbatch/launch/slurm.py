"""Slurm: the sbatch script that runs a job under srun, with every value that goes into an
``#SBATCH`` line checked (sbatch reads those lines itself, not a shell)."""
from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from distbatch.backends.cluster import SECRET_ENV
from distbatch.errors import UsageError
from distbatch.launch.checks import check_command, check_np


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
