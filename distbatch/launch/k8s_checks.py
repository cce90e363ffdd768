"""Offline checks of Kubernetes manifests: names, image references, the operators' CRD
schemas (vendored in k8s_schemas/, validated with jsonschema) and the rules their admission
webhooks add on top of the schemas.

No cluster is needed or contacted: `kubectl --dry-run=client` needs an API server, so the
schema and the admission rules are applied here, before a manifest is written.

Admission rules, re-implemented from the operators' Go sources:

* MPIJob: kubeflow/mpi-operator v0.8.0, pkg/apis/kubeflow/validation/validation.go
* TFJob: kubeflow/training-operator v1.9.0, pkg/webhooks/tensorflow/tfjob_webhook.go
* JobSet: kubernetes-sigs/jobset v0.12.0, pkg/webhooks/jobset_webhook.go
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from distbatch.errors import UsageError

SCHEMA_DIR = Path(__file__).with_name("k8s_schemas")
# (apiVersion, kind) -> vendored schema file.
SCHEMA_FILES = {
    ("kubeflow.org/v2beta1", "MPIJob"): "mpijob.kubeflow.org.v2beta1.json",
    ("kubeflow.org/v1", "TFJob"): "tfjob.kubeflow.org.v1.json",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.jobset.x-k8s.io.v1alpha2.json",
}
INT32_MAX = 2**31 - 1

# k8s.io/apimachinery/pkg/util/validation: IsDNS1035Label, IsDNS1123Label, IsDNS1123Subdomain.
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_MAX, SUBDOMAIN_MAX = 63, 253


def is_dns1035_label(value: str) -> bool:
    """Service and pod host names: lower-case letters, digits, '-', starting with a letter."""
    return len(value) <= LABEL_MAX and bool(_DNS1035_LABEL.match(value))


def is_dns1123_label(value: str) -> bool:
    """Namespaces: like a DNS-1035 label, but may start with a digit."""
    return len(value) <= LABEL_MAX and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: str) -> bool:
    """Persistent volume claims and secrets: DNS-1123 labels joined by '.', at most 253 characters."""
    return len(value) <= SUBDOMAIN_MAX and bool(_DNS1123_SUBDOMAIN.match(value))


# github.com/distribution/reference regexp.go: [domain[:port]/]path[:tag][@digest].
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"({_NAME})(?::[\w][\w.-]{{0,127}})?"
                        r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?\Z")
NAME_TOTAL_MAX = 255


def is_image_reference(value: str) -> bool:
    """A container image reference as container runtimes parse it (e.g. registry:5000/team/img:tag)."""
    found = _REFERENCE.match(value)
    return bool(found) and len(found.group(1)) <= NAME_TOTAL_MAX


class ManifestError(UsageError):
    """A generated manifest that its operator's schema or admission rules would reject."""


@functools.lru_cache(maxsize=None)
def load_schema(api_version: str, kind: str) -> dict:
    """The vendored, trimmed schema for (apiVersion, kind)."""
    name = SCHEMA_FILES.get((api_version, kind))
    if name is None:
        raise ManifestError(f"no vendored schema for apiVersion {api_version!r} kind {kind!r}; expected "
                            f"one of {sorted(f'{v} {k}' for v, k in SCHEMA_FILES)}")
    return json.loads((SCHEMA_DIR / name).read_text())


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the manifest)"


def schema_errors(manifest: dict) -> list[str]:
    """Every place `manifest` breaks its kind's vendored CRD schema, as 'path: message', sorted."""
    try:
        import jsonschema
    except ImportError:
        raise UsageError("the jsonschema package is needed to validate Kubernetes manifests and is "
                         "not installed; expected it installed with distbatch "
                         "(pip install 'jsonschema>=4')") from None
    if not isinstance(manifest, dict):
        return [f"(the manifest): expected an object, got {type(manifest).__name__}"]
    schema = load_schema(str(manifest.get("apiVersion")), str(manifest.get("kind")))
    validator = jsonschema.Draft7Validator(schema)
    found = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_where(e.absolute_path)}: {e.message}" for e in found]


def _label_errors(where: str, value: str) -> list[str]:
    if is_dns1035_label(value):
        return []
    return [f"{where}: {value!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
            f"starting with a letter, ending with a letter or digit, at most {LABEL_MAX} characters)"]


def _containers(spec: dict) -> list:
    return (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []


def mpijob_admission_errors(job: dict) -> list[str]:
    """The MPI Operator's validation (after its defaulting) of an MPIJob."""
    spec, name = job.get("spec") or {}, (job.get("metadata") or {}).get("name", "")
    replicas_specs = spec.get("mpiReplicaSpecs") or {}
    errors = []
    workers = (replicas_specs.get("Worker") or {}).get("replicas") or 1
    errors += _label_errors("metadata.name", name)
    errors += _label_errors("metadata.name (its last worker's pod and host name)",
                            f"{name}-worker-{workers - 1}")
    if spec.get("slotsPerWorker") is None:
        errors.append("spec.slotsPerWorker: must be set (the number of slots per worker)")
    elif spec["slotsPerWorker"] < 0:
        errors.append(f"spec.slotsPerWorker: must be >= 0, got {spec['slotsPerWorker']}")
    clean = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if clean not in ("None", "Running", "All"):
        errors.append(f"spec.runPolicy.cleanPodPolicy: must be None, Running or All, got {clean!r}")
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        value = (spec.get("runPolicy") or {}).get(field)
        if value is not None and value < 0:
            errors.append(f"spec.runPolicy.{field}: must be >= 0, got {value}")
    if spec.get("mpiImplementation", "OpenMPI") not in ("OpenMPI", "Intel", "MPICH"):
        errors.append("spec.mpiImplementation: must be OpenMPI, Intel or MPICH, got "
                      f"{spec['mpiImplementation']!r}")
    # types.go's Enum marker for it is misspelt, so the CRD itself does not check it.
    if spec.get("launcherCreationPolicy", "AtStartup") not in ("AtStartup", "WaitForWorkersReady"):
        errors.append("spec.launcherCreationPolicy: must be AtStartup or WaitForWorkersReady, got "
                      f"{spec['launcherCreationPolicy']!r}")
    if spec.get("sshAuthMountPath", "/root/.ssh") == "":
        errors.append("spec.sshAuthMountPath: must not be empty")
    for role in sorted(set(replicas_specs) - {"Launcher", "Worker"}):
        errors.append(f"spec.mpiReplicaSpecs.{role}: unknown replica type, expected Launcher and Worker")
    if "Launcher" not in replicas_specs:
        errors.append("spec.mpiReplicaSpecs.Launcher: must be set")
    for role, rspec in sorted(replicas_specs.items()):
        rspec = rspec or {}
        where = f"spec.mpiReplicaSpecs.{role}"
        if rspec.get("replicas") is None:
            errors.append(f"{where}.replicas: must be set")
        elif role == "Launcher" and rspec["replicas"] != 1:
            errors.append(f"{where}.replicas: must be 1, got {rspec['replicas']}")
        elif role == "Worker" and rspec["replicas"] < 1:
            errors.append(f"{where}.replicas: must be >= 1, got {rspec['replicas']}")
        policy = rspec.get("restartPolicy", "OnFailure" if role == "Launcher" else "Never")
        if policy not in ("Never", "OnFailure"):
            errors.append(f"{where}.restartPolicy: must be Never or OnFailure, got {policy!r}")
        if not _containers(rspec):
            errors.append(f"{where}.template.spec.containers: must hold at least one container")
    return errors


TF_REPLICA_TYPES = ("Chief", "Master", "Worker", "PS", "Evaluator")
TF_CONTAINER = "tensorflow"  # the only container the Training Operator gives TF_CONFIG and watches


def tfjob_admission_errors(job: dict) -> list[str]:
    """The Training Operator's TFJob webhook, plus its replica types and pod names."""
    spec, name = job.get("spec") or {}, (job.get("metadata") or {}).get("name", "")
    replica_specs = spec.get("tfReplicaSpecs")
    errors = _label_errors("metadata.name", name)
    if not replica_specs:
        return errors + ["spec.tfReplicaSpecs: must be set"]
    for role, rspec in sorted(replica_specs.items()):
        rspec, where = rspec or {}, f"spec.tfReplicaSpecs.{role}"
        if role not in TF_REPLICA_TYPES:
            errors.append(f"{where}: unknown replica type, expected one of {', '.join(TF_REPLICA_TYPES)}")
        containers = _containers(rspec)
        if not containers:
            errors.append(f"{where}.template.spec.containers: must hold at least one container")
        for i, container in enumerate(containers):
            if not container.get("image"):
                errors.append(f"{where}.template.spec.containers[{i}].image: must be set")
        if containers and not any(c.get("name") == TF_CONTAINER for c in containers):
            errors.append(f"{where}.template.spec.containers: must hold a container named {TF_CONTAINER!r}, "
                          f"got {[c.get('name') for c in containers]}")
        policy = rspec.get("restartPolicy", "Never")
        if policy not in ("Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"{where}.restartPolicy: must be Always, OnFailure, Never or ExitCode, "
                          f"got {policy!r}")
        last = max(int(rspec.get("replicas") or 1), 1) - 1
        errors += _label_errors(f"{where} (its last pod's name)", f"{name}-{role.lower()}-{last}")
    if sum(role in ("Chief", "Master") for role in replica_specs) > 1:
        errors.append("spec.tfReplicaSpecs: must not have more than 1 Chief or Master role")
    return errors


JOBSET_POD_SUFFIX = "-abcde"  # the webhook's stand-in for the random suffix of a pod name


def jobset_admission_errors(job: dict) -> list[str]:
    """The JobSet webhook's name rules, and the indexed-Job shape TF_CONFIG is built from."""
    spec, name = job.get("spec") or {}, (job.get("metadata") or {}).get("name", "")
    errors = []
    subdomain = (spec.get("network") or {}).get("subdomain")
    if subdomain is not None:
        if not is_dns1123_subdomain(subdomain):
            errors.append(f"spec.network.subdomain: {subdomain!r} is not a DNS-1123 subdomain")
        errors += _label_errors("spec.network.subdomain", subdomain)
    for i, rjob in enumerate(spec.get("replicatedJobs") or []):
        where = f"spec.replicatedJobs[{i}]"
        replicas = rjob.get("replicas", 1)
        jspec = (rjob.get("template") or {}).get("spec") or {}
        errors += _label_errors(f"{where}.name (its last Job's name)",
                                f"{name}-{rjob.get('name')}-{replicas - 1}")
        completions, parallelism = jspec.get("completions"), jspec.get("parallelism", 1)
        if jspec.get("completionMode", "Indexed") != "Indexed":
            errors.append(f"{where}.template.spec.completionMode: must be Indexed (TF_CONFIG is built "
                          f"from the completion index), got {jspec['completionMode']!r}")
        if completions is not None:
            errors += _label_errors(f"{where}.name (its last pod's name)",
                                    f"{name}-{rjob.get('name')}-{replicas - 1}-{completions - 1}"
                                    + JOBSET_POD_SUFFIX)
            if completions != parallelism:
                errors.append(f"{where}.template.spec: completions ({completions}) and parallelism "
                              f"({parallelism}) must be equal: every worker runs at once")
        if parallelism * replicas > INT32_MAX:
            errors.append(f"{where}: replicas x parallelism must not exceed {INT32_MAX}")
    return errors


ADMISSION = {"MPIJob": mpijob_admission_errors, "TFJob": tfjob_admission_errors,
             "JobSet": jobset_admission_errors}


def manifest_errors(manifest: dict) -> list[str]:
    """Schema errors, then (when the schema holds) the admission rules' errors."""
    errors = schema_errors(manifest)
    return errors or ADMISSION[manifest["kind"]](manifest)


def check_manifest(manifest: dict) -> dict:
    """`manifest` if it passes its schema and admission rules; ManifestError (one line) otherwise."""
    errors = manifest_errors(manifest)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        source = load_schema(manifest["apiVersion"], manifest["kind"]).get("x-source", {})
        raise ManifestError(f"the {manifest['kind']} manifest does not validate against "
                            f"{source.get('repository')} {source.get('tag')} ({manifest['apiVersion']}): "
                            f"{errors[0]}{more}; nothing was written")
    return manifest
