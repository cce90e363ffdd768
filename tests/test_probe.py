"""probe-batch: the search against injected limits (exact answers), the memory model,
and the one-line out-of-memory message of `distbatch train`. Nothing here touches
real memory limits."""
from __future__ import annotations

import math

import pytest

from distbatch.errors import UsageError
from distbatch.training.plan import BatchPlan
from distbatch.measure.probe import (OutOfMemory, estimate_step_bytes, find_max_batch, is_out_of_memory,
                             oom_message)


def counting(limit: int):
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= limit
    return fits, calls


def test_exact_answer_37():
    fits, calls = counting(37)
    assert find_max_batch(fits, start=1, max_batch=4096) == 37
    # doubling 1..64, then bisection of (32, 64): 48, 40, 36, 38, 37
    assert calls == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


@pytest.mark.parametrize("start", [1, 3, 8])
@pytest.mark.parametrize("max_batch", [1, 7, 64, 100])
def test_every_limit_gives_the_exact_answer(start, max_batch):
    if start > max_batch:
        with pytest.raises(UsageError, match=r"start_batch \d+ is larger than max_batch"):
            find_max_batch(lambda b: True, start=start, max_batch=max_batch)
        return
    for limit in range(start, 130):
        fits, calls = counting(limit)
        assert find_max_batch(fits, start=start, max_batch=max_batch) == min(limit, max_batch)
        assert all(start <= c <= max_batch for c in calls)
        # doubling: <= ceil(log2(max/start)) + 1 tries; bisection: <= ceil(log2(max)) more
        assert len(calls) <= math.ceil(math.log2(max_batch / start)) + 1 + math.ceil(math.log2(max_batch))


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(OutOfMemory, match="even per-replica batch 4 does not fit"):
        find_max_batch(lambda b: False, start=4)
    assert issubclass(OutOfMemory, UsageError)


def test_cap_reached_returns_the_cap_and_never_tries_beyond():
    fits, calls = counting(10**9)
    assert find_max_batch(fits, max_batch=100) == 100
    assert calls == [1, 2, 4, 8, 16, 32, 64, 100]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_bounds(bad):
    with pytest.raises(UsageError, match=str(bad)):
        find_max_batch(lambda b: True, start=bad)


def test_oom_message_names_batch_and_remedies():
    plan = BatchPlan.derive(global_batch_size=512, replicas=2, accumulation_steps=2,
                            num_train_examples=1000)
    msg = oom_message(plan)
    assert "\n" not in msg
    assert "per-replica batch 128" in msg
    assert "global batch 512 = 128 per replica x 2 replicas x 2 accumulation steps" in msg
    assert "accumulation_steps 4 keeps global batch 512 at per-replica 64" in msg
    assert "more replicas" in msg and "probe-batch" in msg


def test_is_out_of_memory():
    import tensorflow as tf
    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(tf.errors.InvalidArgumentError(None, None, "x"))
    assert not is_out_of_memory(ValueError("x"))


def mlp_closed_form(batch: int, slots: int = 1) -> int:
    """distbatch's mlp on 40 inputs, 10 classes: widths 40 -> 256 -> 256 -> 10."""
    params = (40 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    activations = 40 + 256 + 256 + 10 + 10  # input, dense_0, dense_1, logits, float32 logits
    return 4 * (params * (3 + slots) + 2 * activations * batch)


def test_estimate_matches_closed_form():
    from distbatch.models import build_model
    model = build_model("mlp", (40,), 10)
    for b in (1, 37, 1000):
        assert estimate_step_bytes(model, b, optimizer_slots=1) == mlp_closed_form(b)
    assert estimate_step_bytes(model, 5, optimizer_slots=2) == mlp_closed_form(5, slots=2)


def test_probe_with_simulated_memory_limit(dataset_cache):
    """Real trial steps on one device; the simulated limit puts the answer at exactly 37."""
    from distbatch.measure.probe import probe
    limit_mb = (mlp_closed_form(37) + mlp_closed_form(38)) / 2 / 2**20
    r = probe(model_name="mlp", input_shape=(40,), num_classes=10, backend_name="single",
              accumulation_steps=4, start=16, max_batch=4096, memory_limit_mb=limit_mb)
    assert r["per_replica_batch"] == 37
    assert r["global_batch"] == 37 * 1 * 4
    assert r["optimizer_slots"] == 1 and not r["capped"]
    assert [b for b, _ in r["trace"]] == [16, 32, 64, 48, 40, 36, 38, 37]


def test_train_out_of_memory_becomes_one_line(monkeypatch, tmp_path, dataset_cache):
    """A ResourceExhaustedError in the training loop -> OutOfMemory naming the batch."""
    import tensorflow as tf

    from distbatch.cli import build_parser
    from distbatch.cli.train import train
    from distbatch.training.trainer import Trainer

    def boom(self):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    monkeypatch.setattr(Trainer, "run", boom)
    args = build_parser().parse_args(
        ["train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "256",
         "--val-size", "64", "--global-batch-size", "64", "--accumulation-steps", "2",
         "--steps", "2", "--out", str(tmp_path / "oom")])
    with pytest.raises(OutOfMemory, match=r"out of memory at per-replica batch 32 \(global batch 64"):
        train(args)
