"""`distbatch launch k8s`: MPIJob, TFJob and JobSet manifests, checked field by field.

Every generated manifest is validated offline against the vendored, trimmed CRD schemas
(jsonschema) and the operators' admission rules; broken manifests must be rejected by both.
The JobSet pod's TF_CONFIG script and the restart wrapper are run here with sh and a fake
completion index, and the JSON they produce is compared with the expected cluster.
No cluster is contacted: there is none on this machine.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess

import pytest

from conftest import assert_one_line_error, cli_in_process, snapshot
from distbatch.launch import k8s
from distbatch.launch.k8s_checks import (SCHEMA_DIR, SCHEMA_FILES, ManifestError, check_manifest,
                                         is_image_reference, load_schema, manifest_errors, schema_errors)
from distbatch.launch.k8s_yaml import to_yaml

IMAGE = "registry.example.com/ml/distbatch:0.1"
TRAIN = ("distbatch", "train", "--dataset", "mnist1d", "--global-batch-size", "512", "--out", "runs/mnist")


def job(kind: str, **kw) -> k8s.K8sJob:
    backend = k8s.EXPECTED_BACKEND[kind]
    base = dict(kind=kind, name="mnist", image=IMAGE, workers=3, gpus_per_worker=4,
                command=("--", *TRAIN, "--backend", backend))
    return k8s.K8sJob(**{**base, **kw})


def build(kind: str, **kw) -> dict:
    return k8s.build_manifest(job(kind, **kw))


def pod_spec(replica: dict) -> dict:
    return replica["template"]["spec"]


def only_container(replica: dict) -> dict:
    (c,) = pod_spec(replica)["containers"]
    return c


# ------------------------------------------------------------------------------------ MPIJob
def test_mpijob_launcher_runs_mpirun_with_workers_times_gpus_ranks():
    m = build("mpijob")
    spec = m["spec"]
    assert (m["apiVersion"], m["kind"], m["metadata"]["name"]) == ("kubeflow.org/v2beta1", "MPIJob", "mnist")
    assert spec["slotsPerWorker"] == 4
    launcher, worker = spec["mpiReplicaSpecs"]["Launcher"], spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1 and worker["replicas"] == 3
    assert only_container(launcher)["command"] == [
        "mpirun", "-np", "12", "--allow-run-as-root", "--tag-output", "--bind-to", "none", "--map-by", "slot",
        "-x", "PATH", *TRAIN, "--backend", "horovod"]
    assert "resources" not in only_container(launcher)  # the launcher runs no rank
    w = only_container(worker)
    assert w["command"] == ["/usr/sbin/sshd", "-De"]
    assert w["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 0}
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"


def test_mpijob_cpu_workers_get_one_slot_and_no_gpu_limit():
    spec = build("mpijob", gpus_per_worker=0, workers=5)["spec"]
    assert spec["slotsPerWorker"] == 1
    assert only_container(spec["mpiReplicaSpecs"]["Launcher"])["command"][:3] == ["mpirun", "-np", "5"]
    assert "resources" not in only_container(spec["mpiReplicaSpecs"]["Worker"])


def test_mpijob_elastic_runs_horovodrun_with_the_operators_discovery_script():
    spec = build("mpijob", workers=3, gpus_per_worker=2, min_workers=2, max_workers=6)["spec"]
    assert only_container(spec["mpiReplicaSpecs"]["Launcher"])["command"] == [
        "horovodrun", "-np", "6", "--min-np", "4", "--max-np", "12", "--slots-per-host", "2",
        "--host-discovery-script", "/etc/mpi/discover_hosts.sh", *TRAIN, "--backend", "horovod"]
    assert spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 3  # starts with --workers


def test_mpijob_elastic_bounds_default_to_workers():
    argv = k8s.mpi_launcher_argv(k8s.check_job(job("mpijob", workers=3, gpus_per_worker=1, max_workers=5)))
    assert argv[:8] == ["horovodrun", "-np", "3", "--min-np", "3", "--max-np", "5", "--slots-per-host"]


def test_mpijob_horovodrun_static_reads_the_operators_hostfile():
    argv = k8s.mpi_launcher_argv(k8s.check_job(job("mpijob", mpi_launcher="horovodrun")))
    assert argv == ["horovodrun", "-np", "12", "--hostfile", "/etc/mpi/hostfile", *TRAIN, "--backend", "horovod"]


@pytest.mark.parametrize("kw, expected", [
    ({"min_workers": 2, "max_workers": 6},
     {"num_proc": 6, "min_num_proc": 4, "max_num_proc": 12, "slots": 2,
      "host_discovery_script": "/etc/mpi/discover_hosts.sh", "hostfile": None}),
    ({"mpi_launcher": "horovodrun"}, {"num_proc": 6, "min_num_proc": None, "hostfile": "/etc/mpi/hostfile"})])
def test_horovodrun_reads_the_launcher_flags_as_meant(kw, expected, monkeypatch):
    launch = pytest.importorskip("horovod.runner.launch")
    argv = k8s.mpi_launcher_argv(k8s.check_job(job("mpijob", workers=3, gpus_per_worker=2, **kw)))
    monkeypatch.setattr("sys.argv", argv)
    args = launch.parse_args()  # horovodrun's own parser: no abbreviation or typo slips through
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.command == [*TRAIN, "--backend", "horovod"]
    # Each flag spelt out in full (argparse would also take an abbreviation such as --slots).
    source = inspect.getsource(launch.parse_args)
    flags = [w for w in argv[:-len(args.command)] if w.startswith("--")]
    assert [f for f in flags if f"'{f}'" not in source] == []


def test_mpijob_restarts_set_backoff_limit_and_resume_wrapper():
    m = build("mpijob", max_restarts=3, pvc="runs")
    assert m["spec"]["runPolicy"]["backoffLimit"] == 3
    launcher = only_container(m["spec"]["mpiReplicaSpecs"]["Launcher"])
    assert launcher["command"][:2] == ["/bin/sh", "-c"] and launcher["args"][:3] == ["mpirun", "-np", "12"]
    assert launcher["args"][-len(TRAIN) - 2:] == [*TRAIN, "--backend", "horovod"]


# ------------------------------------------------------------------------------------- TFJob
def test_tfjob_workers_run_the_command_in_a_container_named_tensorflow():
    m = build("tfjob")
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "TFJob")
    (role,) = m["spec"]["tfReplicaSpecs"]
    worker = m["spec"]["tfReplicaSpecs"]["Worker"]
    assert role == "Worker" and worker["replicas"] == 3
    c = only_container(worker)
    assert c["name"] == "tensorflow"
    assert c["command"] == [*TRAIN, "--backend", "multiworker"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    assert c["ports"] == [{"name": "tfjob-port", "containerPort": 2222}]
    assert "TF_CONFIG" not in json.dumps(m)  # the operator writes it


@pytest.mark.parametrize("restarts, policy", [(0, "Never"), (1, "OnFailure"), (5, "OnFailure")])
def test_tfjob_restart_policy_follows_max_restarts(restarts, policy):
    m = build("tfjob", max_restarts=restarts, pvc="runs")
    assert m["spec"]["tfReplicaSpecs"]["Worker"]["restartPolicy"] == policy
    assert m["spec"]["runPolicy"]["backoffLimit"] == restarts


def test_shared_volume_mounts_the_claim_and_works_in_it():
    c_spec = pod_spec(build("tfjob", pvc="team-runs", mount_path="/data")["spec"]["tfReplicaSpecs"]["Worker"])
    assert c_spec["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "team-runs"}}]
    (c,) = c_spec["containers"]
    assert c["volumeMounts"] == [{"name": "workspace", "mountPath": "/data"}]
    assert c["workingDir"] == "/data"  # a relative --out lands on the claim
    assert "volumes" not in pod_spec(build("tfjob")["spec"]["tfReplicaSpecs"]["Worker"])


def test_cluster_secret_comes_from_a_kubernetes_secret():
    c = only_container(build("tfjob", cluster_secret="dist-key")["spec"]["tfReplicaSpecs"]["Worker"])
    assert c["env"] == [{"name": "DISTBATCH_CLUSTER_SECRET",
                         "valueFrom": {"secretKeyRef": {"name": "dist-key", "key": "secret"}}}]


# ------------------------------------------------------------------------------------ JobSet
def jobset_container(m: dict) -> dict:
    (rjob,) = m["spec"]["replicatedJobs"]
    (c,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    return c


def test_jobset_is_one_indexed_job_with_a_headless_service():
    m = build("jobset", workers=4, gpus_per_worker=2, max_restarts=2, pvc="runs")
    assert (m["apiVersion"], m["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert m["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "mnist"}
    assert m["spec"]["failurePolicy"] == {"maxRestarts": 2}
    (rjob,) = m["spec"]["replicatedJobs"]
    assert (rjob["name"], rjob["replicas"]) == ("worker", 1)
    jspec = rjob["template"]["spec"]
    assert (jspec["completionMode"], jspec["completions"], jspec["parallelism"], jspec["backoffLimit"]) == \
        ("Indexed", 4, 4, 0)
    assert jspec["template"]["spec"]["restartPolicy"] == "Never"
    c = jobset_container(m)
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert c["env"][0] == {"name": "COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    assert c["args"] == [*TRAIN, "--backend", "multiworker"]


def run_pod(container: dict, env: dict, cwd=None, args=("sh", "-c", 'printf "%s\\n" "$TF_CONFIG" "$@"', "x")):
    """The container's command with `args` in place of the training command."""
    return subprocess.run([*container["command"], *args], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30, cwd=cwd)


@pytest.mark.parametrize("env", [{"JOB_COMPLETION_INDEX": "2"}, {"COMPLETION_INDEX": "2"},
                                 {"JOB_COMPLETION_INDEX": "2", "COMPLETION_INDEX": "0"}])
def test_jobset_pod_builds_tf_config_from_its_completion_index(env):
    c = jobset_container(build("jobset", workers=4))
    proc = run_pod(c, env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0]) == {
        "cluster": {"worker": [f"mnist-worker-0-{i}.mnist:2222" for i in range(4)]},
        "task": {"type": "worker", "index": 2}}
    assert proc.stdout.splitlines()[1:] == []  # no --resume without --max-restarts


@pytest.mark.parametrize("env, message", [
    ({}, "distbatch-pod: no job completion index (got ''); expected an indexed Job"),
    ({"JOB_COMPLETION_INDEX": "x1"}, "distbatch-pod: no job completion index (got 'x1'); expected an indexed Job"),
    ({"JOB_COMPLETION_INDEX": "4"}, "distbatch-pod: completion index 4, expected 0..3")])
def test_jobset_pod_refuses_a_missing_or_out_of_range_index(env, message):
    proc = run_pod(jobset_container(build("jobset", workers=4)), env)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (1, "", message)


def test_restarted_pods_add_resume_once_out_holds_the_run(tmp_path):
    c = jobset_container(build("jobset", workers=2, max_restarts=1, pvc="runs"))
    env = {"JOB_COMPLETION_INDEX": "1"}
    first = run_pod(c, env, cwd=tmp_path)
    assert first.returncode == 0 and first.stdout.splitlines()[1:] == []
    (tmp_path / "runs" / "mnist").mkdir(parents=True)
    assert run_pod(c, env, cwd=tmp_path).stdout.splitlines()[1:] == []  # created, still empty
    (tmp_path / "runs" / "mnist" / "config.json").write_text("{}")
    again = run_pod(c, env, cwd=tmp_path)
    assert again.stdout.splitlines()[1:] == ["--resume"]
    assert json.loads(again.stdout.splitlines()[0])["task"] == {"type": "worker", "index": 1}


def test_mpijob_launcher_wrapper_appends_resume_to_the_training_command(tmp_path):
    launcher = only_container(build("mpijob", max_restarts=2, pvc="runs")["spec"]["mpiReplicaSpecs"]["Launcher"])
    (tmp_path / "runs" / "mnist").mkdir(parents=True)
    (tmp_path / "runs" / "mnist" / ".distbatch-run").write_text("")
    proc = run_pod(launcher, {}, cwd=tmp_path, args=("sh", "-c", 'printf "%s\\n" "$@"', "x", *launcher["args"]))
    assert proc.stdout.splitlines() == [*launcher["args"], "--resume"]


# ------------------------------------------------------------------------ schema validation
CASES = [("mpijob", {}), ("mpijob", {"gpus_per_worker": 0}), ("mpijob", {"min_workers": 1, "max_workers": 8}),
         ("mpijob", {"max_restarts": 2, "pvc": "runs", "namespace": "ml"}),
         ("mpijob", {"mpi_launcher": "horovodrun"}),
         ("tfjob", {}), ("tfjob", {"max_restarts": 2, "pvc": "runs", "cluster_secret": "k", "gpus_per_worker": 0}),
         ("jobset", {}), ("jobset", {"max_restarts": 1, "pvc": "runs", "cluster_secret": "k", "namespace": "ml"})]


@pytest.mark.parametrize("kind, kw", CASES)
def test_every_generated_manifest_validates_against_its_crd_schema(kind, kw):
    m = k8s.BUILDERS[kind](k8s.check_job(job(kind, **kw)))  # unchecked builder output
    assert schema_errors(m) == []
    assert manifest_errors(m) == []


@pytest.mark.parametrize("kind, kw", CASES)
def test_yaml_text_reads_back_as_the_manifest(kind, kw):
    yaml = pytest.importorskip("yaml")
    m = build(kind, **kw)
    text = k8s.render(m)
    assert yaml.safe_load(text) == m
    assert schema_errors(yaml.safe_load(text)) == []


def test_yaml_writer_quotes_what_a_yaml_reader_would_change():
    yaml = pytest.importorskip("yaml")
    tricky = ["yes", "No", "on", "null", "~", "1.0", "0x1f", "2001-12-14", "12:30", "-1", "--", ".inf", "",
              " x", "a: b", "a #b", "@x", "*a", "&a", "!t", "%p", "{x}", "[x]", "'s'", '"q"', "ü", "a\tb",
              "-np", "--out=runs/x", "registry:5000/img:1", "line1\nline2\n", "line1\nline2", "a\n\nb\n\n"]
    doc = {"list": tricky, "map": {s: s for s in tricky if s}, "n": [0, -3, True, False, {}, []]}
    assert yaml.safe_load(to_yaml(doc)) == doc


def test_vendored_schemas_name_their_source_and_reject_unknown_keys():
    import jsonschema
    for (api_version, kind), name in SCHEMA_FILES.items():
        assert (SCHEMA_DIR / name).is_file()
        schema = load_schema(api_version, kind)
        jsonschema.Draft7Validator.check_schema(schema)
        source = schema["x-source"]
        assert source["repository"] and source["tag"].startswith("v") and len(source["commit"]) == 40
        assert schema["properties"]["apiVersion"]["enum"] == [api_version]
        open_objects = []

        def walk(s, path):
            if "properties" in s and s.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, sub in s.get("properties", {}).items():
                walk(sub, f"{path}.{key}")
            for key in ("items", "additionalProperties"):
                if isinstance(s.get(key), dict):
                    walk(s[key], f"{path}.{key}")
        walk(schema, kind)
        assert open_objects == []


def broken(kind: str, change) -> dict:
    m = copy.deepcopy(build(kind))
    change(m)
    return m


def tf_container(m):
    return only_container(m["spec"]["tfReplicaSpecs"]["Worker"])


@pytest.mark.parametrize("kind, change, where", [
    ("tfjob", lambda m: tf_container(m).update(imagePullPolcy="Always"),
     "spec.tfReplicaSpecs.Worker.template.spec.containers[0]: Additional properties are not allowed "
     "('imagePullPolcy' was unexpected)"),
    ("tfjob", lambda m: m["spec"]["tfReplicaSpecs"]["Worker"].update(replicas="3"),
     "spec.tfReplicaSpecs.Worker.replicas: '3' is not of type 'integer'"),
    ("mpijob", lambda m: m["spec"].update(slotsPerWorkers=2),
     "spec: Additional properties are not allowed ('slotsPerWorkers' was unexpected)"),
    ("mpijob", lambda m: m["spec"].update(mpiImplementation="openmpi"),
     "spec.mpiImplementation: 'openmpi' is not one of ['OpenMPI', 'Intel', 'MPICH']"),
    ("mpijob", lambda m: m.update(apiVersion="kubeflow.org/v2beta1") or m["metadata"].update(nmae="x"),
     "metadata: Additional properties are not allowed ('nmae' was unexpected)"),
    ("jobset", lambda m: m["spec"]["replicatedJobs"][0]["template"]["spec"].update(completions=2**31),
     "spec.replicatedJobs[0].template.spec.completions: 2147483648 is greater than the maximum of 2147483647"),
    ("jobset", lambda m: m["spec"]["network"].update(enableDNSHostNames=True),
     "spec.network: Additional properties are not allowed ('enableDNSHostNames' was unexpected)"),
])
def test_schema_rejects_a_broken_manifest(kind, change, where):
    m = broken(kind, change)
    assert schema_errors(m) == [where]
    with pytest.raises(ManifestError) as e:
        check_manifest(m)
    assert where in str(e.value) and "\n" not in str(e.value) and "nothing was written" in str(e.value)


def mpi(m):
    return m["spec"]["mpiReplicaSpecs"]


@pytest.mark.parametrize("kind, change, error", [
    ("mpijob", lambda m: mpi(m)["Launcher"].update(replicas=2), "spec.mpiReplicaSpecs.Launcher.replicas: must be 1, got 2"),
    ("mpijob", lambda m: m["spec"].pop("slotsPerWorker"), "spec.slotsPerWorker: must be set"),
    ("mpijob", lambda m: mpi(m)["Worker"].update(replicas=0), "spec.mpiReplicaSpecs.Worker.replicas: must be >= 1, got 0"),
    ("mpijob", lambda m: m["spec"]["runPolicy"].update(cleanPodPolicy="Always"),
     "spec.runPolicy.cleanPodPolicy: must be None, Running or All, got 'Always'"),
    ("mpijob", lambda m: mpi(m).pop("Launcher"), "spec.mpiReplicaSpecs.Launcher: must be set"),
    ("mpijob", lambda m: m["metadata"].update(name="n" * 55) or mpi(m)["Worker"].update(replicas=100),
     "metadata.name (its last worker's pod and host name): '" + "n" * 55 + "-worker-99' is not a DNS-1035 label"),
    ("tfjob", lambda m: tf_container(m).update(name="trainer"),
     "spec.tfReplicaSpecs.Worker.template.spec.containers: must hold a container named 'tensorflow', got ['trainer']"),
    ("tfjob", lambda m: m["spec"]["tfReplicaSpecs"].update(
        Chief=copy.deepcopy(m["spec"]["tfReplicaSpecs"]["Worker"]), Master=copy.deepcopy(m["spec"]["tfReplicaSpecs"]["Worker"])),
     "spec.tfReplicaSpecs: must not have more than 1 Chief or Master role"),
    ("tfjob", lambda m: m["metadata"].update(name="1mnist"), "metadata.name: '1mnist' is not a DNS-1035 label"),
    ("jobset", lambda m: m["spec"]["replicatedJobs"][0]["template"]["spec"].update(parallelism=1),
     "spec.replicatedJobs[0].template.spec: completions (3) and parallelism (1) must be equal"),
    ("jobset", lambda m: m["metadata"].update(name="j" * 50),
     "spec.replicatedJobs[0].name (its last pod's name): '" + "j" * 50 + "-worker-0-2-abcde' is not a DNS-1035 label"),
])
def test_admission_rules_reject_what_the_operators_webhooks_reject(kind, change, error):
    m = broken(kind, change)
    errors = manifest_errors(m)
    assert any(e.startswith(error) for e in errors), errors


def test_image_references():
    good = ["distbatch", "distbatch:0.1", "registry.example.com:5000/ml/distbatch:v1.2-rc_1", "localhost/x",
            "ghcr.io/org/img@sha256:" + "a" * 64, "img:tag@sha256:" + "0" * 64, "[::1]:5000/img"]
    bad = ["", "dist batch", "distbatch ", "Distbatch", "img:", "img:-tag", "/img", "img//x", "img@sha256:ab",
           "img:" + "t" * 129]
    assert [r for r in good if not is_image_reference(r)] == []
    assert [r for r in bad if is_image_reference(r)] == []


# ----------------------------------------------------------------------------------------- CLI
def base_argv(kind="tfjob", *extra, command=None):
    backend = k8s.EXPECTED_BACKEND[kind]
    return ["launch", "k8s", "--kind", kind, "--name", "mnist", "--image", IMAGE, "--workers", "2",
            "--gpus-per-worker", "1", *extra, "--", *(command or (*TRAIN, "--backend", backend))]


@pytest.mark.parametrize("kind", k8s.KINDS)
def test_cli_prints_the_validated_yaml(capfd, kind):
    proc = cli_in_process(capfd, *base_argv(kind))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == k8s.render(build(kind, workers=2, gpus_per_worker=1))
    assert proc.stderr.strip() == k8s.NO_VOLUME_NOTE


def test_cli_writes_the_file_atomically_and_dry_run_writes_nothing(capfd, tmp_path):
    out = tmp_path / "mnist.yaml"
    proc = cli_in_process(capfd, *base_argv("jobset", "--pvc", "runs", "-o", out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"wrote {out}", f"submit with: kubectl apply -f {out}"]
    assert proc.stderr == ""
    assert out.read_text() == k8s.render(build("jobset", workers=2, gpus_per_worker=1, pvc="runs"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.yaml"]  # no temporary file left
    other = tmp_path / "other.yaml"
    dry = cli_in_process(capfd, *base_argv("jobset", "--pvc", "runs", "-o", other, "--dry-run"))
    assert dry.returncode == 0 and not other.exists()
    assert dry.stdout == out.read_text()


NO_COMMAND = base_argv("tfjob")[:base_argv("tfjob").index("--") + 1]
LABEL = ("a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with a letter or "
         "digit, at most 63 characters)")


@pytest.mark.parametrize("argv, line", [
    (base_argv("tfjob", "--name", "My_Job"), f"--name must be {LABEL}, got 'My_Job'"),
    (base_argv("tfjob", "--name", "1job"), f"--name must be {LABEL}, got '1job'"),
    (base_argv("tfjob", "--name", "n" * 54, "--workers", "100"),
     f"--name {'n' * 54!r} is too long for 100 workers: the pod name '{'n' * 54}-worker-99' would have 64 "
     "characters, expected at most 63 (use a shorter --name)"),
    (base_argv("tfjob", "--workers", "0"), "--workers must be an integer in 1..2147483647, got 0"),
    (base_argv("jobset", "--gpus-per-worker", "-1"), "--gpus-per-worker must be an integer in 0..2147483647, got -1"),
    (base_argv("mpijob", "--min-workers", "3", "--max-workers", "2"),
     "--min-workers 3 is greater than --max-workers 2; expected min <= max"),
    (base_argv("mpijob", "--workers", "4", "--max-workers", "3"),
     "--max-workers 3 is less than --workers 4; expected --max-workers >= --workers (the job starts with --workers)"),
    (base_argv("mpijob", "--min-workers", "0"), "--min-workers must be an integer in 1..2147483647, got 0"),
    (base_argv("tfjob", "--min-workers", "1"),
     "--min-workers/--max-workers with --kind tfjob: a tfjob's TF_CONFIG fixes its workers; expected --kind "
     "mpijob (Horovod Elastic), or no --min/--max-workers"),
    (NO_COMMAND,
     "missing COMMAND: expected `-- COMMAND...` after the options, e.g. -- distbatch train ... --backend "
     "multiworker, got nothing"),
    (base_argv("tfjob", "--image", "distbatch 0.1"),
     "--image must be a container image reference such as registry.example.com/team/distbatch:1.0 (no spaces, "
     "lower-case repository), got 'distbatch 0.1'"),
    (base_argv("tfjob", "--max-restarts", "-1"), "--max-restarts must be an integer >= 0, got -1"),
    (base_argv("tfjob", "--max-restarts", "2"),
     "--max-restarts 2 resumes from the checkpoints in --out, which restarted pods see only on a shared volume; "
     "expected --pvc CLAIM"),
    (base_argv("tfjob", "--max-restarts", "2", "--pvc", "runs",
               command=(*TRAIN, "--backend", "multiworker", "--overwrite")),
     "--overwrite with --max-restarts 2: a restarted pod could not tell its own run from the one --overwrite "
     "replaces; expected a new --out and no --overwrite"),
    (base_argv("tfjob", "--max-restarts", "1", "--pvc", "runs", command=("python", "train.py")),
     "--max-restarts needs a `distbatch train ...` or `distbatch sweep ...` worker command (a restart adds "
     "--resume to it), got 'python train.py'"),
    (base_argv("mpijob", command=(*TRAIN, "--backend", "multiworker")),
     "--kind mpijob runs one process per slot under MPI: the command's --backend multiworker does not fit; "
     "expected --backend horovod"),
    (base_argv("jobset", command=(*TRAIN, "--backend=horovod")),
     "--kind jobset runs one TensorFlow process per pod with TF_CONFIG: the command's --backend horovod does "
     "not fit; expected --backend multiworker"),
    (base_argv("tfjob", "--pvc", "runs", command=("distbatch", "train", "--out", "/tmp/runs")),
     "the command's --out '/tmp/runs' is not on the shared volume mounted at --mount-path '/workspace'; expected "
     "a relative --out inside it or one under /workspace"),
    (base_argv("tfjob", "--pvc", "runs", command=("distbatch", "train", "--out=../runs")),
     "the command's --out '../runs' is not on the shared volume mounted at --mount-path '/workspace'; expected "
     "a relative --out inside it or one under /workspace"),
    (base_argv("tfjob", "--max-restarts", str(2**31)), "--max-restarts must be an integer in 0..2147483647, "
                                                        "got 2147483648"),
    (base_argv("tfjob", "--pvc", "Runs"),
     "--pvc must name a Kubernetes object: a DNS-1123 subdomain (lower-case letters, digits, '-' and '.'), got 'Runs'"),
    (base_argv("tfjob", "--mount-path", "workspace"),
     "--mount-path must be an absolute directory other than / (no spaces, ':' or '..'), got 'workspace'"),
    (base_argv("tfjob", "--namespace", "ML"),
     "--namespace must be a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters), got 'ML'"),
    (base_argv("mpijob", "--cluster-secret", "key"),
     "--cluster-secret with --kind mpijob: the secret is the multiworker backend's rendezvous key; Horovod "
     "ranks meet through MPI/Gloo; expected --kind tfjob or jobset"),
    (base_argv("mpijob", "--min-workers", "1", "--mpi-launcher", "mpirun"),
     "--mpi-launcher mpirun with --min-workers/--max-workers: Horovod Elastic needs horovodrun; expected "
     "--mpi-launcher horovodrun (the default when elastic)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capfd, tmp_path, argv, line):
    out = tmp_path / "job.yaml"
    proc = cli_in_process(capfd, *argv[:2], "-o", out, *argv[2:])
    assert_one_line_error(proc, line)
    assert proc.stdout == "" and snapshot(tmp_path) == {}


def test_output_in_a_missing_directory_is_one_line_error(capfd, tmp_path):
    out = tmp_path / "missing" / "job.yaml"
    proc = cli_in_process(capfd, "launch", "k8s", "-o", out, *base_argv("tfjob")[2:])
    assert_one_line_error(proc, f"-o {str(out)!r}: the directory {str(out.parent)!r} does not exist; expected an "
                                "existing directory (nothing was written)")
    assert not out.parent.exists()


@pytest.mark.parametrize("argv, start", [
    (["launch", "k8s", "--kind", "pod", "--name", "x", "--image", "x", "--workers", "1", "--gpus-per-worker", "0",
      "--", "x"], "distbatch: error: argument --kind: invalid choice: 'pod'"),
    (base_argv("tfjob", "--workers", "two"), "distbatch: error: argument --workers: invalid int value: 'two'"),
])
def test_argparse_errors_are_one_line_exit_2(capfd, argv, start):
    proc = cli_in_process(capfd, *argv)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    (only,) = proc.stderr.splitlines()
    assert only.startswith(start), only
