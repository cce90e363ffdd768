"""Kubernetes manifests for distbatch jobs: ``distbatch launch k8s --kind {mpijob,tfjob,jobset}``.

Three ways to run the same training command on a cluster:

* ``mpijob``: an MPIJob (kubeflow.org/v2beta1) for the MPI Operator. A launcher pod runs
  ``mpirun`` (or ``horovodrun``) with -np = workers x slots; worker pods run sshd and
  host ``slotsPerWorker`` = GPUs per worker ranks each (1 on CPU). With --min-workers /
  --max-workers the launcher runs Horovod Elastic, finding hosts through the
  discover_hosts.sh the operator keeps up to date.
* ``tfjob``: a TFJob (kubeflow.org/v1) for the Training Operator: Worker replicas whose
  container is named "tensorflow"; the operator writes TF_CONFIG.
* ``jobset``: a JobSet (jobset.x-k8s.io/v1alpha2) for clusters without the Training
  Operator: one indexed Job whose pods build TF_CONFIG from their completion index and
  the stable host names the JobSet's headless service gives them.

Every manifest is checked offline (:mod:`distbatch.launch.k8s_checks`) before it is
returned. Builders are pure functions of a :class:`K8sJob`; nothing here contacts a cluster.
"""
from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from distbatch.backends.cluster import SECRET_ENV
from distbatch.errors import UsageError
from distbatch.fileio import atomic_write_text
from distbatch.launch import restarts
from distbatch.launch.k8s_checks import (INT32_MAX, TF_CONTAINER, check_manifest, is_dns1035_label,
                                         is_dns1123_label, is_dns1123_subdomain, is_image_reference,
                                         load_schema)
from distbatch.launch.k8s_yaml import to_yaml

KINDS = ("mpijob", "tfjob", "jobset")
MPI_LAUNCHERS = ("mpirun", "horovodrun")
DEFAULT_MOUNT_PATH = "/workspace"
VOLUME = "workspace"               # the pod volume holding the PVC
SECRET_KEY = "secret"              # the key of the Kubernetes Secret (--cluster-secret) holding SECRET_ENV
TF_PORT = 2222                     # the Training Operator's default port; JobSet workers use it too
TFJOB_PORT_NAME = "tfjob-port"     # the port name the Training Operator looks for
JOBSET_WORKERS = "worker"          # the JobSet's replicatedJob
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_FALLBACK_ENV = "COMPLETION_INDEX"  # the annotation, for nodes whose Job controller sets no env
MPI_HOSTFILE = "/etc/mpi/hostfile"                   # written by the MPI Operator
MPI_DISCOVER_HOSTS = "/etc/mpi/discover_hosts.sh"    # written by the MPI Operator: running workers
SSHD = ["/usr/sbin/sshd", "-De"]
GPU_RESOURCE = "nvidia.com/gpu"
SCRIPT_NAME = "distbatch-pod"      # $0 of the pods' sh -c scripts (shown in their error lines)
NO_VOLUME_NOTE = ("distbatch launch k8s: no --pvc: the run's --out stays inside the pods and is lost "
                  "with them (docs/kubernetes.md)")
EXPECTED_BACKEND = {"mpijob": "horovod", "tfjob": "multiworker", "jobset": "multiworker"}
BACKENDS = ("single", "mirrored", "multiworker", "horovod")


@dataclass(frozen=True)
class K8sJob:
    """One distributed job as the user describes it; check_job() validates and completes it."""
    kind: str
    name: str
    image: str
    workers: int
    gpus_per_worker: int
    command: tuple[str, ...]
    min_workers: int | None = None
    max_workers: int | None = None
    max_restarts: int = 0
    namespace: str | None = None
    pvc: str | None = None
    mount_path: str = DEFAULT_MOUNT_PATH
    cluster_secret: str | None = None
    mpi_launcher: str | None = None   # mpijob: mpirun (default) or horovodrun; horovodrun when elastic

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None or self.max_workers is not None

    @property
    def slots(self) -> int:
        """MPI ranks per worker pod: one per GPU, one on a CPU-only pod."""
        return max(self.gpus_per_worker, 1)


def _count(value, flag: str, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= INT32_MAX:
        raise UsageError(f"{flag} must be an integer in {lowest}..{INT32_MAX}, got {value!r}")
    return value


def _or(value, default):
    return default if value is None else value


def _flag(command, flag: str) -> str | None:
    """The value of ``flag`` in the command (``--flag V`` or ``--flag=V``; the last one)."""
    found = None
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            found = command[i + 1]
        elif word.startswith(flag + "="):
            found = word.partition("=")[2]
    return found


def _last_pod(job: K8sJob) -> str:
    """The longest pod (and host) name the operator will create for this job."""
    if job.kind == "jobset":  # <jobset>-<rjob>-<job index>-<pod index>, plus a 5-character suffix
        return f"{job.name}-{JOBSET_WORKERS}-0-{job.workers - 1}-abcde"
    return f"{job.name}-worker-{max(job.workers, job.max_workers or 0) - 1}"


def check_job(job: K8sJob) -> K8sJob:
    """`job` with its defaults filled in, or UsageError (one line, naming the value) for bad input."""
    if job.kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {job.kind!r}")
    if not isinstance(job.name, str) or not is_dns1035_label(job.name):
        raise UsageError(f"--name must be a DNS-1035 label (lower-case letters, digits and '-', starting with "
                         f"a letter, ending with a letter or digit, at most 63 characters), got {job.name!r}")
    if not isinstance(job.image, str) or not is_image_reference(job.image):
        raise UsageError(f"--image must be a container image reference such as registry.example.com/team/"
                         f"distbatch:1.0 (no spaces, lower-case repository), got {job.image!r}")
    _count(job.workers, "--workers", 1)
    _count(job.gpus_per_worker, "--gpus-per-worker", 0)
    restarts.check_max_restarts(job.max_restarts)
    _count(job.max_restarts, "--max-restarts", 0)
    command = tuple(job.command or ())
    command = command[1:] if command[:1] == ("--",) else command
    if not command:
        raise UsageError("missing COMMAND: expected `-- COMMAND...` after the options, e.g. -- distbatch "
                         f"train ... --backend {EXPECTED_BACKEND[job.kind]}, got nothing")
    job = replace(job, command=command)
    _check_elastic(job)
    if job.elastic:
        job = replace(job, min_workers=_or(job.min_workers, job.workers),
                      max_workers=_or(job.max_workers, job.workers))
    pod = _last_pod(job)
    if not is_dns1035_label(pod):
        raise UsageError(f"--name {job.name!r} is too long for {max(job.workers, job.max_workers or 0)} "
                         f"workers: the pod name {pod!r} would have {len(pod)} characters, expected at most "
                         "63 (use a shorter --name)")
    if job.namespace is not None and not is_dns1123_label(job.namespace):
        raise UsageError(f"--namespace must be a DNS-1123 label (lower-case letters, digits and '-', at most "
                         f"63 characters), got {job.namespace!r}")
    _check_volume(job)
    _check_command(job)
    return job


def _check_elastic(job: K8sJob) -> None:
    if job.mpi_launcher is not None and (job.kind != "mpijob" or job.mpi_launcher not in MPI_LAUNCHERS):
        raise UsageError(f"--mpi-launcher {job.mpi_launcher!r}: expected mpirun or horovodrun, with --kind "
                         "mpijob")
    if not job.elastic:
        return
    if job.kind != "mpijob":
        raise UsageError(f"--min-workers/--max-workers with --kind {job.kind}: a {job.kind}'s TF_CONFIG fixes "
                         "its workers; expected --kind mpijob (Horovod Elastic), or no --min/--max-workers")
    if job.mpi_launcher == "mpirun":
        raise UsageError("--mpi-launcher mpirun with --min-workers/--max-workers: Horovod Elastic needs "
                         "horovodrun; expected --mpi-launcher horovodrun (the default when elastic)")
    low = _count(_or(job.min_workers, job.workers), "--min-workers", 1)
    high = _count(_or(job.max_workers, job.workers), "--max-workers", 1)
    if low > high and None not in (job.min_workers, job.max_workers):
        raise UsageError(f"--min-workers {low} is greater than --max-workers {high}; expected min <= max")
    if high < job.workers:
        raise UsageError(f"--max-workers {high} is less than --workers {job.workers}; expected "
                         "--max-workers >= --workers (the job starts with --workers)")
    if low > job.workers:
        raise UsageError(f"--min-workers {low} is greater than --workers {job.workers}; expected "
                         "--min-workers <= --workers (the job starts with --workers)")


def _check_volume(job: K8sJob) -> None:
    mount = job.mount_path
    if not (isinstance(mount, str) and mount.startswith("/") and posixpath.normpath(mount) not in ("/", "//")
            and not any(c.isspace() or c == ":" for c in mount) and ".." not in mount.split("/")):
        raise UsageError(f"--mount-path must be an absolute directory other than / (no spaces, ':' or '..'), "
                         f"got {mount!r}")
    for flag, value in (("--pvc", job.pvc), ("--cluster-secret", job.cluster_secret)):
        if value is not None and not is_dns1123_subdomain(value):
            raise UsageError(f"{flag} must name a Kubernetes object: a DNS-1123 subdomain (lower-case letters, "
                             f"digits, '-' and '.'), got {value!r}")
    if job.cluster_secret is not None and job.kind == "mpijob":
        raise UsageError("--cluster-secret with --kind mpijob: the secret is the multiworker backend's "
                         "rendezvous key; Horovod ranks meet through MPI/Gloo; expected --kind tfjob or jobset")
    out = restarts.out_dir(list(job.command))
    if job.pvc and out is not None:  # relative to the working directory, the mount path
        where = posixpath.normpath(posixpath.join(mount, out))
        if posixpath.commonpath([where, posixpath.normpath(mount)]) != posixpath.normpath(mount):
            raise UsageError(f"the command's --out {out!r} is not on the shared volume mounted at --mount-path "
                             f"{mount!r}; expected a relative --out inside it or one under {mount}")


def _check_command(job: K8sJob) -> None:
    backend = _flag(job.command, "--backend")
    expected = EXPECTED_BACKEND[job.kind]
    if backend in BACKENDS and backend != expected:
        how = ("runs one process per slot under MPI" if job.kind == "mpijob"
               else "runs one TensorFlow process per pod with TF_CONFIG")
        raise UsageError(f"--kind {job.kind} {how}: the command's --backend {backend} does not fit; "
                         f"expected --backend {expected}")
    if job.max_restarts:
        restarts.check_restart_command(list(job.command), job.max_restarts)
        if restarts.out_dir(list(job.command)) is None:
            raise UsageError(f"--max-restarts {job.max_restarts} resumes from the checkpoints in the command's "
                             "--out, which it lacks; expected --out DIR in the command")
        if not job.pvc:
            raise UsageError(f"--max-restarts {job.max_restarts} resumes from the checkpoints in --out, which "
                             "restarted pods see only on a shared volume; expected --pvc CLAIM")
        if "--overwrite" in job.command:
            raise UsageError(f"--overwrite with --max-restarts {job.max_restarts}: a restarted pod could not "
                             "tell its own run from the one --overwrite replaces; expected a new --out and no "
                             "--overwrite")


# --- pods ---------------------------------------------------------------------------------

def resume_script(job: K8sJob) -> str:
    """sh lines adding --resume to "$@" when --out already holds a run: every restart
    (pod or container) continues from the newest checkpoint; the first start finds --out empty.
    All workers decide alike: none can write --out before every worker has started."""
    out = shlex.quote(restarts.out_dir(list(job.command)))
    return (f'if [ -n "$(ls -A {out} 2>/dev/null)" ]; then set -- "$@" --resume; fi\n')


def tf_config_script(job: K8sJob) -> str:
    """sh lines exporting TF_CONFIG for a JobSet pod: every worker's stable host name
    <jobset>-<rjob>-0-<i>.<jobset>:PORT, and this pod's completion index as the task index."""
    host = f"{job.name}-{JOBSET_WORKERS}-0-$n.{job.name}:{TF_PORT}"
    return (f'i="${{JOB_COMPLETION_INDEX:-${{{INDEX_FALLBACK_ENV}:-}}}}"\n'
            'case "$i" in\n'
            "  ''|*[!0-9]*)\n"
            "    echo \"$0: no job completion index (got '$i'); expected an indexed Job\" >&2; exit 1 ;;\n"
            "esac\n"
            f'if [ "$i" -ge {job.workers} ]; then\n'
            f'  echo "$0: completion index $i, expected 0..{job.workers - 1}" >&2; exit 1\n'
            "fi\n"
            "workers=\n"
            "n=0\n"
            f'while [ "$n" -lt {job.workers} ]; do\n'
            f'  workers="$workers${{workers:+,}}\\"{host}\\""\n'
            "  n=$((n + 1))\n"
            "done\n"
            'TF_CONFIG="{\\"cluster\\":{\\"worker\\":[$workers]},'
            '\\"task\\":{\\"type\\":\\"worker\\",\\"index\\":$i}}"\n'
            "export TF_CONFIG\n")


def pod_command(job: K8sJob, argv: list[str], *, tf_config: bool = False) -> dict:
    """`command`/`args` of a container running `argv`, through an sh script when the pod
    must build TF_CONFIG or add --resume on a restart."""
    script = (tf_config_script(job) if tf_config else "") + (resume_script(job) if job.max_restarts else "")
    if not script:
        return {"command": list(argv)}
    return {"command": ["/bin/sh", "-c", script + 'exec "$@"\n', SCRIPT_NAME], "args": list(argv)}


def container(job: K8sJob, name: str, run: dict, *, gpus: int = 0, env: list | None = None,
              ports: list | None = None) -> dict:
    c = {"name": name, "image": job.image, **run}
    if env:
        c["env"] = env
    if ports:
        c["ports"] = ports
    if gpus > 0:
        c["resources"] = {"limits": {GPU_RESOURCE: gpus}}
    if job.pvc:
        # A relative --out lands on the shared volume.
        c["volumeMounts"] = [{"name": VOLUME, "mountPath": job.mount_path}]
        c["workingDir"] = job.mount_path
    return c


def pod_template(job: K8sJob, containers: list[dict], **spec) -> dict:
    pod = {**spec, "containers": containers}
    if job.pvc:
        pod["volumes"] = [{"name": VOLUME, "persistentVolumeClaim": {"claimName": job.pvc}}]
    return {"spec": pod}


def secret_env(job: K8sJob) -> list[dict]:
    if not job.cluster_secret:
        return []
    ref = {"name": job.cluster_secret, "key": SECRET_KEY}
    return [{"name": SECRET_ENV, "valueFrom": {"secretKeyRef": ref}}]


def metadata(job: K8sJob) -> dict:
    meta = {"name": job.name}
    if job.namespace:
        meta["namespace"] = job.namespace
    meta["labels"] = {"app.kubernetes.io/name": "distbatch", "app.kubernetes.io/instance": job.name}
    return meta


# --- the three kinds ----------------------------------------------------------------------

def mpi_launcher_argv(job: K8sJob) -> list[str]:
    """The launcher's command: -np = workers x slots; elastic bounds in ranks, not pods."""
    np = str(job.workers * job.slots)
    if job.elastic:
        return ["horovodrun", "-np", np, "--min-np", str(job.min_workers * job.slots),
                "--max-np", str(job.max_workers * job.slots), "--slots-per-host", str(job.slots),
                "--host-discovery-script", MPI_DISCOVER_HOSTS, *job.command]
    if job.mpi_launcher == "horovodrun":
        return ["horovodrun", "-np", np, "--hostfile", MPI_HOSTFILE, *job.command]
    # The operator points Open MPI at its hostfile (OMPI_MCA_orte_default_hostfile).
    # --bind-to none --map-by slot: Horovod's advice (core binding starves TF's thread pools).
    return ["mpirun", "-np", np, "--allow-run-as-root", "--tag-output", "--bind-to", "none",
            "--map-by", "slot", "-x", "PATH", *job.command]


def mpijob(job: K8sJob) -> dict:
    launcher = container(job, "launcher", pod_command(job, mpi_launcher_argv(job)))
    worker = container(job, "worker", {"command": list(SSHD)}, gpus=job.gpus_per_worker)
    return {
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": metadata(job),
        "spec": {
            "slotsPerWorker": job.slots,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": job.max_restarts},
            "sshAuthMountPath": "/root/.ssh",
            "mpiImplementation": "OpenMPI",
            # The launcher's first ssh to a worker that is not up yet would fail the attempt.
            "launcherCreationPolicy": "WaitForWorkersReady",
            "mpiReplicaSpecs": {
                # Restarts of the launcher (a batch Job) count against runPolicy.backoffLimit.
                "Launcher": {"replicas": 1, "restartPolicy": "OnFailure",
                             "template": pod_template(job, [launcher])},
                # sshd comes back when it dies, so a restarted launcher finds every worker.
                "Worker": {"replicas": job.workers, "restartPolicy": "OnFailure",
                           "template": pod_template(job, [worker])},
            },
        },
    }


def tfjob_restart_policy(max_restarts: int) -> str:
    """Never without restarts; else OnFailure. Not ExitCode: a worker whose peer died exits 1
    (a failed collective), which ExitCode treats as permanent, and the operator counts only
    in-place container restarts (OnFailure) against runPolicy.backoffLimit."""
    return "OnFailure" if max_restarts else "Never"


def tfjob(job: K8sJob) -> dict:
    c = container(job, TF_CONTAINER, pod_command(job, list(job.command)), gpus=job.gpus_per_worker,
                  env=secret_env(job), ports=[{"name": TFJOB_PORT_NAME, "containerPort": TF_PORT}])
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": metadata(job),
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": job.max_restarts},
            "tfReplicaSpecs": {
                "Worker": {"replicas": job.workers, "restartPolicy": tfjob_restart_policy(job.max_restarts),
                           "template": pod_template(job, [c])},
            },
        },
    }


def jobset(job: K8sJob) -> dict:
    index_env = {"name": INDEX_FALLBACK_ENV, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}}
    c = container(job, "worker", pod_command(job, list(job.command), tf_config=True),
                  gpus=job.gpus_per_worker, env=[index_env, *secret_env(job)],
                  ports=[{"name": "tf-worker", "containerPort": TF_PORT}])
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata(job),
        "spec": {
            # A headless service named after the JobSet: pods resolve as <pod host name>.<jobset>.
            "network": {"enableDNSHostnames": True, "subdomain": job.name},
            # Any failed pod fails its Job (backoffLimit 0), and the JobSet recreates all of them.
            "failurePolicy": {"maxRestarts": job.max_restarts},
            "replicatedJobs": [{
                "name": JOBSET_WORKERS, "replicas": 1,
                "template": {"spec": {
                    "completionMode": "Indexed", "completions": job.workers, "parallelism": job.workers,
                    "backoffLimit": 0,
                    "template": pod_template(job, [c], restartPolicy="Never"),
                }},
            }],
        },
    }


BUILDERS = {"mpijob": mpijob, "tfjob": tfjob, "jobset": jobset}


def build_manifest(job: K8sJob) -> dict:
    """The checked manifest for `job` (UsageError for bad input, ManifestError if it would not validate)."""
    job = check_job(job)
    return check_manifest(BUILDERS[job.kind](job))


def render(manifest: dict) -> str:
    """YAML with a first comment line naming the schema it was validated against."""
    source = load_schema(manifest["apiVersion"], manifest["kind"]).get("x-source", {})
    return (f"# {manifest['kind']} {manifest['metadata']['name']}: validated offline against the CRD of "
            f"{source.get('repository')} {source.get('tag')} and its admission rules\n" + to_yaml(manifest))


def write_manifest(path: str, text: str) -> Path:
    """Write `text` to `path` atomically; UsageError (nothing written) when its directory is missing."""
    target = Path(path)
    parent = target.parent
    if not str(path).strip() or target.is_dir():
        raise UsageError(f"-o must name a file, got {path!r}")
    if not parent.is_dir():
        raise UsageError(f"-o {path!r}: the directory {str(parent)!r} does not exist; expected an existing "
                         "directory (nothing was written)")
    try:
        atomic_write_text(target, text)
    except OSError as e:
        raise UsageError(f"-o {path!r}: cannot write it ({e.strerror or e}); nothing was written") from None
    return target
