"""Issue 27 ("Trust, round 3"): bad input that used to end in a traceback, a warning, a
hang or an unclear line. Every case: exit 2, stderr exactly ONE `distbatch: error:` line
(compared whole), no traceback, nothing written. docs/reliability.md lists the same rows.

Cases run `distbatch` in THIS process through distbatch.cli.main, as tests/test_trust.py
does (a process per case costs ~5 s of TensorFlow import); the few that need a fresh
process (warnings as a user sees them, a multiworker backend, a closed stdout pipe) run in
one subprocess under `-m slow`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import DISTBATCH, cli_env, run_cli_cases
from conftest import cli_in_process as cli, assert_one_line_error as assert_error

TRAIN = ["train", "--backend", "single", "--train-size", "256", "--val-size", "64",
         "--global-batch-size", "32", "--steps", "2"]
GIB = 2**30






@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("round3")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 40)).astype(np.float32), rng.integers(0, 10, 300)
    good = dict(x_train=x, y_train=y, x_test=x[:64], y_test=y[:64])
    np.savez(d / "x_0d.npz", **{**good, "x_train": np.array(3.0)})
    np.savez(d / "complex.npz", **{**good, "x_train": x.astype(np.complex64),
                                   "x_test": x[:64].astype(np.complex64)})
    big = x.astype(np.float64)
    big[0, 0] = 1e300
    np.savez(d / "beyond_float32.npz", **{**good, "x_train": big, "x_test": x[:64].astype(np.float64)})
    np.save(d / "array.npy", x)
    os.rename(d / "array.npy", d / "npy_renamed.npz")
    (d / "random.npz").write_bytes(bytes(range(7, 256)) * 4)
    (d / "baseline.npz").write_bytes((d / "complex.npz").read_bytes())
    return d


def _tfrecords(path: Path, labels) -> Path:
    import tensorflow as tf
    with tf.io.TFRecordWriter(str(path)) as w:
        for i, label in enumerate(labels):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[float(i % 7)] * 8)),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path


@pytest.fixture
def memory_16_gib(monkeypatch):
    """This machine has 16 GiB, for messages that do not depend on the test machine."""
    from distbatch import machine
    monkeypatch.setattr(machine, "physical_memory", lambda: 16 * GIB)


# -- row 1: a 0-d x_train --------------------------------------------------------------------

def test_npz_with_0d_x_train_is_one_line(data, tmp_path, capfd):
    """Was: TypeError: len() of unsized object (from the --train-size subset)."""
    path = data / "x_0d.npz"
    assert_error(cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run"),
                 f"{path}: x_train must have shape (n, ...), got ()")
    assert not (tmp_path / "run").exists()


# -- row 2: complex inputs, float64 beyond float32 ------------------------------------------

def test_complex_inputs_are_refused_not_cast_to_their_real_part(data, tmp_path, capfd):
    """Was: a ComplexWarning, then training on the real part, exit 0."""
    path = data / "complex.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning on the way is a failure
        proc = cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run")
    assert_error(proc, f"{path}: x_train has complex dtype complex64; expected real numbers "
                       "(integers, floats or booleans)")
    assert not (tmp_path / "run").exists()


def test_float64_beyond_float32_is_one_line_without_a_warning(data, tmp_path, capfd):
    """Was: numpy's 2-line RuntimeWarning (overflow encountered in cast), then the error."""
    path = data / "beyond_float32.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc = cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run")
    assert_error(proc, f"{path}: x_train has 1 value(s) beyond float32's range (largest |x| 1e+300); "
                       "expected values within +-3.403e+38 (inputs are trained as float32)")


# -- row 3: unclear lines -------------------------------------------------------------------

def test_negative_tfrecord_labels_name_the_label(tmp_path, capfd):
    """Was: "num_classes must be an integer >= 2, got -4" (read into memory with --train-size)."""
    path = _tfrecords(tmp_path / "neg.tfrecord", [-5] * 400)
    assert_error(cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run"),
                 f"{path}: the labels span [-5, -5]; expected class indices 0..K-1 (>= 0) with at "
                 "least 2 classes")
    # streamed (no --train-size/--val-size): the same label named by the streaming reader
    streamed = [a for a in TRAIN if a not in ("--train-size", "256", "--val-size", "64")]
    assert_error(cli(capfd, *streamed, "--dataset", path, "--out", tmp_path / "run"),
                 f"TFRecords {str(path)!r}: labels must be class indices >= 0, got -5")
    assert not (tmp_path / "run").exists()


def test_npy_renamed_npz_says_what_the_file_is(data, tmp_path, capfd):
    """Was: "'numpy.ndarray' object does not support the context manager protocol"."""
    path = data / "npy_renamed.npz"
    assert_error(cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run"),
                 f"{str(path)!r} is a single .npy array (numpy.save), not an .npz archive; expected "
                 "an .npz archive with x_train, y_train, x_test, y_test (as numpy.savez writes)")


def test_random_bytes_npz_says_what_the_file_is(data, tmp_path, capfd):
    """Was: numpy's advice to load pickled data with allow_pickle=True."""
    path = data / "random.npz"
    assert_error(cli(capfd, *TRAIN, "--dataset", path, "--out", tmp_path / "run"),
                 f"{str(path)!r} is not an .npz archive (it starts with bytes 07 08 09 0a, not a zip "
                 "header); expected an .npz archive with x_train, y_train, x_test, y_test (as "
                 "numpy.savez writes)")


# -- row 4: an impossible class count -------------------------------------------------------

def test_impossible_num_classes_is_refused_before_building(tmp_path, capfd, dataset_cache,
                                                           memory_16_gib):
    """Was: ResourceExhaustedError traceback while Keras built the output layer."""
    proc = cli(capfd, *TRAIN, "--dataset", "mnist1d", "--num-classes", "50000001",
               "--out", tmp_path / "run")
    assert_error(proc, "--num-classes 50000001 (given, or the largest label + 1) needs an output "
                       "layer of 257 x 50000001 float32 weights = 191.5 GiB with gradients and "
                       "optimizer state, more than this machine's 16.0 GiB of memory; expected at "
                       "most 4,177,983 classes for this model")
    assert not (tmp_path / "run").exists()


def test_a_label_that_large_is_refused_too(tmp_path, capfd, memory_16_gib):
    """Streamed TFRecords infer the class count from the labels: one label 50000000."""
    path = _tfrecords(tmp_path / "big_label.tfrecord", [*range(10)] * 40 + [50_000_000])
    streamed = [a for a in TRAIN if a not in ("--train-size", "256", "--val-size", "64")]
    assert_error(cli(capfd, *streamed, "--dataset", path, "--out", tmp_path / "run"),
                 "--num-classes 50000001 (given, or the largest label + 1) needs an output layer of "
                 "257 x 50000001 float32 weights = 191.5 GiB with gradients and optimizer state, more "
                 "than this machine's 16.0 GiB of memory; expected at most 4,177,983 classes for this "
                 "model")


def test_output_layer_check_names_the_parameter():
    from distbatch.errors import ParameterError
    from distbatch.models import check_output_layer
    check_output_layer(256, 100_001, memory=16 * GIB)  # 100001 classes on an MLP: fine
    with pytest.raises(ParameterError) as e:
        check_output_layer(256, 50_000_001, memory=16 * GIB)
    assert str(e.value).startswith("num_classes 50000001 (given, or the largest label + 1) needs")


# -- row 5: bench ---------------------------------------------------------------------------

def test_bench_baseline_that_is_not_text_is_one_line(data, capfd):
    """Was: UnicodeDecodeError traceback."""
    path = data / "baseline.npz"
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError) as e:
        raw.decode("utf-8")
    bad = e.value.start
    assert_error(cli(capfd, "bench", "--backend", "single", "--baseline", path),
                 f"--baseline {str(path)!r} is not a text file (byte 0x{raw[bad]:02x} at offset {bad} "
                 "is not UTF-8); expected the JSON that `distbatch bench --json` writes")


def test_bench_input_too_large_for_memory_is_refused_before_allocating(capfd, memory_16_gib):
    """Was: numpy's 14 TiB allocation traceback."""
    line = ("--input-shape 100000x100000x3 needs {b} examples x 30,000,000,000 input values per "
            "replica = {gib} GiB (drawn as float64, kept as float32), more than this machine's 16.0 "
            "GiB of memory; use a smaller --input-shape or batch")
    assert_error(cli(capfd, "bench", "--backend", "single", "--input-shape", "100000x100000x3"),
                 line.format(b=64, gib="21,457.7"))
    # a global batch is split over replicas known only once the backend exists: checked there
    assert_error(cli(capfd, "bench", "--backend", "single", "--input-shape", "100000x100000x3",
                     "--global-batch-size", "8"), line.format(b=8, gib="2,682.2"))


# -- row 6: TF_CONFIG -----------------------------------------------------------------------

def _tf_config(workers, index) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


TF_CONFIG_CASES = {
    "index_string": (_tf_config(["localhost:23461", "localhost:23462"], "0"),
                     "TF_CONFIG task index must be a JSON integer such as 0, got '0' (a string)"),
    "index_null": (_tf_config(["localhost:23461", "localhost:23462"], None),
                   "TF_CONFIG task index must be a JSON integer such as 0, got None (missing or null)"),
    "same_worker_other_case": (
        _tf_config(["LocalHost:23461", "localhost:23461"], 0),
        "TF_CONFIG cluster names one worker twice: 'LocalHost:23461' and 'localhost:23461' (host "
        "names ignore case); every task needs its own host:port"),
    "same_ipv6_other_spelling": (
        _tf_config(["[::1]:23461", "[0:0::1]:23461"], 0),
        "TF_CONFIG cluster names one worker twice: '[::1]:23461' and '[0:0::1]:23461' (one "
        "address); every task needs its own host:port"),
}


@pytest.mark.parametrize("case", list(TF_CONFIG_CASES))
def test_tf_config_index_type_and_same_worker_twice(case):
    """Was: "index": "0" reported as out of range; a worker twice waited out --cluster-timeout."""
    from distbatch.backends.strategy import parse_tf_config
    from distbatch.errors import UsageError
    raw, message = TF_CONFIG_CASES[case]
    with pytest.raises(UsageError) as e:
        parse_tf_config(raw)
    assert str(e.value) == message


def test_tf_config_other_ports_and_hosts_still_pass():
    from distbatch.backends.strategy import parse_tf_config
    assert parse_tf_config(_tf_config(["LocalHost:1", "localhost:2"], 1)) == \
        {"workers": ["LocalHost:1", "localhost:2"], "index": 1}


# -- row 7: a closed stdout -----------------------------------------------------------------

DRY_RUN = ["launch", "multiworker", "--workers", "2", "--port", "23456", "--dry-run", "--", "x"]


def test_dry_run_into_a_closed_pipe_exits_quietly(capfd, monkeypatch):
    """Was: BrokenPipeError traceback (`distbatch launch ... --dry-run | head -1`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: the first write fails with EPIPE
    closed = open(write_end, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        proc = cli(capfd, *DRY_RUN)
    finally:
        monkeypatch.undo()
        closed.close()
    assert proc.returncode == 141, proc.stderr  # 128 + SIGPIPE, as a shell reports `cat` there
    assert proc.stderr == ""


# -- row 8: values passed to horovodrun -----------------------------------------------------

def test_hostfile_host_with_shell_characters_is_refused(tmp_path, capfd):
    """Was: horovodrun's own ValueError traceback, exit 1."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost;touch X slots=2\n")
    proc = cli(capfd, "launch", "horovod", "-np", "2", "--hostfile", hostfile,
               "--horovodrun", "/bin/true", "--", "x")
    assert_error(proc, f"--hostfile {str(hostfile)!r} line 1: host must be a host name or IP address "
                       "(letters, digits, '.', '-', '_'), got 'localhost;touch'")
    assert not (Path.cwd() / "X").exists()


@pytest.mark.parametrize("line, got", [
    ("localhost slots=2 extra", "'localhost slots=2 extra'"),      # horovodrun: 'localhost:2 extra'
    ("localhost slots=2.5", "'localhost slots=2.5'"),
    ("localhost slots=\u00b2", "'localhost slots=\u00b2'"),           # '²'.isdigit() is True
])
def test_hostfile_slots_must_be_whole_numbers_alone(tmp_path, capfd, line, got):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(line + "\n")
    proc = cli(capfd, "launch", "horovod", "-np", "2", "--hostfile", hostfile,
               "--horovodrun", "/bin/true", "--", "x")
    assert_error(proc, f"--hostfile {str(hostfile)!r} line 1: expected 'host slots=N' (horovodrun "
                       f"accepts nothing else), got {got}")


@pytest.mark.parametrize("value", ["lo;x", "eth0,", "a" * 16, "eth 0"])
def test_network_interface_must_be_interface_names(capfd, value):
    """Was: horovodrun's own traceback, exit 1."""
    proc = cli(capfd, "launch", "horovod", "-np", "2", "--network-interface", value,
               "--horovodrun", "/bin/true", "--", "x")
    assert_error(proc, "--network-interface must be interface name(s) such as eth0 or eth0,eth1 "
                       f"(letters, digits, '_', '.', '-'; at most 15 each), got {value!r}")


def test_good_network_interfaces_and_hostfile_still_build(tmp_path):
    from distbatch.launch import launcher
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-1.example slots=2\n10.0.0.2 slots=2\n")
    argv = launcher.horovod_command(np=4, hostfile=str(hostfile), network_interface="eth0,bond0.100",
                                    command=["x"], executable="hvd")
    assert argv == ["hvd", "-np", "4", "--hostfile", str(hostfile), "--network-interfaces",
                    "eth0,bond0.100", "x"]


# -- as a user sees them: fresh processes ---------------------------------------------------

@pytest.mark.slow
def test_real_processes_print_one_line_no_warning(data, tmp_path, dataset_cache):
    """The console script's view: Python's default warning filters (no pytest), a multiworker
    backend created before TensorFlow started (TF_CONFIG cases first)."""
    cases = [{"id": k, "argv": [*TRAIN[:2], "multiworker", *TRAIN[3:], "--dataset", "mnist1d",
                                "--out", str(tmp_path / k)], "env": {"TF_CONFIG": raw}}
             for k, (raw, _) in TF_CONFIG_CASES.items()]
    cases += [{"id": name, "argv": [*TRAIN, "--dataset", str(data / f"{name}.npz"),
                                    "--out", str(tmp_path / name)]}
              for name in ("x_0d", "complex", "beyond_float32", "npy_renamed", "random")]
    results = run_cli_cases(cases, tmp_path)
    for k, (_, message) in TF_CONFIG_CASES.items():
        r = results[k]
        assert_error(subprocess.CompletedProcess(k, r["code"], r["stdout"], r["stderr"]), message)
    for name in ("x_0d", "complex", "beyond_float32", "npy_renamed", "random"):
        r = results[name]
        proc = subprocess.CompletedProcess(name, r["code"], r["stdout"], r["stderr"])
        assert "Warning" not in proc.stderr, proc.stderr
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_real_dry_run_into_a_closed_pipe_exits_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([DISTBATCH, *DRY_RUN], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=cli_env())
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
