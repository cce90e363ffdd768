"""Issue 15, data side: never destroy or corrupt a user's data, say exactly what went wrong.

Every case checks the exit code, that stderr is exactly one line (warnings
aside where stated), that there is no traceback, and that nothing was deleted
or half-written. docs/reliability.md lists the same rows.

Most cases run `distbatch` in THIS process through distbatch.cli.main (what
the console script calls), with file descriptors captured by capfd: a new
process per case would cost ~5 s of TensorFlow import each. The disk-full
train case runs as a real process. Disk-full and read-only cases mount a
small tmpfs and are skipped (with the reason) where mount is not permitted.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import load_summary, run_cli
from conftest import cli_in_process as cli
from conftest import snapshot

TINY = ["--backend", "single", "--dataset", "mnist1d", "--train-size", "256", "--val-size", "64"]
TRAIN = ["train", *TINY, "--global-batch-size", "32", "--steps", "8", "--checkpoint-every", "4"]
SWEEP = ["sweep", *TINY, "--model", "mlp", "--batch-sizes", "32,64", "--steps", "8",
         "--no-noise-scale"]


# -- helpers ---------------------------------------------------------------------------------



def one_line(proc, code: int = 2, *parts: str) -> str:
    """Exit `code`, stderr exactly one `distbatch: error:` line holding `parts`, no traceback."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{both[-3000:]}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("distbatch: error: "), lines[0]
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def ends_with_one_error(proc, code: int, *parts: str) -> str:
    """For failures after training started (its progress lines come first): the LAST stderr
    line is the only error line, exit `code`, no traceback."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{both[-3000:]}"
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("distbatch: error: "), errors[0]
    for part in parts:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    return errors[0]


def user_dir(path: Path) -> Path:
    """A directory of the user's own files that happen to share distbatch's names."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "model.pt").write_bytes(b"the user's weights")
    (path / "config.json").write_text('{"lr": 0.1}\n')
    (path / "notes.txt").write_text("mine\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_cache):
    """A finished 8-step run with checkpoints at steps 4 and 8 (and their state files)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_cli([*TRAIN, "--out", str(out)])
    assert sorted(os.listdir(out / "checkpoints")) == [
        "checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index",
        "ckpt-8.data-00000-of-00001", "ckpt-8.index", "state-4.json", "state-8.json"]
    return out


@pytest.fixture(scope="module")
def swept(tmp_path_factory, dataset_cache):
    out = tmp_path_factory.mktemp("swept") / "sweep"
    run_cli([*SWEEP, "--out", str(out)])
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a fresh tmpfs mount point; skips the test where mount is refused."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                               capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount command: cannot make a full or read-only file system")
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True, timeout=30)


# -- 1. data loss: validate first, --overwrite only in distbatch's own directories ----------

@pytest.mark.slow
def test_sweep_overwrite_with_a_bad_flag_deletes_nothing(swept, tmp_path, capfd):
    """Issue item 1: the flags are validated before --overwrite deletes anything."""
    out = copy(swept, tmp_path)
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    proc = cli(capfd, *SWEEP, "--overwrite", "--momentum", "1.5", "--out", out)
    one_line(proc, 2, "--momentum must be a finite number in [0, 1), got 1.5")
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("flag", ["--overwrite", None])
def test_a_directory_distbatch_did_not_create_is_refused(command, flag, tmp_path, capfd):
    out = user_dir(tmp_path / "mine")
    before = snapshot(out)
    argv = TRAIN if command == "train" else SWEEP
    proc = cli(capfd, *argv, *([flag] if flag else []), "--out", out)
    one_line(proc, 2, f"--out {str(out)!r} is not empty and was not created by distbatch",
             ".distbatch-run")
    assert snapshot(out) == before


@pytest.mark.slow
def test_overwrite_removes_only_distbatchs_own_files(trained, tmp_path, capfd):
    out = copy(trained, tmp_path)
    (out / "notes.txt").write_text("mine\n")
    (out / "data").mkdir()
    (out / "data" / "x.npz").write_bytes(b"user data")
    first = load_summary(out)["started"]
    proc = cli(capfd, *TRAIN, "--overwrite", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "data" / "x.npz").read_bytes() == b"user data"
    assert load_summary(out)["started"] > first


@pytest.mark.slow
def test_round1_run_without_marker_is_recognised_by_its_config(trained, tmp_path, capfd):
    """Round-1 runs have no .distbatch-run; their config.json (command, backend_reason) is
    distbatch's, so --overwrite/--resume accept them and the marker is added."""
    out = copy(trained, tmp_path)
    (out / ".distbatch-run").unlink()
    proc = cli(capfd, *TRAIN, "--overwrite", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".distbatch-run").is_file()


def test_sweep_that_fails_validation_leaves_nothing_then_a_corrected_rerun_works(tmp_path, capfd,
                                                                                dataset_cache):
    out = tmp_path / "sweep"
    for bad, message in ((["--momentum", "1.5"], "--momentum must be a finite number in [0, 1), got 1.5"),
                         (["--warmup-steps", "10"], "warmup (10 steps) is longer than training (8 steps)"),
                         (["--model", "resnet"], "--model resnet needs image inputs")):
        one_line(cli(capfd, *SWEEP, *bad, "--out", out), 2, message)
        assert not out.exists(), f"{bad}: a refused sweep left {sorted(os.listdir(out))}"
    proc = cli(capfd, *SWEEP, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["point_id"] for r in rows] == ["bs=32/seed=0", "bs=64/seed=0"]


# -- 2. I/O errors are I/O errors, with their own exit code ---------------------------------

def test_io_errors_are_classified_by_their_os_text_not_as_out_of_memory():
    import tensorflow as tf

    from distbatch.errors import io_failure_message
    from distbatch.measure.probe import is_out_of_memory
    cases = [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/x"),
             OSError(errno.EROFS, os.strerror(errno.EROFS), "out/x"),
             OSError(errno.EACCES, os.strerror(errno.EACCES), "out/x"),
             OSError(errno.EPERM, os.strerror(errno.EPERM), "out/x"),
             tf.errors.ResourceExhaustedError(None, None, "out/ckpt-4_temp/part-0; No space left on device"),
             tf.errors.FailedPreconditionError(None, None, "out/ckpt-4; Read-only file system"),
             tf.errors.UnknownError(None, None, "out/events; Permission denied"),
             tf.errors.PermissionDeniedError(None, None, "out/x; Operation not permitted")]
    for exc in cases:
        message = io_failure_message(exc)
        assert message and message.startswith("I/O error: "), (exc, message)
        assert not is_out_of_memory(exc), exc
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = cases[0]
    assert "No space left on device (out/x)" in io_failure_message(wrapped)
    assert io_failure_message(ValueError("bad")) is None
    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))


@pytest.mark.slow
def test_disk_full_during_train_is_an_io_error_exit_4(tmpfs, dataset_cache):
    """Real ENOSPC: config.json fits in 300 KiB, the first checkpoint (~630 KB) does not."""
    out = tmpfs("full", "size=300k") / "run"
    proc = run_cli([*TRAIN, "--out", str(out)], check=False)  # a real process, the real CLI
    line = ends_with_one_error(proc, 4, "I/O error: No space left on device", "--resume")
    assert "out of memory" not in line and "accumulation" not in line


def test_disk_full_stops_a_sweep_exit_4_and_records_no_point(tmpfs, capfd, dataset_cache):
    out = tmpfs("full", "size=300k") / "sweep"
    proc = cli(capfd, *SWEEP, "--out", out)
    line = ends_with_one_error(proc, 4, "I/O error: No space left on device")
    assert "out of memory" not in line
    rows = out / "results.jsonl"
    assert not rows.exists() or rows.read_text() == "", rows.read_text()


def test_permission_error_on_checkpoint_stops_a_sweep(monkeypatch, tmp_path, capfd, dataset_cache):
    """EACCES injected at the checkpoint save (root ignores permission bits, so no real one)."""
    import tensorflow as tf

    def refuse(self, *a, **k):
        raise tf.errors.PermissionDeniedError(None, None, f"{self.directory}/ckpt-4; Permission denied")
    monkeypatch.setattr(tf.train.CheckpointManager, "save", refuse)
    out = tmp_path / "sweep"
    ends_with_one_error(cli(capfd, *SWEEP, "--out", out), 4, "I/O error: Permission denied")
    assert not (out / "results.jsonl").exists()


# -- 3. resume refuses any change of the result ---------------------------------------------

@pytest.mark.parametrize("change, key", [
    (["--momentum-correction"], "momentum-correction"),
    (["--decay-factor", "0.2"], "decay-factor"),
    (["--decay-epochs", "0.5"], "decay-epochs"),
    (["--warmup-from", "zero"], "warmup-from"),
    (["--evals-per-epoch", "2"], "evals-per-epoch"),
    (["--num-classes", "12"], "num-classes"),
    (["--early-stopping-metric", "val_loss"], "early-stopping-metric"),
])
def test_train_resume_refuses_a_changed_flag(trained, tmp_path, capfd, change, key):
    out = copy(trained, tmp_path)
    before = snapshot(out)
    proc = cli(capfd, *TRAIN, *change, "--resume", "--out", out)
    one_line(proc, 2, f"--resume: --{key} is ", f"but the run in {str(out)!r} used ")
    assert snapshot(out) == before


def test_train_resume_may_change_where_and_how_often_it_writes(trained, tmp_path, capfd):
    out = copy(trained, tmp_path)
    proc = cli(capfd, *[a for a in TRAIN if a not in ("--checkpoint-every", "4")],
               "--checkpoint-every", "2", "--resume", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("change, key", [
    (["--model", "convnet"], "model"), (["--steps", "12"], "steps"), (["--base-lr", "0.1"], "base-lr")])
@pytest.mark.slow
def test_sweep_resume_refuses_another_model_length_or_lr(swept, tmp_path, capfd, change, key):
    out = copy(swept, tmp_path)
    before = snapshot(out)
    argv = [a for a in SWEEP]
    if change[0] in argv:
        i = argv.index(change[0])
        del argv[i:i + 2]
    proc = cli(capfd, *argv, *change, "--resume", "--out", out)
    one_line(proc, 2, f"--resume: --{key} is ")
    assert snapshot(out) == before


# -- 4. checkpoints are verified on restore -------------------------------------------------

def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_garbage_checkpoint_index_resumes_from_the_newest_checkpoint(trained, tmp_path, capfd):
    out = copy(trained, tmp_path)
    (out / "checkpoints" / "checkpoint").write_text("garbage {{{\n")
    proc = cli(capfd, *TRAIN, "--resume", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/ckpt-8 at step 8" in proc.stderr
    for step in (4, 8):  # nothing pruned
        assert (out / "checkpoints" / f"ckpt-{step}.index").is_file()
        assert (out / "checkpoints" / f"state-{step}.json").is_file()


@pytest.mark.parametrize("damaged", ["ckpt-8.data-00000-of-00001", "ckpt-8.index", "state-8.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(trained, tmp_path, capfd, damaged):
    out = copy(trained, tmp_path)
    path = out / "checkpoints" / damaged
    if damaged.startswith("state"):
        path.unlink()
    else:
        _damage(path)
    proc = cli(capfd, *TRAIN, "--resume", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("distbatch: warning:")]
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and "ckpt-8" in warnings[0]
    assert f"resumed from {out}/checkpoints/ckpt-4 at step 4" in proc.stderr
    # Steps 5..8 again from the intact checkpoint: the result of the uninterrupted run.
    again, first = load_summary(out), load_summary(trained)
    assert again["steps"] == 8 and [h["step"] for h in again["history"]] == [h["step"] for h in first["history"]]
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)
    assert (out / "checkpoints" / "ckpt-4.index").is_file()


def test_no_intact_checkpoint_is_refused_and_nothing_changes(trained, tmp_path, capfd):
    out = copy(trained, tmp_path)
    _damage(out / "checkpoints" / "ckpt-8.data-00000-of-00001")
    (out / "checkpoints" / "state-4.json").unlink()
    before = snapshot(out)
    proc = cli(capfd, *TRAIN, "--resume", "--out", out)
    one_line(proc, 2, "--resume: no intact checkpoint in", "ckpt-8: ", "ckpt-4: ", "--overwrite")
    assert snapshot(out) == before


# -- 5. data checks and tracebacks that became one line -------------------------------------

def _tfrecord(path: Path, n: int = 40, shape=None) -> None:
    import tensorflow as tf
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(n):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=rng.random(40))),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 4]))}
            if shape is not None:
                feature["shape"] = tf.train.Feature(int64_list=tf.train.Int64List(value=shape))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-data")
    rng = np.random.default_rng(0)
    x, xv = rng.random((64, 40)).astype(np.float32), rng.random((16, 40)).astype(np.float32)
    y, yv = np.arange(64) % 10, np.arange(16) % 10
    _tfrecord(d / "full.tfrecord")
    data = (d / "full.tfrecord").read_bytes()
    (d / "cut.tfrecord").write_bytes(data[: len(data) // 2 + 7])  # cut inside a record
    _tfrecord(d / "negative.tfrecord", shape=[-2, -20])
    with zipfile.ZipFile(d / "not_npy.npz", "w") as z:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(name, b"plain bytes, not .npy")
    np.savez(d / "uint8_float.npz", x_train=(x * 255).astype(np.uint8), y_train=y, x_test=xv, y_test=yv)
    np.savez(d / "scale.npz", x_train=x * 255, y_train=y, x_test=xv, y_test=yv)
    big = y.copy()
    big[3] = 100000
    np.savez(d / "label_100000.npz", x_train=x, y_train=big, x_test=xv, y_test=yv)
    np.savez(d / "five_d.npz", x_train=x.reshape(64, 2, 2, 2, 5), y_train=y,
             x_test=xv.reshape(16, 2, 2, 2, 5), y_test=yv)
    from PIL import Image
    for cls, rgb in (("cat", (250, 0, 0)), ("dog", (0, 0, 250))):
        (d / "images" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 5), rgb).save(d / "images" / cls / f"{i}.png")
    (d / "images" / "dog" / "3.png").write_bytes(b"not a png")
    (d / "a_file").write_text("a file\n")
    os.symlink("loop_b", d / "loop_a")
    os.symlink("loop_a", d / "loop_b")
    return d


FILE_TRAIN = ["train", "--backend", "single", "--global-batch-size", "16", "--steps", "2"]

# id -> (argv after `train` defaults, substrings of the one error line); {d} = files fixture
DATA_CASES = {
    "tfrecord_cut_inside_a_record": (["--dataset", "{d}/cut.tfrecord"],
                                     ["TFRecord file '{d}/cut.tfrecord' is truncated or corrupt"]),
    "tfrecord_negative_shape": (["--dataset", "{d}/negative.tfrecord"],
                                ["must be positive integers like 32x32x3, got [-2, -20]"]),
    "npz_members_not_npy": (["--dataset", "{d}/not_npy.npz"],
                            ["member(s) x_train, y_train, x_test, y_test are not .npy arrays"]),
    "uint8_train_float_val": (["--dataset", "{d}/uint8_float.npz"],
                              ["x_train is uint8 but x_test is float32"]),
    "train_val_scale_differs": (["--dataset", "{d}/scale.npz"],
                                ["train inputs reach", "but val inputs", "same scale"]),
    "label_100000": (["--dataset", "{d}/label_100000.npz"],
                     ["labels go up to 100000 but only 11 distinct values occur",
                      "--num-classes 100001"]),
    "corrupt_image": (["--dataset", "{d}/images"],
                      ["cannot decode image '{d}/images/dog/3.png'"]),
    "synthetic_too_large": (["--dataset", "synthetic:100000x100000x3"],
                            ["'synthetic:100000x100000x3' needs", "GiB", "more than this machine's"]),
    "resnet50_on_digits": (["--dataset", "digits", "--model", "ResNet50"],
                           ["--model ResNet50 needs images of at least 32x32, got input shape (8, 8, 1)"]),
    "convnet_on_5d_inputs": (["--dataset", "{d}/five_d.npz", "--model", "convnet"],
                             ["--model convnet takes", "got input shape (2, 2, 2, 5)"]),
    "out_under_a_file": (["--out", "{d}/a_file/run"], ["cannot be created", "is not a directory"]),
    "out_symlink_loop": (["--out", "{d}/loop_a"], ["is a broken symlink or a symlink loop"]),
    "out_under_symlink_loop": (["--out", "{d}/loop_a/run"], ["is a broken symlink or a symlink loop"]),
    "out_in_proc": (["--out", "/proc/distbatch-run"], ["--out '/proc/distbatch-run' is not writable"]),
}


@pytest.mark.parametrize("case_id", list(DATA_CASES))
def test_bad_data_and_out_is_one_line(files, tmp_path, capfd, dataset_cache, case_id):
    argv, parts = DATA_CASES[case_id]
    fill = lambda s: s.replace("{d}", str(files))  # noqa: E731
    argv = [fill(a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    before = snapshot(files)
    proc = cli(capfd, *FILE_TRAIN, *argv)
    one_line(proc, 2, *map(fill, parts))
    assert not (tmp_path / "run").exists()
    assert snapshot(files) == before


def test_num_classes_insists_on_a_large_label(files, tmp_path, capfd, dataset_cache):
    out = tmp_path / "run"
    proc = cli(capfd, *FILE_TRAIN, "--dataset", files / "label_100000.npz", "--num-classes", "100001",
               "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["num_classes"] == 100001


def test_out_on_a_read_only_file_system_is_refused(tmpfs, capfd, dataset_cache):
    out = tmpfs("ro", "ro,size=64k") / "run"
    one_line(cli(capfd, *TRAIN, "--out", out), 2, f"--out {str(out)!r} is not writable",
             "Read-only file system")


def test_unwritable_dataset_cache_warns_and_trains(files, tmp_path, capfd, monkeypatch):
    """The cache lives under HOME (here a file, so nothing can be created there): one warning
    line, the run goes on with the data in memory."""
    monkeypatch.setenv("DISTBATCH_CACHE_DIR", str(files / "a_file" / "cache"))
    out = tmp_path / "run"
    proc = cli(capfd, "train", "--backend", "single", "--dataset", "mnist1d", "--train-size", "96",
               "--val-size", "32", "--global-batch-size", "32", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("distbatch: warning:")]
    assert len(warnings) == 1 and "cannot cache mnist1d" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr and (out / "summary.json").is_file()


def test_report_with_a_bad_row_names_the_line(swept, tmp_path, capfd):
    out = copy(swept, tmp_path)
    lines = (out / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["global_batch_size"] = "abc"
    lines[1] = json.dumps(row)
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(out)
    one_line(cli(capfd, "report", out), 2, f"{out}/results.jsonl:2: global_batch_size must be a "
                                           "positive integer, got 'abc'")
    assert snapshot(out) == before


@pytest.mark.parametrize("target", ["/proc/bench.json", "{d}/a_file/bench.json", "{d}"])
def test_bench_json_to_an_unwritable_path_is_refused_before_measuring(files, capfd, monkeypatch, target):
    import distbatch.measure.bench

    def measured(args):
        raise AssertionError("bench measured before checking --json")
    monkeypatch.setattr(distbatch.measure.bench, "measure", measured)
    target = target.replace("{d}", str(files))
    one_line(cli(capfd, "bench", "--backend", "single", "--iters", "1", "--json", target), 2,
             f"--json {target!r}")
