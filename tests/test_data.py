"""Loaders on small real-format files made here; every error path. No downloads."""

import os
import random

import numpy as np
import pytest

from distbatch.data import datasets as data
from distbatch.data.datasets import ArrayDataset, load_dataset
from distbatch.errors import UsageError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTBATCH_CACHE_DIR", str(tmp_path / "cache"))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _good_arrays(n_train=12, n_val=4, shape=(3, 2)):
    rng = np.random.default_rng(0)
    return dict(x_train=rng.random((n_train, *shape)), y_train=np.arange(n_train) % 3,
                x_test=rng.random((n_val, *shape)), y_test=np.arange(n_val) % 3)


# ------------------------------------------------------------------ mnist1d

def test_mnist1d_is_deterministic_standardized_and_cached(tmp_path):
    a = load_dataset("mnist1d", seed=3, train_size=300, val_size=60)
    assert isinstance(a, ArrayDataset)
    assert a.x_train.shape == (300, 40) and a.x_val.shape == (60, 40) and a.input_shape == (40,)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32 and a.num_classes == 10
    # standardized with the train statistics
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-5
    assert set(np.unique(a.y_train)) == set(range(10))
    cached = list((tmp_path / "cache").glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".*tmp"))
    b = load_dataset("mnist1d", seed=3, train_size=300, val_size=60)  # from the cache
    c = load_dataset("mnist1d", seed=3, train_size=300, val_size=60, cache=False)  # regenerated
    for other in (b, c):
        np.testing.assert_array_equal(a.x_train, other.x_train)
        np.testing.assert_array_equal(a.y_val, other.y_val)
    d = load_dataset("mnist1d", seed=4, train_size=300, val_size=60, cache=False)
    assert not np.array_equal(a.x_train, d.x_train)


def test_mnist1d_leaves_global_rng_alone():
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    load_dataset("mnist1d", seed=0, train_size=50, val_size=10, cache=False)
    assert (np.random.random(), random.random()) == expected


def test_mnist1d_damaged_cache_is_regenerated(tmp_path):
    a = load_dataset("mnist1d", seed=1, train_size=40, val_size=10)
    (cached,) = (tmp_path / "cache").glob("mnist1d-*.npz")
    cached.write_bytes(b"garbage")
    b = load_dataset("mnist1d", seed=1, train_size=40, val_size=10)
    np.testing.assert_array_equal(a.x_train, b.x_train)


# ----------------------------------------------------------- digits, synthetic

def test_digits_split_by_seed():
    a = load_dataset("digits", seed=0)
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    assert a.train_size + a.val_size == 1797 and a.val_size == round(1797 * 0.2)
    assert 0.0 <= a.x_train.min() and a.x_train.max() == 1.0
    b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.y_val, c.y_val)
    small = load_dataset("digits", seed=0, train_size=100, val_size=30)
    assert (small.train_size, small.val_size) == (100, 30)


def test_synthetic_shapes_and_options():
    a = load_dataset("synthetic:8x4x2", train_size=16, val_size=8, num_classes=5)
    assert a.input_shape == (8, 4, 2) and a.num_classes == 5
    assert a.y_train.max() < 5 and a.x_train.dtype == np.float32
    b = load_dataset("synthetic", shape=(6,), train_size=16, val_size=8)
    assert b.input_shape == (6,) and b.num_classes == 10
    with pytest.raises(UsageError, match="8xbad"):
        load_dataset("synthetic:8xbad")


# ----------------------------------------------------------------------- npz

def test_npz_roundtrip_and_uint8_scaling(tmp_path):
    arrays = _good_arrays()
    ds = load_dataset(_npz(tmp_path / "d.npz", **arrays))
    np.testing.assert_allclose(ds.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_val, arrays["y_test"])
    assert ds.num_classes == 3 and ds.input_shape == (3, 2)
    u8 = dict(arrays, x_train=np.full((12, 3, 2), 255, np.uint8), x_test=np.zeros((4, 3, 2), np.uint8),
              y_train=arrays["y_train"].reshape(-1, 1))
    ds = load_dataset(_npz(tmp_path / "u8.npz", **u8), num_classes=7)
    assert ds.x_train.max() == 1.0 and ds.y_train.shape == (12,) and ds.num_classes == 7


@pytest.mark.parametrize("change, match", [
    (dict(y_train=np.arange(11) % 3), "x_train has 12 examples but y_train has 11"),
    (dict(x_test=np.zeros((4, 5))), r"train inputs have shape \(3, 2\) but val inputs \(5,\)"),
    (dict(y_test=np.array([0, 1, -1, 2])), r"y_val labels span \[-1, 2\]"),
    (dict(x_train=np.full((12, 3, 2), np.nan)), "x_train has 72 NaN/inf"),
    (dict(x_test=np.zeros((0, 3, 2)), y_test=np.zeros((0,), int)), "the val set is empty"),
    (dict(y_train=np.zeros((12, 3))), r"y_train must be class indices of shape \(n,\), got \(12, 3\)"),
    (dict(y_train=np.full(12, 0.5)), "integer class labels, got dtype float64"),
])
def test_npz_bad_contents(tmp_path, change, match):
    with pytest.raises(UsageError, match=match):
        load_dataset(_npz(tmp_path / "bad.npz", **dict(_good_arrays(), **change)))


def test_npz_labels_beyond_num_classes(tmp_path):
    path = _npz(tmp_path / "d.npz", **_good_arrays())
    with pytest.raises(UsageError, match=r"y_train labels span \[0, 2\], expected values in \[0, 2\)"):
        load_dataset(path, num_classes=2)


def test_npz_missing_keys_and_corrupt_file(tmp_path):
    arrays = _good_arrays()
    del arrays["y_test"]
    with pytest.raises(UsageError, match="lacks array.*y_test"):
        load_dataset(_npz(tmp_path / "m.npz", **arrays))
    corrupt = tmp_path / "c.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UsageError, match="cannot read .*c.npz"):
        load_dataset(str(corrupt))


def test_size_too_large(tmp_path):
    with pytest.raises(UsageError, match="train_size=50 exceeds the 12 examples"):
        load_dataset(_npz(tmp_path / "d.npz", **_good_arrays()), train_size=50)


# ---------------------------------------------------------- names and paths

@pytest.mark.parametrize("spec, kwargs, match", [
    ("imagenet", {}, "unknown dataset 'imagenet'; expected one of mnist1d, digits"),
    ("missing/dir", {}, "dataset path not found: 'missing/dir'"),
    ("nothing.npz", {}, "dataset path not found: 'nothing.npz'"),
    ("nothing-*.tfrecord", {}, "no TFRecord file matches 'nothing-\\*.tfrecord'"),
    ("", {}, "dataset must be a name or a path"),
    ("digits", {"train_size": 0}, "train_size must be a positive integer, got 0"),
    ("digits", {"val_fraction": 1.5}, r"val_fraction must be a number in \(0, 1\), got 1.5"),
    ("mnist1d", {"image_size": 3}, "unknown option.*image_size.*for dataset 'mnist1d'"),
])
def test_bad_names_and_arguments(spec, kwargs, match):
    with pytest.raises(UsageError, match=match):
        load_dataset(spec, **kwargs)


def test_other_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(UsageError, match="is not .npz, .tfrecord or .tfrecords"):
        load_dataset(str(path))


def test_keras_download_failure_is_a_usage_error(monkeypatch):
    import keras

    def offline(**kwargs):
        raise OSError("URL fetch failure on https://example: [Errno -3]\nTemporary failure")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(UsageError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    assert "\n" not in message and "'cifar10'" in message and "~/.keras/datasets/" in message


def test_keras_loader_shapes_and_scaling(monkeypatch):
    import keras

    def fake(**kwargs):
        x = np.full((6, 28, 28), 255, np.uint8)
        return (x, np.arange(6) % 10), (x[:2], np.array([0, 9]))

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", fake)
    ds = load_dataset("fashion_mnist", train_size=4)
    assert ds.input_shape == (28, 28, 1) and ds.x_train.max() == 1.0
    assert ds.train_size == 4 and ds.num_classes == 10


# ----------------------------------------------------------------- image dir

def _image_dir(root, per_class=5):
    from PIL import Image

    colors = {"cat": (250, 0, 0), "dog": (0, 0, 250)}
    for name, rgb in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (6, 5), rgb).save(root / name / f"{i}.png")
    return root


def test_image_directory(tmp_path):
    root = _image_dir(tmp_path / "imgs")
    ds = load_dataset(str(root), seed=0, image_size=(4, 4), val_fraction=0.2)
    assert ds.input_shape == (4, 4, 3) and ds.num_classes == 2
    assert ds.train_size + ds.val_size == 10 and ds.val_size == 2
    # classes are folders in alphabetical order: cat=0 is red, dog=1 is blue
    x = np.concatenate([ds.x_train, ds.x_val])
    y = np.concatenate([ds.y_train, ds.y_val])
    np.testing.assert_allclose(x[y == 0][:, 0, 0], [[250 / 255, 0, 0]] * 5, atol=1e-6)
    np.testing.assert_allclose(x[y == 1][:, 0, 0], [[0, 0, 250 / 255]] * 5, atol=1e-6)
    again = load_dataset(str(root), seed=0, image_size=(4, 4), val_fraction=0.2)
    np.testing.assert_array_equal(ds.y_val, again.y_val)


def test_image_directory_without_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="empty"):
        load_dataset(str(tmp_path / "empty"))


# ------------------------------------------------------------------ TFRecord

def _write_tfrecord(path, xs, ys, shape=None):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for x, y in zip(xs, ys):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(x))),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))}
            if shape is not None:
                feature["shape"] = tf.train.Feature(int64_list=tf.train.Int64List(value=shape))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_tfrecords_with_shape_feature_and_glob(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((10, 2, 3)).astype(np.float32)
    y = np.arange(10) % 4
    _write_tfrecord(tmp_path / "a-0.tfrecord", x[:6], y[:6], shape=[2, 3])
    _write_tfrecord(tmp_path / "a-1.tfrecord", x[6:], y[6:], shape=[2, 3])
    ds = load_dataset(str(tmp_path / "a-*.tfrecord"), seed=0, val_fraction=0.3)
    assert ds.input_shape == (2, 3) and ds.num_classes == 4 and ds.val_size == 3
    got = np.concatenate([ds.x_train, ds.x_val])
    labels = np.concatenate([ds.y_train, ds.y_val])
    order = np.argsort(got[:, 0, 0])
    np.testing.assert_array_equal(got[order], x[np.argsort(x[:, 0, 0])])
    np.testing.assert_array_equal(labels[order], y[np.argsort(x[:, 0, 0])])


def test_tfrecords_shape_option_and_val_path(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    _write_tfrecord(tmp_path / "train.tfrecords", x[:4], [0, 1, 0, 1])
    _write_tfrecord(tmp_path / "val.tfrecords", x[4:], [1, 0])
    ds = load_dataset(str(tmp_path / "train.tfrecords"), shape=(2, 2),
                      val_path=str(tmp_path / "val.tfrecords"))
    assert ds.input_shape == (2, 2) and (ds.train_size, ds.val_size) == (4, 2)
    np.testing.assert_array_equal(ds.x_val.reshape(2, 4), x[4:])
    np.testing.assert_array_equal(ds.y_val, [1, 0])
    flat = load_dataset(str(tmp_path / "train.tfrecords"), val_path=str(tmp_path / "val.tfrecords"))
    assert flat.input_shape == (4,)
    with pytest.raises(UsageError, match=r"shape \(3, 3\) needs 9 values per record, got 4"):
        load_dataset(str(tmp_path / "train.tfrecords"), shape="3x3",
                     val_path=str(tmp_path / "val.tfrecords"))


def test_tfrecords_ragged_and_corrupt(tmp_path):
    _write_tfrecord(tmp_path / "r.tfrecord", [np.zeros(3), np.zeros(4)], [0, 1])
    with pytest.raises(UsageError, match="feature 'x' has per-record lengths \\[3, 4\\]"):
        load_dataset(str(tmp_path / "r.tfrecord"))
    (tmp_path / "c.tfrecord").write_bytes(os.urandom(64))
    with pytest.raises(UsageError, match="cannot read TFRecords"):
        load_dataset(str(tmp_path / "c.tfrecord"))


def test_cache_dir_env(tmp_path):
    assert data.cache_dir() == tmp_path / "cache"
