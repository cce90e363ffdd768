"""Fast unit tables: batch arithmetic, the `auto` backend rule, TF_CONFIG
validation, and GPU pinning by local rank (with a fake tf.config, so no GPU
is needed)."""
from __future__ import annotations

import json

import pytest

from distbatch.backends import choose_backend
from distbatch.backends.horovod import pin_gpu
from distbatch.backends.strategy import parse_tf_config
from distbatch.errors import UsageError
from distbatch.training.plan import BatchPlan


@pytest.mark.parametrize("gb,replicas,accum,n,per_replica,steps", [
    (256, 1, 1, 1000, 256, 3),
    (256, 8, 1, 1000, 32, 3),
    (256, 2, 4, 1000, 32, 3),
    (64, 2, 1, 520, 32, 8),      # 8 examples dropped per epoch
    (1000, 4, 2, 1000, 125, 1),
])
def test_plan_derivation(gb, replicas, accum, n, per_replica, steps):
    p = BatchPlan.derive(global_batch_size=gb, replicas=replicas, accumulation_steps=accum,
                         num_train_examples=n)
    assert (p.per_replica_batch_size, p.steps_per_epoch) == (per_replica, steps)
    assert p.per_replica_batch_size * replicas * accum == gb


@pytest.mark.parametrize("kw,message", [
    (dict(global_batch_size=100, replicas=3), "global_batch_size 100 is not divisible by replicas (3) x accumulation steps (1) = 3; try 99"),
    (dict(global_batch_size=64, replicas=2, accumulation_steps=3), "global_batch_size 64 is not divisible by replicas (2) x accumulation steps (3) = 6; try 60"),
    (dict(global_batch_size=2048, replicas=1), "global_batch_size 2048 is larger than the training set (1000 examples)"),
    (dict(global_batch_size=0, replicas=1), "global_batch_size must be a positive integer, got 0"),
    (dict(global_batch_size=64, replicas=1, accumulation_steps=0), "accumulation_steps must be a positive integer, got 0"),
])
def test_plan_errors_name_the_numbers(kw, message):
    with pytest.raises(UsageError) as e:
        BatchPlan.derive(num_train_examples=1000, **kw)
    assert str(e.value) == message  # the CLI shows the flags (tests/test_bad_input.py)


def test_total_steps():
    p = BatchPlan.derive(global_batch_size=64, replicas=1, num_train_examples=640)
    assert p.total_steps(epochs=2.5) == 25
    assert p.total_steps(steps=7) == 7
    with pytest.raises(UsageError, match="^epochs must be > 0, got -1"):
        p.total_steps(epochs=-1)
    with pytest.raises(UsageError, match="exactly one"):
        p.total_steps(epochs=1, steps=3)


TF2 = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})


@pytest.mark.parametrize("env,gpus,cpu_replicas,expected", [
    ({}, 0, None, "single"),
    ({}, 1, None, "single"),
    ({}, 4, None, "mirrored"),
    ({}, 0, 2, "mirrored"),
    ({"HOROVOD_RANK": "0"}, 4, None, "horovod"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, 0, None, "horovod"),
    ({"PMIX_RANK": "0"}, 0, None, "horovod"),
    ({"TF_CONFIG": TF2}, 0, None, "multiworker"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})}, 2, None, "mirrored"),
    ({"TF_CONFIG": "{not json"}, 0, None, "multiworker"),   # the multiworker backend reports it
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, 0, None, "multiworker"),
    ({"SLURM_NTASKS": "1"}, 0, None, "single"),
])
def test_auto_backend_rule(env, gpus, cpu_replicas, expected):
    name, reason = choose_backend(env, gpus, cpu_replicas)
    assert name == expected and reason


def test_tf_config_parsing():
    assert parse_tf_config(TF2) == {"workers": ["a:1", "b:2"], "index": 1}
    chief = json.dumps({"cluster": {"chief": ["c:9"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert parse_tf_config(chief) == {"workers": ["c:9", "a:1"], "index": 1}


@pytest.mark.parametrize("raw,message", [
    (None, "TF_CONFIG is not set"),
    ("{oops", "TF_CONFIG is not valid JSON"),
    ("[]", "TF_CONFIG must be a JSON object"),
    (json.dumps({"cluster": {}}), "TF_CONFIG needs 'cluster' and 'task' objects"),
    (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}), "has no 'worker' list"),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}), "task type must be 'worker' or 'chief', got 'ps'"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}), "task index 2 is out of range for the 2 'worker' address(es)"),
])
def test_tf_config_errors(raw, message):
    with pytest.raises(UsageError) as e:
        parse_tf_config(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


class FakeDevice:
    def __init__(self, name):
        self.name = name


class FakeConfig:
    """Records what a GPU process would ask of tf.config."""

    def __init__(self, n):
        self.gpus = [FakeDevice(f"/physical_device:GPU:{i}") for i in range(n)]
        self.growth, self.visible = [], None
        outer = self

        class Experimental:
            @staticmethod
            def set_memory_growth(device, enabled):
                outer.growth.append((device.name, enabled))
        self.experimental = Experimental()

    def list_physical_devices(self, kind):
        return self.gpus if kind == "GPU" else []

    def set_visible_devices(self, device, kind):
        self.visible = (device.name, kind)


@pytest.mark.parametrize("n,local_rank,chosen", [(4, 0, 0), (4, 3, 3), (4, 5, 1), (1, 1, 0)])
def test_pin_gpu_by_local_rank(n, local_rank, chosen):
    cfg = FakeConfig(n)
    assert pin_gpu(local_rank, cfg) == f"/physical_device:GPU:{chosen}"
    assert cfg.visible == (f"/physical_device:GPU:{chosen}", "GPU")
    assert cfg.growth == [(f"/physical_device:GPU:{i}", True) for i in range(n)]


def test_pin_gpu_without_gpus():
    cfg = FakeConfig(0)
    assert pin_gpu(0, cfg) is None and cfg.visible is None
