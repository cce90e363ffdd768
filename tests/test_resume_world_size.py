"""Resume on another number of workers or replicas (issue 28, item 1): the global batch stays
and is split again (per-replica batch, and accumulation steps where the old split no longer
divides it); the lr schedule position, optimizer slots and the data position come from the
checkpoint, so every example of the interrupted epoch is seen once and the run ends where the
uninterrupted run ends (max abs weight difference <= 1e-4; the evaluations at the same steps).
"""
from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import DISTBATCH, cli_env, load_summary, load_weights, max_weight_diff, run_cli
from test_restarts import LAUNCH, RUN, _done, _launch

TOLERANCE = 1e-4


def _same_run(full: Path, other: Path) -> float:
    diff = max_weight_diff(load_weights(full), load_weights(other))
    assert diff <= TOLERANCE, f"weights differ from the uninterrupted run by {diff}"
    a, b = load_summary(full), load_summary(other)
    assert a["steps"] == b["steps"]
    assert [r["step"] for r in b["history"]] == [r["step"] for r in a["history"]]  # none twice or missing
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], abs=1e-4), rb["step"]
    return diff


def _kill_after(argv: list[str], ckpt_dir: Path, step: int, sig=signal.SIGKILL) -> int:
    p = subprocess.Popen([DISTBATCH, *argv], env=cli_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not _done(ckpt_dir, step):
        pass
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode


def test_resume_accumulation_rule():
    from distbatch.errors import ParameterError
    from distbatch.training.assembly import resume_accumulation
    assert resume_accumulation(64, 2, 1) == 1
    assert resume_accumulation(64, 32, 4) == 2           # 64 = 1 x 32 x 2: lowered from 4
    assert resume_accumulation(36, 2, 4) == 3            # 36 = 6 x 2 x 3
    with pytest.raises(ParameterError, match=r"^resume: the run's global_batch_size 36 cannot be split "
                                             r"across 5 replicas \(it ran on 1\)") as err:
        resume_accumulation(36, 5, 4, was=1)
    assert "--global-batch-size 36" in str(err.value.for_flags())


@pytest.mark.slow
def test_mirrored_2_resumed_on_a_single_device(tmp_path, dataset_cache):
    mirrored = ["train", "--backend", "mirrored", "--cpu-replicas", "2", *RUN]
    run_cli([*mirrored, "--out", str(tmp_path / "full")])
    assert _kill_after([*mirrored, "--out", str(tmp_path / "cut")], tmp_path / "cut" / "checkpoints",
                       12) == -signal.SIGKILL
    resumed = run_cli(["train", "--backend", "single", *RUN, "--out", str(tmp_path / "cut"), "--resume"])
    assert re.search(r"resumed from \S+ckpt-12 at step 12", resumed.stderr), resumed.stderr[-2000:]
    assert ("distbatch: resuming on 1 replicas (the run used 2): global batch 32 = 32 per replica x "
            "1 replicas x 1 accumulation") in resumed.stderr
    _same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_single_with_accumulation_resumed_on_mirrored_2_lowers_the_accumulation(tmp_path, dataset_cache):
    """Global batch 36 as 9 x 1 replica x 4 micro-batches; on 2 replicas 36 = 2 x 4 x k has no
    whole k = 4, so the resumed run takes 6 per replica x 2 x 3."""
    argv = ["--dataset", "mnist1d", "--train-size", "252", "--val-size", "64", "--global-batch-size",
            "36", "--accumulation-steps", "4", "--seed", "3", "--steps", "28", "--checkpoint-every", "4"]
    run_cli(["train", "--backend", "single", *argv, "--out", str(tmp_path / "full")])
    assert _kill_after(["train", "--backend", "single", *argv, "--out", str(tmp_path / "cut")],
                       tmp_path / "cut" / "checkpoints", 8) == -signal.SIGKILL
    resumed = run_cli(["train", "--backend", "mirrored", "--cpu-replicas", "2", *argv,
                       "--out", str(tmp_path / "cut"), "--resume"])
    assert ("resuming on 2 replicas (the run used 1): global batch 36 = 6 per replica x 2 replicas x "
            "3 accumulation") in resumed.stderr, resumed.stderr[-2000:]
    _same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "multiworker"])
def test_two_workers_stopped_by_sigterm_resume_on_one(backend, tmp_path, dataset_cache):
    """SIGTERM to rank 1 mid-epoch: both ranks save one checkpoint and exit 75; the run resumes
    on ONE worker and ends where the uninterrupted 2-worker run ends."""
    # 4 evaluations per 8-step epoch: the ranks' save/stop decision, taken at call boundaries,
    # then falls mid-epoch too
    worker = [DISTBATCH, "train", "--backend", backend, *RUN, "--evals-per-epoch", "4"]
    full = tmp_path / "full"
    code, log, _ = _launch([*LAUNCH[backend], "--", *worker, "--out", str(full)], full)
    assert code == 0, log[-3000:]
    # A decision can still fall on an epoch's end: stop again, later, until the save is mid-epoch.
    for attempt, after in enumerate((12, 20, 28)):
        out = tmp_path / f"cut{attempt}"
        code, log, _ = _launch([*LAUNCH[backend], "--", *worker, "--out", str(out)], out,
                               signal_rank=1, sig=signal.SIGTERM, after_step=after)
        assert code == 75, log[-4000:]
        step = int(re.findall(r"saved a checkpoint at step (\d+)", log)[0])
        assert after <= step < 48, step
        if step % 8:
            break
    assert step % 8, f"every stop fell on an epoch's end ({step})"
    one = {"horovod": ["launch", "horovod", "--gloo", "-np", "1"],
           "multiworker": ["launch", "multiworker", "--workers", "1"]}[backend]
    code, log, _ = _launch([*one, "--", *worker, "--out", str(out), "--resume"], out)
    assert code == 0, log[-4000:]
    assert f"resumed from {out}/checkpoints/ckpt-{step} at step {step}" in log, log[-3000:]
    assert "resuming on 1 replicas (the run used 2)" in log
    _same_run(full, out)


@pytest.mark.slow
def test_fit_resumes_on_another_number_of_replicas(tmp_path):
    """distbatch.fit(resume=True) on 1 replica continues a 2-replica run's checkpoint: the
    weights equal the uninterrupted 2-replica run's (a subprocess makes the logical CPUs)."""
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    outputs = {}
    for mode in ("full", "cut", "resume"):
        proc = subprocess.run([str(Path(DISTBATCH).parent / "python"), str(script), mode, str(tmp_path)],
                              capture_output=True, text=True, timeout=300, env=cli_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[mode] = proc.stdout
    import numpy as np
    full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resume.npz")
    diff = max(float(np.max(np.abs(full[k] - resumed[k]))) for k in full.files)
    assert diff <= TOLERANCE, diff
    assert "CRASHED crash" in outputs["cut"] and "STEPS 40" in outputs["resume"]


FIT_SCRIPT = r'''
import sys
import distbatch
mode, root = sys.argv[1], sys.argv[2]
backend = (distbatch.create_backend("mirrored", cpu_replicas=2)[0] if mode != "resume"
           else distbatch.create_backend("single")[0])
import keras, numpy as np
rng = np.random.default_rng(0)
x = rng.normal(size=(320, 12)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int64")
common = dict(model_fn=lambda: keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="tanh"),
                                                keras.layers.Dense(2)]),
              recipe=distbatch.Recipe(optimizer="momentum", base_lr=0.05, base_batch_size=32,
                                      warmup="none", decay="cosine"),
              data=(x, y), global_batch_size=32, backend=backend, seed=4, evals_per_epoch=2,
              checkpoint_every=8)
if mode == "full":
    res = distbatch.fit(epochs=4, checkpoint_dir=root + "/full-ckpt", **common)
elif mode == "cut":   # the same run, ended by an error at step 20 (its last checkpoint: 16)
    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:   # the 4th evaluation: step 20
                raise RuntimeError("crash")
    try:
        distbatch.fit(epochs=4, checkpoint_dir=root + "/cut-ckpt", callbacks=[Crash()], **common)
    except RuntimeError as e:
        print("CRASHED", e)
    sys.exit(0)
else:
    res = distbatch.fit(epochs=4, checkpoint_dir=root + "/cut-ckpt", resume=True, **common)
print("STEPS", res.metrics["steps"])
np.savez(root + f"/{mode}.npz", *res.model.get_weights())
'''
