"""Issue 27 ("Trust, round 3"): inputs and run directories that used to end in a traceback,
be accepted and ignored, or silently train something else. Every refusal: exit 2, stderr
exactly ONE `distbatch: error:` line (compared whole), no traceback, nothing written.
docs/reliability.md lists the same rows.

Cases run `distbatch` in THIS process through distbatch.cli.main, as tests/test_trust.py
does (a process per case costs ~5 s of TensorFlow import). The two that need a process of
their own (logical CPU devices, a restricted CPU affinity) run under `-m slow`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import DISTBATCH, cli_env, load_summary, load_weights
from conftest import cli_in_process as cli, assert_one_line_error as assert_error
from conftest import snapshot

TINY = ["--backend", "single", "--train-size", "256", "--val-size", "64"]
TRAIN = ["train", *TINY, "--global-batch-size", "32", "--steps", "8", "--checkpoint-every", "4"]


# -- helpers ---------------------------------------------------------------------------------





def assert_ok(proc) -> None:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _tfrecords(path: Path, n: int = 40, *, negate: bool = False, labels=None) -> Path:
    import tensorflow as tf
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(n):
            x = rng.random(40) * (-1 if negate else 1)
            y = int(labels[i]) if labels is not None else i % 4
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[y]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path


def _npz(path: Path, *, permuted: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(256, 40)).astype(np.float32), rng.normal(size=(64, 40)).astype(np.float32)
    y, yv = rng.integers(0, 10, 256), rng.integers(0, 10, 64)
    if permuted:  # same shapes, same size on disk: labels permuted, inputs negated
        x, y = -x, np.roll(y, 1)
    np.savez(path, x_train=x, y_train=y, x_test=xv, y_test=yv)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_cache):
    """A finished 8-step run (checkpoints at steps 4 and 8), made in this process."""
    from distbatch.cli import main
    out = tmp_path_factory.mktemp("round3-trained") / "run"
    assert main([*TRAIN, "--dataset", "mnist1d", "--out", str(out)]) == 0
    return out


# -- row 1: a truncated TFRecord file ----------------------------------------------------------

@pytest.fixture(scope="module")
def cut_tfrecord(tmp_path_factory) -> tuple[Path, int, int]:
    """40 records of 206 bytes, cut 30 bytes into record 21: its 12-byte header is complete,
    so TensorFlow raises DataLossError (a cut inside the header it reads as the end)."""
    d = tmp_path_factory.mktemp("round3-tfrecord")
    data = _tfrecords(d / "full.tfrecord").read_bytes()
    frame = len(data) // 40
    (d / "cut.tfrecord").write_bytes(data[: 20 * frame + 30])
    return d / "cut.tfrecord", 20 * frame, 20 * frame + 30


@pytest.mark.parametrize("how", ["streamed", "in_memory"])
def test_truncated_tfrecord_is_one_line_naming_the_file(cut_tfrecord, how, tmp_path, capfd):
    """Was: streamed, a 40-line DataLossError traceback, exit 1; in memory, one line ending in
    TensorFlow's `{{function_node __wrapped__IteratorGetNext...}} truncated record at ...`."""
    path, at, size = cut_tfrecord
    sizes = ["--train-size", "16", "--val-size", "4"] if how == "in_memory" else []
    proc = cli(capfd, "train", "--backend", "single", "--dataset", path, *sizes,
               "--global-batch-size", "8", "--steps", "2", "--out", tmp_path / "run")
    assert_error(proc, f"TFRecord file {str(path)!r} is truncated or corrupt: record 21 at byte {at} "
                       f"runs past the end of the file ({size} bytes)")
    assert not (tmp_path / "run").exists()


def test_corrupt_tfrecord_names_the_file_without_tensorflows_blob(tmp_path):
    from distbatch.data.datasets import load_dataset
    from distbatch.data.files import tfrecord_source
    from distbatch.errors import UsageError
    good = _tfrecords(tmp_path / "a.tfrecord")
    data = bytearray(_tfrecords(tmp_path / "b.tfrecord").read_bytes())
    data[5 * 206 + 40] ^= 0xFF  # a byte of record 6's data: its CRC no longer matches
    (tmp_path / "b.tfrecord").write_bytes(bytes(data))
    bad = tmp_path / "b.tfrecord"
    # TensorFlow names the offset of the record's data, after its 12-byte header
    expected = f"cannot read TFRecords {str(bad)!r} (DataLossError: corrupted record at {5 * 206 + 12})"
    for read in (lambda: tfrecord_source(str(tmp_path / "*.tfrecord")),
                 lambda: load_dataset(str(tmp_path / "*.tfrecord"))):
        with pytest.raises(UsageError) as e:
            read()
        assert str(e.value) == expected
    assert good.exists()


# -- row 2: --max-global-batch-size without auto; auto's base batch vs the training set --------

def test_max_global_batch_size_without_auto_is_refused(tmp_path, capfd):
    """Was: accepted and ignored."""
    proc = cli(capfd, *TRAIN, "--max-global-batch-size", "256", "--out", tmp_path / "run")
    assert_error(proc, "--max-global-batch-size 256 only applies to --global-batch-size auto or ramp, got "
                       "--global-batch-size 32")
    assert not (tmp_path / "run").exists()
    from distbatch.errors import ParameterError
    from distbatch.training.config import TrainConfig
    with pytest.raises(ParameterError, match="^max_global_batch_size 256 only applies to "
                                             "global_batch_size auto or ramp, got global_batch_size 32$"):
        TrainConfig(out="x", global_batch_size=32, max_global_batch_size=256)


def test_auto_with_a_base_batch_beyond_the_training_set(tmp_path, capfd, dataset_cache):
    """Was: "no batch from 512 to 1024 is a multiple of replicas x accumulation steps = 1"."""
    proc = cli(capfd, "train", *TINY, "--global-batch-size", "auto", "--max-global-batch-size", "1024",
               "--scaling", "adascale", "--base-batch-size", "512", "--warmup", "none", "--steps", "8",
               "--out", tmp_path / "run")
    assert_error(proc, "--base-batch-size 512 is larger than the training set (256 examples); "
                       "--global-batch-size auto starts at the base batch")
    assert not (tmp_path / "run").exists()
    from distbatch.training.goodput import candidate_batches
    with pytest.raises(ValueError, match=r"^the base batch 512 is larger than the training set "
                                         r"\(256 examples\)$"):
        candidate_batches(512, 1024, units=1, num_examples=256)


# -- row 3: --resume of a directory that holds no run ------------------------------------------

@pytest.mark.parametrize("what", ["does not exist", "is empty"])
def test_resume_of_a_missing_out_is_refused(what, tmp_path, capfd):
    """Was: a fresh run, silently (a mistyped --out). (`sweep --resume` into a new directory
    still starts the sweep: scripts/bootstrap.sh passes --resume on the first run too.)"""
    out = tmp_path / "runs" / "mistyped"
    if what == "is empty":
        out.mkdir(parents=True)
    assert_error(cli(capfd, *TRAIN, "--resume", "--out", out),
                 f"--resume: no checkpoint found in {str(out)!r} (the directory {what}); expected the "
                 "--out of an earlier run: check the path, or drop --resume to start a new run")
    assert os.listdir(out) == [] if what == "is empty" else not (tmp_path / "runs").exists()


def test_fit_resume_from_a_missing_checkpoint_dir_is_refused(tmp_path):
    import keras

    import distbatch
    missing = tmp_path / "ckpts-typo"
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError) as e:
        distbatch.fit(model_fn=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      optimizer_fn=lambda: keras.optimizers.SGD(0.1),
                      data=(rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 2, 64)),
                      global_batch_size=16, steps=2, backend="single", verbose=False,
                      checkpoint_dir=str(missing), resume=True)
    assert str(e.value) == (f"checkpoint_dir {str(missing)!r} does not exist, so resume=True found no "
                            "checkpoint there; expected the checkpoint_dir of an earlier run (or "
                            "resume=False to start a new one)")
    assert not missing.exists()


# -- row 4: gradient compression on one replica ------------------------------------------------

@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_compression_on_one_replica_is_no_cast(trained, codec, tmp_path, capfd):
    """Was: the gradients rounded although nothing is all-reduced (val_loss 2.352025 with fp16
    against 2.351814 without), and summary.json without grad_compression (null)."""
    out = tmp_path / "run"
    assert_ok(cli(capfd, *TRAIN, "--dataset", "mnist1d", "--grad-compression", codec, "--out", out))
    for a, b in zip(load_weights(out), load_weights(trained), strict=True):
        np.testing.assert_array_equal(a, b)  # exactly: no rounding anywhere
    assert load_summary(out)["val_loss"] == load_summary(trained)["val_loss"]
    assert load_summary(out)["grad_compression"] == load_summary(trained)["grad_compression"] == "none"
    with open(out / "config.json") as f:
        assert json.load(f)["grad_compression"] == codec  # the flag as given


def test_compression_is_kept_where_gradients_travel():
    from distbatch.backends.single import SingleBackend
    from distbatch.training.step import wire_compression

    class TwoReplicas:  # any backend but the single one all-reduces between replicas
        num_replicas = 2
    assert wire_compression(SingleBackend(), "fp16") == "none"
    assert wire_compression(TwoReplicas(), "fp16") == "fp16"
    assert wire_compression(TwoReplicas(), "none") == "none"


# -- row 5: a run directory inside an image dataset --------------------------------------------

@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image
    d = tmp_path / "images"
    for cls, rgb in (("cat", (250, 0, 0)), ("dog", (0, 0, 250))):
        (d / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (6, 5), rgb).save(d / cls / f"{i}.png")
    return d


def test_a_run_directory_is_not_a_class(images):
    """Was: a run directory in the dataset became an extra, empty class."""
    from distbatch.data.datasets import load_dataset
    from distbatch.outdir import MARKER
    (images / "old-run" / "checkpoints").mkdir(parents=True)
    (images / "old-run" / MARKER).write_text("written by `distbatch train`\n")
    (images / "old-run" / "config.json").write_text("{}\n")
    ds = load_dataset(str(images), image_size=(5, 6))
    assert ds.num_classes == 2 and ds.train_size + ds.val_size == 16
    (images / "bird").mkdir()  # a directory without the marker is still a class
    (images / "bird" / "0.png").write_bytes((images / "cat" / "0.png").read_bytes())
    assert load_dataset(str(images), image_size=(5, 6)).num_classes == 3


def test_out_inside_the_image_directory_is_refused(images, capfd):
    out = images / "run"
    before = snapshot(images)
    proc = cli(capfd, "train", "--backend", "single", "--dataset", images, "--global-batch-size", "4",
               "--steps", "2", "--out", out)
    assert_error(proc, f"--out {str(out)!r} is inside the image directory --dataset {str(images)!r}, "
                       "whose sub-directories are its classes; expected an --out outside it")
    assert snapshot(images) == before


# -- row 6: a dataset replaced between a run and its --resume ----------------------------------

def test_resume_refuses_a_replaced_dataset(tmp_path, capfd):
    """Was: resumed silently on a same-size file with labels permuted and inputs negated."""
    data, out = _npz(tmp_path / "data.npz"), tmp_path / "run"
    argv = [*TRAIN, "--dataset", data, "--out", out]
    assert_ok(cli(capfd, *argv))
    with open(out / "config.json") as f:
        then = json.load(f)["data_fingerprint"]
    size = data.stat().st_size
    _npz(data, permuted=True)
    assert data.stat().st_size == size
    from distbatch.data.datasets import fingerprint, load_dataset
    now = fingerprint(load_dataset(str(data), train_size=256, val_size=64))
    assert now["sample_sha256"] != then["sample_sha256"]
    before = snapshot(out)
    assert_error(cli(capfd, *argv, "--resume"),
                 f"--resume: dataset {str(data)!r} is not the data the run in {str(out)!r} trained on "
                 f"(256 train / 64 val examples, sample sha256 {now['sample_sha256']} now, 256 train / "
                 f"64 val examples, sample sha256 {then['sample_sha256']} then); resume with the same "
                 "data or use another --out")
    assert snapshot(out) == before
    # A run written before the fingerprint existed (no key) still resumes.
    config = json.loads((out / "config.json").read_text())
    del config["data_fingerprint"]
    (out / "config.json").write_text(json.dumps(config))
    proc = cli(capfd, *argv, "--resume")
    assert_ok(proc)
    assert f"resumed from {out}/checkpoints/ckpt-8 at step 8" in proc.stderr


def test_streamed_fingerprint_sees_a_replaced_file(tmp_path):
    from distbatch.data.datasets import fingerprint
    from distbatch.data.files import tfrecord_source
    from distbatch.data.inputs import SourceDataset

    def of(path):
        train, val, shape, classes = tfrecord_source(str(path))
        return fingerprint(SourceDataset(str(path), train, val, shape, classes))
    path = _tfrecords(tmp_path / "d.tfrecord")
    first = of(path)
    assert (first["train_examples"], first["val_examples"]) == (34, 6) and of(path) == first  # hash split
    _tfrecords(path, negate=True, labels=[(i + 1) % 4 for i in range(40)])
    assert of(path)["sample_sha256"] != first["sample_sha256"]
    assert fingerprint(SourceDataset("mnist1d", None, None, (40,), 10)) is None  # by its flags


# -- row 7: a duplicated row in a sweep's results.jsonl ----------------------------------------

def _row(batch: int, seed: int = 0, val_accuracy: float = 0.5) -> dict:
    from distbatch.measure.results import ROW_FIELDS, make_point_id
    row = {k: None for k in ROW_FIELDS}
    row.update(point_id=make_point_id(batch, seed), status="ok", global_batch_size=batch,
               per_replica_batch_size=batch, replicas=1, backend="single", seed=seed,
               val_accuracy=val_accuracy, diverged=False, history=[])
    return row


def test_a_duplicated_point_row_is_refused(tmp_path, capfd):
    """Was: silently averaged into the report (the point weighed twice)."""
    rows = [_row(32), _row(64), _row(32, val_accuracy=0.9)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(tmp_path)
    line = (f"{tmp_path / 'results.jsonl'} lines 1 and 3 both record point 'bs=32/seed=0'; "
            "expected one row per point: delete one of the two lines")
    assert_error(cli(capfd, "report", tmp_path), line)
    assert snapshot(tmp_path) == before  # no report.md, no plots
    from distbatch.errors import UsageError
    from distbatch.measure import results
    for use in (results.done_point_ids, lambda d: results.append_row(d, _row(128))):
        with pytest.raises(UsageError) as e:  # sweep --resume and the next append refuse it too
            use(tmp_path)
        assert str(e.value) == line
    assert snapshot(tmp_path) == before


# -- row 8: symlinked sub-directories of --out -------------------------------------------------

@pytest.mark.parametrize("name", ["checkpoints", "tensorboard"])
def test_symlinked_subdirectory_of_out_is_refused(trained, name, tmp_path, capfd):
    """Was: --resume wrote and pruned files in the link's target."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / name, elsewhere)
    os.symlink(elsewhere, out / name)
    before, target = snapshot(out), snapshot(elsewhere)
    assert_error(cli(capfd, *TRAIN, "--dataset", "mnist1d", "--resume", "--out", out),
                 f"--out {str(out)!r}: {name}/ is a symlink to {str(elsewhere)!r}; expected a real "
                 "directory (distbatch writes and deletes files in it); replace the link with a "
                 "directory or use another --out")
    assert snapshot(out) == before and snapshot(elsewhere) == target


# -- row 9: a non-chief worker's temporary checkpoint directory --------------------------------

@pytest.mark.parametrize("fails", [False, True])
def test_non_chief_temp_checkpoints_leave_nothing(fails, tmp_path, monkeypatch):
    """Rank 1 of a multi-process job writes its required checkpoint copies to a temp directory;
    none may stay behind, whether the run ends normally or with an error (was: one
    distbatch-ckpt-w1-* directory left per run)."""
    import keras

    import distbatch
    from distbatch.backends.single import SingleBackend
    from distbatch.training.run_checkpoints import RunCheckpoint
    from distbatch.training.trainer import Trainer

    class RankOne(SingleBackend):  # one device that is not the chief: saves to a temp dir
        is_chief = False

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    made = []
    real_init = RunCheckpoint.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self.temp_dir)
    monkeypatch.setattr(RunCheckpoint, "__init__", init)
    if fails:
        real_evaluation = Trainer._evaluation

        def evaluation(self, *args, **kwargs):
            real_evaluation(self, *args, **kwargs)  # saves a checkpoint, then something fails
            raise RuntimeError("a collective failed")
        monkeypatch.setattr(Trainer, "_evaluation", evaluation)
    rng = np.random.default_rng(0)
    run = lambda: distbatch.fit(  # noqa: E731
        model_fn=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
        optimizer_fn=lambda: keras.optimizers.SGD(0.1),
        data=(rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 2, 64)),
        global_batch_size=16, steps=4, backend=RankOne(), verbose=False,
        checkpoint_dir=str(tmp_path / "chief-checkpoints"), checkpoint_every=2)
    if fails:
        with pytest.raises(RuntimeError, match="a collective failed"):
            run()
    else:
        run()
    assert len(made) == 1 and made[0].startswith(str(temp / f"distbatch-ckpt-w0-p{os.getpid()}-"))
    assert [n for n in os.listdir(temp) if n.startswith("distbatch")] == []  # (autograph's stay)


def test_temp_checkpoints_of_killed_workers_are_removed_by_the_next_one(tmp_path):
    """A SIGKILLed worker (a --max-restarts restart, a dead peer) cannot remove its own copies
    (1.3 MB of model and optimizer state each here); the next non-chief worker removes those
    whose process is gone."""
    from distbatch.training.checkpoints import temp_checkpoint_dir
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    dead = tmp_path / f"distbatch-ckpt-w1-p{gone.pid}-abc"
    dead.mkdir()
    (dead / "ckpt-12.index").write_bytes(b"x")
    live = tmp_path / f"distbatch-ckpt-w1-p{os.getppid()}-def"  # the test runner's parent
    legacy = tmp_path / "distbatch-ckpt-w1-xyz"  # a name without a process id: cannot tell
    other = tmp_path / "distbatch-ckpt-notes"
    for d in (live, legacy, other):
        d.mkdir()
    new = temp_checkpoint_dir(1, root=str(tmp_path))
    assert Path(new).name.startswith(f"distbatch-ckpt-w1-p{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, legacy.name, other.name, Path(new).name])


# -- row 10: more logical CPU replicas than cores ----------------------------------------------

def test_more_cpu_replicas_than_cores_warns_once(monkeypatch, capsys):
    from distbatch.backends import strategy
    monkeypatch.setattr(strategy, "available_cores", lambda: 2)
    monkeypatch.setattr(strategy, "_WARNED", set())
    strategy.warn_if_more_than_cores(2)
    strategy.warn_if_more_than_cores(64)
    strategy.warn_if_more_than_cores(64)  # a sweep's next point: not again
    assert capsys.readouterr().err.splitlines() == [
        "distbatch: warning: 64 logical CPU replicas on 2 CPU core(s): logical CPU replicas are for "
        "tests and demos, share the cores and run slowly (64 of them took 179 s for 2 steps on 2 "
        "cores); expected at most 2"]


@pytest.mark.slow
def test_real_mirrored_run_with_more_replicas_than_cores_warns(tmp_path, dataset_cache):
    """A real process on ONE core (taskset): 2 logical CPU replicas warn, then train; a refused
    command with them prints its error line only."""
    if shutil.which("taskset") is None:
        pytest.skip("no taskset command to restrict the CPU affinity")
    base = ["taskset", "-c", "0", DISTBATCH, "train", "--backend", "mirrored", "--cpu-replicas", "2",
            "--dataset", "mnist1d", "--train-size", "256", "--val-size", "64", "--steps", "2"]
    run = lambda *extra: subprocess.run([*base, *extra], capture_output=True, text=True,  # noqa: E731
                                        timeout=300, env=cli_env())
    proc = run("--global-batch-size", "32", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if "warning" in l]
    assert warnings == [
        "distbatch: warning: 2 logical CPU replicas on 1 CPU core(s): logical CPU replicas are for "
        "tests and demos, share the cores and run slowly (64 of them took 179 s for 2 steps on 2 "
        "cores); expected at most 1"]
    proc = run("--global-batch-size", "33", "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "distbatch: error: --global-batch-size 33 is not divisible by replicas (2) x accumulation "
        "steps (1) = 2; try 32"], proc.stderr[-3000:]
