"""The job as its environment describes it, read without TensorFlow: the launcher markers of
horovodrun/mpirun, TF_CONFIG, Slurm's task count, and MultiWorkerMirroredStrategy's
communication options.

The `auto` backend choice (distbatch/backends/__init__.py) and the CLI's checks read these
before TensorFlow is imported; the backends themselves (strategy.py, horovod.py) re-export them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from distbatch.backends.cluster import check_tf_config_entries
from distbatch.errors import ParameterError, UsageError

# Variables that horovodrun (Gloo) or an MPI launcher set in every worker.
LAUNCHER_MARKERS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launched_by_horovod_or_mpi(env: Mapping[str, str]) -> bool:
    return any(k in env for k in LAUNCHER_MARKERS)


# The jobs MultiWorkerMirroredStrategy runs: every task trains. A "ps" job belongs to
# ParameterServerStrategy and an "evaluator" to a side-car evaluation loop; neither is
# something distbatch runs, and TF would wait for (or ignore) them instead of failing.
MULTIWORKER_JOBS = ("chief", "worker")


def check_worker_address(address, where: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); UsageError naming ``where`` for anything else."""
    if not isinstance(address, str):
        raise UsageError(f"{where}: worker address must be a 'host:port' string, got {address!r}")
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:port
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
            or any(c.isspace() for c in address):
        raise UsageError(f"{where}: worker address must be host:port with a port in 1..65535, "
                         f"got {address!r}")
    return host, int(port)


def parse_tf_config(raw: str | None) -> dict:
    """Validate TF_CONFIG; return {"workers": [...], "index": i}. UsageError on anything wrong.

    Only the jobs MultiWorkerMirroredStrategy uses ("chief", at most one
    address, and "worker") are accepted; every address must be host:port.
    """
    if not raw:
        raise ParameterError("{backend} multiworker needs TF_CONFIG (or a Slurm job with several "
                             "tasks); TF_CONFIG is not set", "backend")
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = f"{e.msg} at char {e.pos}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise UsageError(f"TF_CONFIG is not valid JSON ({detail}): {raw[:80]!r}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"TF_CONFIG must be a JSON object, got {raw[:80]!r}")
    cluster = cfg.get("cluster")
    task = cfg.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UsageError(f"TF_CONFIG needs 'cluster' and 'task' objects, got keys {sorted(cfg)}")
    other = sorted(set(cluster) - set(MULTIWORKER_JOBS))
    if other:
        raise UsageError(f"TF_CONFIG cluster has job(s) {', '.join(map(repr, other))}: distbatch runs "
                         "MultiWorkerMirroredStrategy, whose cluster has only 'worker' (and optionally "
                         "one 'chief'); parameter servers and evaluators are not supported")
    for job in MULTIWORKER_JOBS:
        if job in cluster and not isinstance(cluster[job], list):
            raise UsageError(f"TF_CONFIG cluster '{job}' must be a list of 'host:port' addresses, "
                             f"got {cluster[job]!r:.80}")
    if len(cluster.get("chief", [])) > 1:
        raise UsageError(f"TF_CONFIG cluster 'chief' must have at most one address, got {cluster['chief']}")
    workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
    if not workers:
        raise UsageError(f"TF_CONFIG cluster has no 'worker' list: {json.dumps(cluster)[:80]}")
    for address in workers:
        check_worker_address(address, "TF_CONFIG")
    duplicates = sorted({a for a in workers if workers.count(a) > 1})
    if duplicates:
        raise UsageError(f"TF_CONFIG cluster names {duplicates[0]!r} more than once; every task needs "
                         "its own host:port")
    check_tf_config_entries(workers, task)
    ttype, index = task.get("type"), task.get("index")
    if ttype not in MULTIWORKER_JOBS:
        raise UsageError(f"TF_CONFIG task type must be 'worker' or 'chief', got {ttype!r}")
    names = cluster.get(ttype, [])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names):
        raise UsageError(f"TF_CONFIG task index {index!r} is out of range for the {len(names)} "
                         f"'{ttype}' address(es) in the cluster")
    global_index = index + (len(cluster.get("chief", [])) if ttype == "worker" else 0)
    return {"workers": workers, "index": global_index}


def slurm_task_count(env: Mapping[str, str]) -> int:
    try:
        return int(env.get("SLURM_NTASKS", "0") or 0)
    except ValueError:
        return 0


MWMS_IMPLEMENTATIONS = ("auto", "ring", "nccl")


@dataclass(frozen=True)
class CollectiveOptions:
    """MultiWorkerMirroredStrategy's tf.distribute.experimental.CommunicationOptions.

    implementation: auto (TF picks), ring (gRPC ring, CPU and GPU) or nccl (GPUs);
    bytes_per_pack: 0 lets TF choose (one pack), else collectives of about this size;
    timeout_seconds: a collective that takes longer fails instead of hanging (None: never).
    Errors name them as a run's parameters: mwms_implementation, bytes_per_pack and
    collective_timeout (TrainConfig's fields).
    """
    implementation: str = "auto"
    bytes_per_pack: int = 0
    timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.implementation not in MWMS_IMPLEMENTATIONS:
            raise ParameterError(f"{{mwms_implementation}} must be one of "
                                 f"{', '.join(MWMS_IMPLEMENTATIONS)}, got {self.implementation!r}",
                                 "mwms_implementation")
        if isinstance(self.bytes_per_pack, bool) or not isinstance(self.bytes_per_pack, int) \
                or self.bytes_per_pack < 0:
            raise ParameterError(f"{{bytes_per_pack}} must be a whole number >= 0 (0 = TensorFlow's "
                                 f"choice), got {self.bytes_per_pack!r}", "bytes_per_pack")
        if self.timeout_seconds is not None and not 0 < self.timeout_seconds < float("inf"):
            raise ParameterError(f"{{collective_timeout}} must be a finite number > 0 of seconds, "
                                 f"got {self.timeout_seconds}", "collective_timeout")

    @property
    def is_default(self) -> bool:
        return self == CollectiveOptions()

    def to_tf(self, tf):
        impl = getattr(tf.distribute.experimental.CommunicationImplementation, self.implementation.upper())
        return tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=self.bytes_per_pack, timeout_seconds=self.timeout_seconds,
            implementation=impl)
