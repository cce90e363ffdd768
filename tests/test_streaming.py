"""distbatch.data.files: streaming TFRecords, sharded by file or by element.

Workers are simulated by calling train_dataset/eval_dataset with worker_index
0..W-1; every example carries an integer id, so coverage is checked exactly.
"""
import math

import numpy as np
import pytest

from distbatch.data import FileSource, files, tfrecord_source
from distbatch.errors import UsageError
from distbatch.training.plan import BatchPlan

tf = pytest.importorskip("tensorflow")


def _write(tmp_path, sizes, *, prefix="part", start=0, weights=False):
    """Files prefix-000.tfrecord, ... with consecutive ids; returns the glob."""
    next_id = start
    for f, n in enumerate(sizes):
        with tf.io.TFRecordWriter(str(tmp_path / f"{prefix}-{f:03d}.tfrecord")) as w:
            for _ in range(n):
                feats = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[next_id]))}
                if weights:
                    feats["w"] = tf.train.Feature(float_list=tf.train.FloatList(value=[next_id % 2]))
                w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
                next_id += 1
    return str(tmp_path / f"{prefix}-*.tfrecord")


def parse(serialized):
    i = tf.io.parse_single_example(serialized, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"]
    return {"v": tf.stack([tf.cast(i, tf.float32), 1.0])}, i


def parse_weighted(serialized):
    ex = tf.io.parse_single_example(serialized, {"id": tf.io.FixedLenFeature([], tf.int64),
                                                 "w": tf.io.FixedLenFeature([], tf.float32)})
    return tf.cast(ex["id"], tf.float32), ex["id"], ex["w"]


def _plan(source, W, L, B, K=1):
    return BatchPlan.derive(global_batch_size=B, replicas=W * L, accumulation_steps=K,
                            num_train_examples=source.num_examples(W))


def _train(source, plan, W, L, *, seed=0, start=0, total=None):
    """[worker][element] -> (ids, weights) of every element."""
    total = plan.steps_per_epoch if total is None else total
    out = []
    for w in range(W):
        ds = source.train_dataset(plan, seed=seed, worker_index=w, num_workers=W, local_replicas=L,
                                  start_step=start, total_steps=total)
        out.append([(y.numpy().tolist(), sw.numpy().tolist()) for _, y, sw in ds])
    return out


def _epoch_ids(per_worker, plan, L, epoch):
    S = plan.steps_per_epoch
    return [i for elements in per_worker for ids, _ in elements[epoch * S * L:(epoch + 1) * S * L]
            for i in ids]


@pytest.mark.parametrize("sizes,W,L,B,K,mode", [
    ([12, 12, 12, 12], 2, 2, 8, 1, "file"),      # 4 files, 2 workers: by file
    ([12, 12, 12, 12], 2, 1, 16, 2, "file"),     # with accumulation
    ([30], 2, 1, 10, 1, "element"),              # 1 file, 2 workers: by element
    ([7, 8], 3, 1, 6, 1, "element"),             # fewer files than workers
])
def test_every_example_once_per_epoch_across_workers(tmp_path, sizes, W, L, B, K, mode):
    source = files(_write(tmp_path, sizes), parse, shuffle_buffer=16)
    assert isinstance(source, FileSource) and source.sharding(W) == mode
    plan = _plan(source, W, L, B, K)
    n = sum(sizes) // W * W if mode == "element" else sum(sizes)
    assert plan.num_train_examples == n and plan.steps_per_epoch == n // B
    out = _train(source, plan, W, L, total=2 * plan.steps_per_epoch)
    assert all(len(e) == 2 * plan.steps_per_epoch * L for e in out)
    assert all(len(ids) == K * plan.per_replica_batch_size for e in out for ids, _ in e)
    assert all(sw == [1.0] * len(sw) for e in out for _, sw in e)
    first, second = (_epoch_ids(out, plan, L, e) for e in (0, 1))
    used = plan.steps_per_epoch * B
    for ids in (first, second):
        assert len(ids) == len(set(ids)) == used and set(ids) <= set(range(sum(sizes)))
    if used == sum(sizes):
        assert set(first) == set(range(sum(sizes)))
    assert first != second  # a new shuffle each epoch


def test_file_sharding_is_round_robin_by_sorted_index(tmp_path):
    source = files(_write(tmp_path, [3, 3, 3, 3, 3]), parse, shuffle_buffer=0, shuffle_files=False)
    assert source.worker_counts(2) == [9, 6]  # files 0,2,4 and 1,3
    plan = _plan(source, 2, 1, 2)
    out = _train(source, plan, 2, 1)
    assert sorted(i for ids, _ in out[1] for i in ids) == [3, 4, 5, 9, 10, 11]


def test_uneven_files_give_every_worker_the_same_steps(tmp_path):
    sizes = [5, 9, 3, 7]  # worker 0: files 0, 2 (8 examples); worker 1: files 1, 3 (16)
    source = files(_write(tmp_path, sizes), parse, shuffle_buffer=4)
    assert source.worker_counts(2) == [8, 16] and source.num_examples(2) == 16
    plan = _plan(source, 2, 1, 4)
    out = _train(source, plan, 2, 1, total=3 * plan.steps_per_epoch)
    assert len(out[0]) == len(out[1]) == 3 * plan.steps_per_epoch == 12
    w0 = {0, 1, 2, 3, 4, 14, 15, 16}
    for e in range(3):
        ids = _epoch_ids(out, plan, 1, e)
        assert len(ids) == len(set(ids)) == 16
        assert w0 <= set(ids)  # the small shard is used whole; the big one loses 8 a epoch


def test_resumed_order_equals_uninterrupted(tmp_path):
    source = files(_write(tmp_path, [10, 11, 9, 10]), parse, shuffle_buffer=8)
    plan = _plan(source, 2, 2, 8)
    S, total = plan.steps_per_epoch, 3 * plan.steps_per_epoch + 1
    whole = _train(source, plan, 2, 2, seed=5, total=total)
    for start in (2, S, S + 3, total):
        resumed = _train(source, plan, 2, 2, seed=5, start=start, total=total)
        assert [e[start * 2:] for e in whole] == resumed


def test_seeded_order_repeats_and_seeds_differ(tmp_path):
    source = files(_write(tmp_path, [20, 20]), parse, shuffle_buffer=10)
    plan = _plan(source, 1, 1, 4)
    a, b = _train(source, plan, 1, 1, seed=1), _train(source, plan, 1, 1, seed=1)
    again = _train(files(_write(tmp_path, [20, 20]), parse, shuffle_buffer=10), plan, 1, 1, seed=1)
    assert a == b == again
    assert a != _train(source, plan, 1, 1, seed=2)


def test_no_shuffle_is_the_interleaved_file_order(tmp_path):
    source = files(_write(tmp_path, [3, 3]), parse, shuffle_buffer=0, shuffle_files=False)
    out = _train(source, _plan(source, 1, 1, 2), 1, 1)
    assert [i for ids, _ in out[0] for i in ids] == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("sizes,W,L", [([5, 9, 3, 7], 2, 2), ([23], 3, 1), ([4, 0, 6], 3, 2)])
def test_eval_covers_every_example_once_with_masks(tmp_path, sizes, W, L):
    source = files(_write(tmp_path, sizes), parse)
    plan = BatchPlan.derive(global_batch_size=W * L, replicas=W * L, num_train_examples=100)
    seen, ns = [], set()
    for w in range(W):
        ds, n = source.eval_dataset(plan, worker_index=w, num_workers=W, local_replicas=L)
        elements = list(ds)
        ns.add(n)
        assert len(elements) == n * L
        assert len({int(y.shape[0]) for _, y, _, _ in elements}) == 1  # one fixed batch size
        for x, y, sw, mask in elements:
            m = mask.numpy()
            assert set(m.tolist()) <= {0.0, 1.0} and np.all(sw.numpy() == m)
            assert np.all(x["v"].numpy()[m == 0] == 0)
            seen += y.numpy()[m == 1].tolist()
    assert len(ns) == 1  # the same number of batches on every worker
    assert sorted(seen) == list(range(sum(sizes)))


def test_sample_weights_from_parse_fn(tmp_path):
    source = files(_write(tmp_path, [8, 8], weights=True), parse_weighted, shuffle_buffer=4)
    plan = _plan(source, 2, 1, 4)
    for elements in _train(source, plan, 2, 1):
        for ids, sw in elements:
            assert sw == [float(i % 2) for i in ids]
    ds, n = source.eval_dataset(plan, worker_index=0, num_workers=2, local_replicas=1)
    x, y, sw, mask = next(iter(ds))
    assert sw.dtype == tf.float32 and np.all(sw.numpy() == (y.numpy() % 2) * mask.numpy())


def test_given_counts_skip_counting(tmp_path):
    pattern = _write(tmp_path, [6, 6, 6])
    counted = files(pattern, parse)
    assert counted.file_counts() == [6, 6, 6]
    by_list = files(pattern, parse, num_examples=[6, 6, 6])
    by_dict = files(pattern, parse, num_examples=dict(zip(counted.files, [6, 6, 6])))
    by_total = files(pattern, parse, num_examples=18)  # fixed-size records: split by bytes is exact
    from distbatch.data.files import _is_tfrecord_reader  # counted by frame headers
    assert _is_tfrecord_reader(None) and _is_tfrecord_reader(tf.data.TFRecordDataset)
    assert not _is_tfrecord_reader(tf.data.TextLineDataset)
    for s in (by_list, by_dict, by_total):
        s._count_records = None  # would fail if called
        assert s.file_counts() == [6, 6, 6] and s.num_examples(2) == counted.num_examples(2) == 12
    ds, n = by_total.eval_dataset(_plan(counted, 2, 1, 4), worker_index=1, num_workers=2, local_replicas=1)
    assert n == 1 and sum(float(m.numpy().sum()) for *_, m in ds) == 9  # exact by element


def test_a_wrong_count_never_ends_a_worker_early(tmp_path):
    source = files(_write(tmp_path, [4, 4]), parse, num_examples=20)  # claims 20, holds 8
    plan = _plan(source, 2, 1, 4)
    out = _train(source, plan, 2, 1, total=plan.steps_per_epoch)
    assert len(out[0]) == len(out[1]) == plan.steps_per_epoch  # wraps, does not stop


def test_bad_inputs_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError) as e:
        files(str(tmp_path / "nothing-*.tfrecord"), parse)
    assert "nothing-*.tfrecord" in str(e.value) and "\n" not in str(e.value)
    pattern = _write(tmp_path, [4])
    with pytest.raises(UsageError, match="no file matches .*missing"):
        files([pattern, str(tmp_path / "missing")], parse)
    with pytest.raises(UsageError, match="shuffle_buffer"):
        files(pattern, parse, shuffle_buffer=-1)
    with pytest.raises(UsageError, match="num_examples"):
        files(pattern, parse, num_examples=[1, 2])
    source = files(pattern, lambda s: s)
    plan = BatchPlan.derive(global_batch_size=2, replicas=1, num_train_examples=4)
    with pytest.raises(UsageError, match="parse_fn must return .*got one tensor"):
        source.train_dataset(plan, seed=0, worker_index=0, num_workers=1, local_replicas=1,
                             start_step=0, total_steps=1)
    big = BatchPlan.derive(global_batch_size=2, replicas=1, num_train_examples=40)
    with pytest.raises(UsageError, match="num_examples"):
        files(pattern, parse).train_dataset(big, seed=0, worker_index=0, num_workers=1,
                                            local_replicas=1, start_step=0, total_steps=1)
    (tmp_path / "cut.tfrecord").write_bytes((tmp_path / "part-000.tfrecord").read_bytes()[:-3])
    with pytest.raises(UsageError, match="truncated"):
        files(str(tmp_path / "cut.tfrecord"), parse).num_examples(1)


# ------------------------------------------------------------- tfrecord_source

def _write_examples(path, ids, shape=(2, 3)):
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in ids:
            feats = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[float(i)] * math.prod(shape))),
                     "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 4])),
                     "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(shape)))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def _all_eval_x(source, W=1):
    plan = BatchPlan.derive(global_batch_size=W, replicas=W, num_train_examples=1000)
    out = []
    for w in range(W):
        ds, _ = source.eval_dataset(plan, worker_index=w, num_workers=W, local_replicas=1)
        for x, y, sw, m in ds:
            keep = m.numpy() == 1
            out += x.numpy()[keep][:, 0, 0].astype(int).tolist()
            assert np.all(y.numpy()[keep] == x.numpy()[keep][:, 0, 0].astype(int) % 4)
    return sorted(out)


def test_tfrecord_source_holds_out_a_seeded_split(tmp_path):
    for f in range(3):
        _write_examples(tmp_path / f"d-{f}.tfrecord", range(f * 40, f * 40 + 40))
    train, val, shape, classes = tfrecord_source(str(tmp_path / "d-*.tfrecord"), seed=3)
    assert shape == (2, 3) and classes == 4
    tr, va = _all_eval_x(train, 2), _all_eval_x(val, 2)
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(120))
    assert 10 <= len(va) <= 40  # about 20%
    assert train.num_examples(1) == len(tr) and val.num_examples(1) == len(va)
    plan = _plan(train, 1, 1, 8)
    seen = [i for ids, _ in _train(train, plan, 1, 1)[0] for i in ids]
    assert set(seen) <= {i % 4 for i in tr}
    again = tfrecord_source(str(tmp_path / "d-*.tfrecord"), seed=3)
    assert _all_eval_x(again[1]) == va
    assert _all_eval_x(tfrecord_source(str(tmp_path / "d-*.tfrecord"), seed=4)[1]) != va


def test_tfrecord_source_val_path_shape_and_classes(tmp_path):
    _write_examples(tmp_path / "train.tfrecord", range(20), shape=(6,))
    _write_examples(tmp_path / "val.tfrecord", range(100, 105), shape=(6,))
    train, val, shape, classes = tfrecord_source(str(tmp_path / "train.tfrecord"), shape="3x2",
                                                 val_path=str(tmp_path / "val.tfrecord"), num_classes=7)
    assert shape == (3, 2) and classes == 7
    assert _all_eval_x(val) == list(range(100, 105)) and train.num_examples(2) == 20
    with pytest.raises(UsageError, match="needs 8 values"):
        tfrecord_source(str(tmp_path / "train.tfrecord"), shape=(2, 4))
    with pytest.raises(UsageError, match="unknown option"):
        tfrecord_source(str(tmp_path / "train.tfrecord"), shufle_buffer=3)


def test_memory_benchmark_smoke(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "streaming_memory.py"
    spec = importlib.util.spec_from_file_location("streaming_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--gb", "0.002", "--files", "3", "--features", "64", "--global-batch-size", "32",
                       "--shuffle-buffer", "100", "--dir", str(tmp_path / "set"), "--rows", str(rows)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row == json.loads(rows.read_text())
    assert row["steps"] == row["steps_per_epoch"] == row["records"] // 32 and row["examples"] == 32 * row["steps"]
    assert row["peak_rss_growth_mb"] >= 0 and not (tmp_path / "set").exists()  # deleted without --keep


def test_compressed_files_and_another_reader(tmp_path):
    with tf.io.TFRecordWriter(str(tmp_path / "z.tfrecord.gz"), options="GZIP") as w:
        for i in range(10):
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))})).SerializeToString())
    source = files(str(tmp_path / "*.gz"), parse, compression="GZIP", shuffle_buffer=4)
    assert source.num_examples(1) == 10
    ids = [i for ids, _ in _train(source, _plan(source, 1, 1, 5), 1, 1)[0] for i in ids]
    assert sorted(ids) == list(range(10))
    (tmp_path / "a.csv").write_text("".join(f"{i}\n" for i in range(7)))
    lines = files(str(tmp_path / "a.csv"), lambda s: (tf.strings.to_number(s), tf.strings.to_number(s, tf.int64)),
                  reader=tf.data.TextLineDataset, shuffle_buffer=0)
    ds, n = lines.eval_dataset(_plan(lines, 1, 1, 7), worker_index=0, num_workers=1, local_replicas=1)
    assert n == 1 and [int(v) for v in next(iter(ds))[1].numpy()] == list(range(7))


@pytest.mark.parametrize("W,L,K", [(1, 2, 1), (2, 1, 1), (2, 2, 2), (4, 1, 1)])
def test_unshuffled_single_file_gives_the_same_global_batches_at_any_layout(tmp_path, W, L, K):
    """Element sharding without shuffling: step t's global batch is records [tB, (t+1)B),
    as on one device, so runs on different layouts can be compared weight for weight."""
    source = files(_write(tmp_path, [32]), parse, shuffle_buffer=0, shuffle_files=False)
    plan = _plan(source, W, L, 8, K)
    out = _train(source, plan, W, L, total=2 * plan.steps_per_epoch)
    for t in range(2 * plan.steps_per_epoch):
        step = sorted(i for e in out for ids, _ in e[t * L:(t + 1) * L] for i in ids)
        assert step == [(8 * t + j) % 32 for j in range(8)]


def test_iterators_run_without_the_autotune_thread_on_every_device(monkeypatch):
    """The train/eval iterators: the pipeline itself and, under MirroredStrategy, each
    per-device dataset inside the multi-device iterator get autotune off (destroying an
    iterator otherwise waits out the model thread's sleep, seconds at the end of a run);
    TensorFlow's function is restored afterwards, and the data is unchanged."""
    import tensorflow as tf
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    from distbatch.backends.strategy import StrategyBackend
    from distbatch.data import inputs
    made = []

    def record(ds):
        out = without(ds)
        made.append(out)
        return out
    without = inputs.without_autotune_thread
    monkeypatch.setattr(inputs, "without_autotune_thread", record)
    before = mdi._create_device_dataset
    backend = StrategyBackend(tf.distribute.MirroredStrategy(["/cpu:0"]))
    it = backend.iterator(lambda w, L: tf.data.Dataset.range(8).batch(2))
    assert mdi._create_device_dataset is before
    assert len(made) == 1 and made[0].options().autotune.enabled is False   # the one device's
    assert next(it).numpy().tolist() == [0, 1] and next(it).numpy().tolist() == [2, 3]
    # a user's own choice stands
    mine = tf.data.Options()
    mine.autotune.enabled = True
    assert without(tf.data.Dataset.range(2).with_options(mine)).options().autotune.enabled is True
