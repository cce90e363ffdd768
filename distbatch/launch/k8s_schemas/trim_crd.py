"""Rebuild the vendored schemas in this folder from the operators' full CRDs.

    python distbatch/launch/k8s_schemas/trim_crd.py MPIJOB_CRD.yaml TFJOB_CRD.yaml JOBSET_CRD.yaml

Each argument is the CRD file named in SOURCES, at the tag named there (README.md says
where to get them). A maintenance tool, never run by distbatch itself (it needs PyYAML).

The schema kept is the CRD's openAPIV3Schema for one version, trimmed to the fields that
distbatch's builders generate: the builders are run on SAMPLES (every option on and off),
and an object keeps only the properties some sample uses, with ``additionalProperties:
false`` added so that a misspelled or unexpected key fails validation (CRDs accept unknown
keys and drop them silently). A key a sample uses that the CRD lacks stops this tool:
that is the check that the builders write only fields the operator knows. Types, enums,
patterns, formats and required lists are kept as the CRD has them; int32/int64 formats
also get their bounds as minimum/maximum (jsonschema does not check formats). Dropped:
descriptions, defaults and the x-kubernetes-* extensions, including CEL rules
(x-kubernetes-validations), which jsonschema cannot evaluate.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from distbatch.launch import k8s

HERE = Path(__file__).resolve().parent
# kind -> (file written here, repository, tag, commit, CRD file in the repository, version)
SOURCES = {
    "MPIJob": ("mpijob.kubeflow.org.v2beta1.json", "kubeflow/mpi-operator", "v0.8.0",
               "101db144e019e1de65aaded07745e9d805c2852a", "manifests/base/kubeflow.org_mpijobs.yaml",
               "v2beta1"),
    "TFJob": ("tfjob.kubeflow.org.v1.json", "kubeflow/training-operator", "v1.9.0",
              "6f74c7f6b2ed6c27aabd82d0a316b23f0646059c", "manifests/base/crds/kubeflow.org_tfjobs.yaml", "v1"),
    "JobSet": ("jobset.jobset.x-k8s.io.v1alpha2.json", "kubernetes-sigs/jobset", "v0.12.0",
               "f22e565ac3cc3265c7c45ef67ecffdc689af5d77",
               "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml", "v1alpha2"),
}
KEPT = ("type", "enum", "format", "pattern", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "required", "anyOf", "oneOf", "allOf")
BOUNDS = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}
# metadata is `type: object` in every CRD (the API server checks ObjectMeta): this subset of
# ObjectMeta (k8s.io/apimachinery/pkg/apis/meta/v1) is written here by hand.
OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def samples() -> list[dict]:
    """Manifests from every combination of the options that change which fields appear."""
    out = []
    command = ("distbatch", "train", "--out", "runs/x")
    for kind in k8s.KINDS:
        for gpus, pvc, restarts, extra in ((0, None, 0, {}), (2, "data", 2, {"namespace": "ml"}),
                                           (1, "data", 0, {"min_workers": 1, "max_workers": 4}),
                                           (1, None, 0, {"mpi_launcher": "horovodrun"}),
                                           (1, "data", 1, {"cluster_secret": "key"})):
            if (kind != "mpijob" and ("min_workers" in extra or "mpi_launcher" in extra)) or \
                    (kind == "mpijob" and "cluster_secret" in extra):
                continue
            job = k8s.check_job(k8s.K8sJob(kind=kind, name="sample", image="img:1", workers=2,
                                           gpus_per_worker=gpus, command=command, pvc=pvc,
                                           max_restarts=restarts, **extra))
            out.append(k8s.BUILDERS[kind](job))
    return out


def _strip(schema):
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k in KEPT or k in ("properties", "items")}
    if isinstance(schema, list):
        return [_strip(x) for x in schema]
    return schema


def trim(schema: dict, values: list, path: str) -> dict:
    out = {k: _strip(schema[k]) for k in KEPT if k in schema}
    if schema.get("format") in BOUNDS and schema.get("type") == "integer":
        low, high = BOUNDS[schema["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    objects = [v for v in values if isinstance(v, dict)]
    if "properties" in schema:
        used = list(dict.fromkeys(k for o in objects for k in o))
        unknown = [k for k in used if k not in schema["properties"]]
        if unknown:
            sys.exit(f"{path}: the builders write {unknown}, which the CRD does not define")
        out["properties"] = {k: trim(schema["properties"][k], [o[k] for o in objects if k in o], f"{path}.{k}")
                             for k in schema["properties"] if k in used}
        out["additionalProperties"] = False
    elif isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = trim(schema["additionalProperties"],
                                           [x for o in objects for x in o.values()], f"{path}.*")
    if "items" in schema:
        out["items"] = trim(schema["items"], [x for v in values if isinstance(v, list) for x in v], f"{path}[]")
    return out


def main(paths: list[str]) -> None:
    made = samples()
    for path in paths:
        text = Path(path).read_bytes()
        crd = yaml.safe_load(text)
        kind = crd["spec"]["names"]["kind"]
        name, repo, tag, commit, file, version = SOURCES[kind]
        served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        full = served["schema"]["openAPIV3Schema"]
        group = crd["spec"]["group"]
        mine = [m for m in made if m["kind"] == kind]
        spec = trim(full["properties"]["spec"], [m["spec"] for m in mine], "spec")
        schema = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "$comment": (f"{kind} {group}/{version}: openAPIV3Schema of {repo} {tag} {file}, trimmed to the "
                         "fields distbatch writes, unknown keys rejected; rebuilt by trim_crd.py"),
            "x-source": {"repository": repo, "tag": tag, "commit": commit, "file": file, "version": version,
                         "sha256": hashlib.sha256(text).hexdigest(),
                         "hand-written": "apiVersion and kind pinned; metadata: a subset of ObjectMeta"},
            "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"type": "string", "enum": [f"{group}/{version}"]},
                           "kind": {"type": "string", "enum": [kind]},
                           "metadata": OBJECT_META, "spec": spec},
        }
        (HERE / name).write_text(json.dumps(schema, indent=1) + "\n")
        print(f"wrote {HERE / name} ({len(json.dumps(schema))} bytes from {len(text)})")


if __name__ == "__main__":
    main(sys.argv[1:])
