"""Bounded Horovod waits (distbatch/backends/arrivals.py) and the model check by position
(distbatch/backends/model_check.py): the decision rules with a fake clock and a fake
exchange, then real 2-rank horovodrun jobs (slow): ranks whose Keras names differ train as
one device does, ranks with different models stop at once with one line on every rank, and a
rank working alone past the bound ends the job with a line naming it."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import VENV_BIN, cli_env

from distbatch.backends import arrivals, model_check
from distbatch.backends.arrivals import Arrivals, Status
from distbatch.errors import ParameterError, UsageError


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def board_of(*statuses):
    """An exchange that answers with `statuses` for the other ranks and this rank's own row."""
    def exchange(row):
        mine = Status.decode(row)
        return np.stack([(mine if s is None else s).encode() for s in statuses])
    return exchange


def test_status_round_trips_through_the_int64_row():
    s = Status(True, 12.345, "train steps 17-24")
    assert Status.decode(s.encode()) == Status(True, 12.345, "train steps 17-24")
    long = Status(False, 0.0, "x" * 100)
    assert Status.decode(long.encode()).label == "x" * arrivals.LABEL_CHARS


def test_derived_bound_startup_then_floor_then_median():
    assert arrivals.derived_bound([], None) == arrivals.STARTUP_SECONDS
    assert arrivals.derived_bound([30.0], None) == arrivals.STARTUP_SECONDS
    assert arrivals.derived_bound([30.0, 0.5, 0.5, 0.7], None) == arrivals.FLOOR_SECONDS
    assert arrivals.derived_bound([30.0, 4.0, 5.0, 6.0], None) == 20 * 5.0
    assert arrivals.derived_bound([30.0, 4.0], 7.0) == 7.0


def test_absent_rank_is_named_with_what_it_does_instead():
    clock = Clock()
    other = Status(False, 41.0, "train steps 1-8")
    a = Arrivals(board_of(other, None), rank=1, size=2, timeout=10.0, clock=clock)
    with a.waiting("train steps 9-16"):
        a.exchange_once()
        clock.t += 10.0
        assert a.check() is None  # at the bound, not past it
        clock.t += 1.5
        a.exchange_once()
        message = a.check()
    assert message == ("horovod: rank 1 waited 12 s at 'train steps 9-16' (bound 10 s) for the "
                       "other ranks: rank(s) 0 did not arrive (rank 0 is outside distbatch's "
                       "collectives for 41 s since finishing 'train steps 1-8')")
    assert a.check() is None  # no longer waiting


def test_rank_waiting_elsewhere_is_named():
    clock = Clock()
    a = Arrivals(board_of(None, Status(True, 70.0, "evaluation"), None), rank=0, size=3,
                 timeout=None, clock=clock)
    with a.waiting("flag"):
        clock.t += arrivals.STARTUP_SECONDS + 1
        a.exchange_once()
        message = a.check()
    assert "rank(s) 1 did not arrive (rank 1 is waiting at 'evaluation' for 70 s)" in message
    assert "$DISTBATCH_STALL_TIMEOUT" in message  # the derived bound says how to raise it


def test_every_rank_inside_the_same_call_is_work_not_a_stall():
    """A long compile or evaluation on every rank: the derived bound does not end it; a bound
    the user set does."""
    clock = Clock()
    same = Status(True, 900.0, "evaluation")
    a = Arrivals(board_of(same, None), rank=1, size=2, timeout=None, clock=clock)
    with a.waiting("evaluation"):
        clock.t += 10 * arrivals.STARTUP_SECONDS
        a.exchange_once()
        assert a.check() is None
    b = Arrivals(board_of(same, None), rank=1, size=2, timeout=30.0, clock=clock)
    with b.waiting("evaluation"):
        clock.t += 31
        b.exchange_once()
        assert b.check().endswith("every rank is waiting at it, and it did not complete")


def test_no_exchange_yet_and_a_silent_rank():
    clock = Clock()
    a = Arrivals(board_of(Status(False, 1.0, ""), None), rank=1, size=2, timeout=5.0, clock=clock)
    with a.waiting("model check"):
        clock.t += 6
        assert "rank 0 did not arrive: no rank answered distbatch's status exchange yet" in a.check()
        a.exchange_once()
        clock.t += 6  # the exchange has not completed again since: rank 0 stopped answering
        message = a.check()
    assert "no status from the other ranks for 6 s, so rank 0 is frozen or gone" in message
    assert "last known: rank 0 outside distbatch's collectives for 1 s (none entered yet)" in message


def test_stall_timeout_values():
    assert arrivals.resolve_timeout(None, {}) is None
    assert arrivals.resolve_timeout(None, {"DISTBATCH_STALL_TIMEOUT": "45"}) == 45.0
    assert arrivals.resolve_timeout(12, {"DISTBATCH_STALL_TIMEOUT": "45"}) == 12.0
    for bad in (0, -3, float("nan"), float("inf"), "soon"):
        with pytest.raises(ParameterError, match=r"^stall_timeout must be a finite number > 0 "):
            arrivals.resolve_timeout(bad, {})
    with pytest.raises(UsageError, match=r"^\$DISTBATCH_STALL_TIMEOUT must be .* got 'x'$"):
        arrivals.resolve_timeout(None, {"DISTBATCH_STALL_TIMEOUT": "x"})


def test_fit_and_create_backend_refuse_a_bad_stall_timeout():
    import distbatch
    from distbatch.backends import create_backend
    with pytest.raises(ValueError, match="stall_timeout must be a finite number > 0"):
        create_backend("single", stall_timeout=-1)
    with pytest.raises(ValueError, match="stall_timeout must be a finite number > 0"):
        distbatch.fit(model_fn=lambda: None, optimizer_fn=lambda: None,
                      data=(np.zeros((8, 2)), np.zeros(8)), global_batch_size=4, epochs=1,
                      backend="single", stall_timeout=0)


ROW = ["model", "seq/dense/kernel", [8, 32], "float32"]


def test_names_differ_but_models_match():
    renamed = [["model", "seq_1/dense_7/kernel", [8, 32], "float32"]]
    assert model_check.first_mismatch([[ROW], renamed, renamed]) is None


def test_first_differing_variable_is_named_on_every_rank():
    other = [["model", "seq/dense/kernel", [8, 16], "float32"]]
    assert model_check.first_mismatch([[ROW, ROW], [ROW, ROW], [ROW, other[0]]]) == (
        "horovod: the ranks built different models: variable 1 is model variable "
        "'seq/dense/kernel' (8, 16) float32 on rank 2 but model variable 'seq/dense/kernel' "
        "(8, 32) float32 on rank 0; every rank must build the same model and optimizer")
    half = [["model", "seq/dense/kernel", [8, 32], "float16"]]
    assert "float16 on rank 1" in model_check.first_mismatch([[ROW], half])
    slot = ["optimizer", "sgd/momentum", [8, 32], "float32"]
    assert "rank 1 has 1 variables, rank 0 has 2; the first extra one is optimizer variable " \
           "'sgd/momentum' (8, 32) float32 on rank 0" in model_check.first_mismatch([[ROW, slot], [ROW]])


def test_signature_lists_model_then_optimizer_variables():
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    rows = model_check.signature(model, opt)
    assert [r[0] for r in rows] == ["model"] * 2 + ["optimizer"] * (len(opt.variables))
    assert rows[0][2:] == [[3, 2], "float32"] and rows[1][2:] == [[2], "float32"]


# ----------------------------------------------------------------- real 2-rank horovodrun jobs
NEEDS_HOROVODRUN = pytest.mark.skipif(shutil.which("horovodrun", path=str(VENV_BIN)) is None,
                                      reason="horovodrun is not installed in the venv")

SCRIPT = textwrap.dedent('''
    import sys, time, numpy as np
    import horovod.tensorflow as hvd
    hvd.init()
    import keras, distbatch
    case, out = sys.argv[1], sys.argv[2]
    if case in ("names", "shape") and hvd.rank() == 0:
        keras.Sequential([keras.layers.Dense(3)])(np.zeros((1, 4)))  # rank 0's extra model
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int64")
    width = 16 if (case == "shape" and hvd.rank() == 1) else 32
    model_fn = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(width, activation="relu"),
                                         keras.layers.Dense(2)])
    class ChiefAlone(keras.callbacks.Callback):  # the chief works alone for 10 minutes
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                time.sleep(600)
    try:
        for attempt in range(2 if case == "names" else 1):  # twice: one status exchange per process
            if attempt == 1 and hvd.rank() == 0:
                keras.Sequential([keras.layers.Dense(3)])(np.zeros((1, 4)))  # rank 0 alone, again
            res = distbatch.fit(model_fn=model_fn, optimizer_fn=lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                                data=(x, y), global_batch_size=64, epochs=3, seed=4,
                                backend=sys.argv[3], stall_timeout=8 if case == "stall" else None,
                                callbacks=[ChiefAlone()] if case == "stall" else None)
    except ValueError as e:
        print(f"rank {hvd.rank()}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    np.savez(f"{out}/rank{hvd.rank()}.npz", *res.model.get_weights())
''')


def _run(tmp_path, case, backend="horovod", np_=2):
    (tmp_path / "script.py").write_text(SCRIPT)
    cmd = ([str(VENV_BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]
           if np_ > 1 else [])
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, sys.executable, str(tmp_path / "script.py"), case,
                           str(tmp_path), backend], capture_output=True, text=True, timeout=240,
                          env=cli_env())
    return proc, time.monotonic() - t0


@pytest.mark.slow
@NEEDS_HOROVODRUN
def test_ranks_with_different_keras_names_train_as_one_device(tmp_path):
    """Was: both ranks waited forever in the initial broadcast (names differ by one layer).
    Two fits in one script, each after a rank-0-only model."""
    proc, _ = _run(tmp_path, "names")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    single = tmp_path / "single"
    single.mkdir()
    proc, _ = _run(single, "names", backend="single", np_=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = np.load(single / "rank0.npz")
    for k in one.files:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])
        np.testing.assert_allclose(ranks[0][k], one[k], atol=1e-5)


@pytest.mark.slow
@NEEDS_HOROVODRUN
def test_different_models_stop_every_rank_with_one_line(tmp_path):
    proc, seconds = _run(tmp_path, "shape")
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    for r in range(2):
        line = (f"rank {r}: horovod: the ranks built different models: variable 0 is model variable "
                f"'sequential/dense/kernel' (8, 16) float32 on rank 1 but model variable "
                f"'sequential_1/dense_1/kernel' (8, 32) float32 on rank 0; every rank must build "
                f"the same model and optimizer")
        assert line in err, err[-3000:]
    assert seconds < 60


@pytest.mark.slow
@NEEDS_HOROVODRUN
def test_chief_working_alone_past_the_bound_is_named(tmp_path):
    proc, seconds = _run(tmp_path, "stall")
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    m = re.search(r"distbatch: error: horovod: rank 1 waited (\d+) s at '([^']+)' \(bound 8 s\) "
                  r"for the other ranks: rank\(s\) 0 did not arrive \(rank 0 is outside "
                  r"distbatch's collectives for \d+ s since finishing '[^']+'\)$", err, re.M)
    assert m, err[-3000:]
    assert 8 <= int(m.group(1)) <= 12
    assert seconds < 120  # the chief sleeps 600 s: the job ended at the bound instead
