"""Streaming memory: one epoch over >= 1 GB of TFRecords through distbatch.data.files.

Issue 13, item 1 (target: peak resident memory grows by less than 300 MB while a
set larger than that streams). Writes --files TFRecord files of tf.train.Example
records ("x": the float32 features as raw bytes, "y": an int64 label in [0, 10)),
--gb in total, under --dir (default: a new directory in /tmp, deleted afterwards
unless --keep; an existing set of the same size is reused), then:

  default   iterates FileSource.train_dataset (worker 0 of --workers, one local
            replica) over --epochs epochs with a small computation per batch
            (x @ w, summed), the way the Trainer consumes it;
  --fit     trains a tiny Keras classifier through distbatch.fit(data=files(...),
            loss=SparseCategoricalCrossentropy(from_logits=True), epochs=1).

Memory: the peak (VmHWM) is reset through /proc/self/clear_refs after the files are
written and TensorFlow is loaded, so

    peak_rss_growth_mb = (VmHWM at the end - VmRSS before the source is built) / 2**20

covers everything streaming adds: the pipeline, its shuffle buffer (shuffle_buffer
records), prefetching and the per-batch work. The page cache is not resident memory
of the process and is not counted. One JSON row is printed (and appended to --rows).

  .venv/bin/python benchmarks/streaming_memory.py                       # ~1 GB, one epoch
  .venv/bin/python benchmarks/streaming_memory.py --gb 0.05 --fit       # smoke test of --fit
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """VmRSS sampled every 20 ms: a second opinion where clear_refs is not allowed."""

    def __init__(self):
        self.peak_kb, self._stop = status_kb("VmRSS"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, status_kb("VmRSS"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_set(tf, directory: str, *, gb: float, num_files: int, features: int, seed: int) -> int:
    """num_files TFRecord files of gb GiB in total; returns the number of records."""
    record_bytes = features * 4
    per_file = max(1, int(gb * 2**30 / record_bytes / num_files))
    marker = os.path.join(directory, f"SET-{num_files}x{per_file}x{features}")
    if os.path.exists(marker):
        return per_file * num_files
    for old in glob.glob(os.path.join(directory, "part-*.tfrecord")) + glob.glob(os.path.join(directory, "SET-*")):
        os.remove(old)
    rng = np.random.default_rng(seed)
    for f in range(num_files):
        with tf.io.TFRecordWriter(os.path.join(directory, f"part-{f:03d}.tfrecord")) as w:
            for start in range(0, per_file, 1024):  # 1024 records at a time: bounded memory
                n = min(1024, per_file - start)
                x = rng.standard_normal((n, features), dtype=np.float32)
                y = rng.integers(0, 10, n)
                for i in range(n):
                    w.write(tf.train.Example(features=tf.train.Features(feature={
                        "x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[x[i].tobytes()])),
                        "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y[i])]))}))
                        .SerializeToString())
    open(marker, "w").close()
    return per_file * num_files


def make_parse(tf, features: int):
    spec = {"x": tf.io.FixedLenFeature([], tf.string), "y": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        x = tf.reshape(tf.io.decode_raw(ex["x"], tf.float32), [features])
        return x, tf.cast(ex["y"], tf.int32)
    return parse


def iterate(tf, source, args) -> dict:
    from distbatch.training.plan import BatchPlan
    W = args.workers
    plan = BatchPlan.derive(global_batch_size=args.global_batch_size, replicas=W,
                            num_train_examples=source.num_examples(W))
    total = plan.steps_per_epoch * args.epochs
    ds = source.train_dataset(plan, seed=args.seed, worker_index=0, num_workers=W, local_replicas=1,
                              start_step=0, total_steps=total)
    w = tf.constant(np.random.default_rng(0).standard_normal((args.features, 16)), tf.float32)

    @tf.function
    def work(x, y, sw):
        return tf.reduce_sum(tf.matmul(x, w)) + tf.cast(tf.reduce_sum(y), tf.float32) + tf.reduce_sum(sw)

    steps, examples, acc = 0, 0, 0.0
    for x, y, sw in ds:
        acc += float(work(x, y, sw))
        steps += 1
        examples += int(y.shape[0])
    assert steps == total, (steps, total)
    return {"steps": steps, "examples": examples, "steps_per_epoch": plan.steps_per_epoch,
            "checksum": acc}


def fit(tf, source, args) -> dict:
    import keras

    import distbatch
    result = distbatch.fit(
        model_fn=lambda: keras.Sequential([keras.Input((args.features,)), keras.layers.Dense(32, "relu"),
                                           keras.layers.Dense(10)]),
        optimizer_fn=lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        data=source, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], global_batch_size=args.global_batch_size, epochs=1, backend="single")
    history = getattr(result, "history", None)
    loss = history.get("loss", [None])[-1] if isinstance(history, dict) else None
    return {"fit": "done", "final_loss": loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where the set is written (default: a new directory in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--gb", type=float, default=1.0, help="size of the set in GiB (default 1)")
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--features", type=int, default=1024, help="float32 values per record (4 KiB)")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="stream worker 0's share of W workers")
    p.add_argument("--shuffle-buffer", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true", help="train through distbatch.fit instead")
    p.add_argument("--rows", help="append the JSON row to this .jsonl file")
    args = p.parse_args(argv)

    import tensorflow as tf

    from distbatch.data import files
    directory = args.dir or tempfile.mkdtemp(prefix="distbatch-stream-", dir="/tmp")
    os.makedirs(directory, exist_ok=True)
    try:
        t = time.perf_counter()
        records = write_set(tf, directory, gb=args.gb, num_files=args.files, features=args.features,
                            seed=args.seed)
        write_seconds = time.perf_counter() - t
        paths = sorted(glob.glob(os.path.join(directory, "part-*.tfrecord")))
        set_bytes = sum(os.path.getsize(q) for q in paths)
        import gc
        gc.collect()
        reset = reset_peak()
        rss0 = status_kb("VmRSS")
        t = time.perf_counter()
        with PeakSampler() as sampler:
            source = files(os.path.join(directory, "part-*.tfrecord"), make_parse(tf, args.features),
                           shuffle_buffer=args.shuffle_buffer)
            out = fit(tf, source, args) if args.fit else iterate(tf, source, args)
        seconds = time.perf_counter() - t
        peak = max(status_kb("VmHWM") if reset else 0, sampler.peak_kb)
        row = {
            "benchmark": "streaming_memory", "mode": "fit" if args.fit else "iterate",
            "files": len(paths), "records": records, "set_bytes": set_bytes,
            "bytes_read": int(set_bytes * out.get("examples", records) / records) if not args.fit else set_bytes,
            **out, "seconds": round(seconds, 2),
            "MB_per_s": round(set_bytes * args.epochs / 2**20 / seconds, 1) if not args.fit else None,
            "rss_before_mb": round(rss0 / 1024, 1), "rss_after_mb": round(status_kb("VmRSS") / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1), "peak_rss_growth_mb": round((peak - rss0) / 1024, 1),
            "peak_from": "VmHWM after clear_refs" if reset else "VmRSS sampled every 20 ms",
            "shuffle_buffer": args.shuffle_buffer, "global_batch_size": args.global_batch_size,
            "workers": args.workers, "write_seconds": round(write_seconds, 1),
            "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
                       f"tensorflow {tf.__version__}",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    line = json.dumps(row)
    print(line)
    if args.rows:
        with open(args.rows, "a") as f:  # one write of one line: appended whole
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
