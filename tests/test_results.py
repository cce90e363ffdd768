"""Result rows: schema, atomic append, CSV header once, resume keys, SIGKILL safety."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from distbatch.measure import results
from distbatch.errors import UsageError
from distbatch.measure.results import (ROW_FIELDS, append_row, done_point_ids, make_point_id, read_rows,
                               sync_csv, validate_row)

REPO = Path(__file__).resolve().parents[1]


def make_row(batch=32, seed=0, **changes):
    row = {f: None for f in ROW_FIELDS}
    row.update(point_id=make_point_id(batch, seed), status="ok", global_batch_size=batch,
               per_replica_batch_size=batch, replicas=1, backend="single", seed=seed, peak_lr=0.1,
               warmup_steps=10, epochs=2, steps=100, train_loss=0.5, train_accuracy=0.9,
               val_loss=0.6, val_accuracy=0.85, generalization_gap=0.05, samples_per_sec=1000.0,
               wall_time_s=3.5, steps_to_target=80, time_to_target_s=2.8, diverged=False,
               b_simple=None)
    row.update(changes)
    return row


def read_csv(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.reader(f))


def test_schema_contains_issue_fields():
    required = """global_batch_size per_replica_batch_size replicas backend seed peak_lr warmup_steps
    epochs steps train_loss train_accuracy val_loss val_accuracy generalization_gap samples_per_sec
    wall_time_s steps_to_target time_to_target_s diverged status b_simple point_id""".split()
    assert set(required) == set(ROW_FIELDS) and len(ROW_FIELDS) == len(set(ROW_FIELDS))
    assert make_point_id(256, 0) == "bs=256/seed=0"


@pytest.mark.parametrize("changes, match", [
    (dict(status="crashed"), "status must be one of ok, diverged, oom, got 'crashed'"),
    (dict(diverged="no"), "diverged must be true or false, got 'no'"),
    (dict(global_batch_size=0), "global_batch_size must be a positive integer, got 0"),
    (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(point_id=""), "point_id must be a non-empty string"),
])
def test_validation_errors(changes, match):
    with pytest.raises(UsageError, match=match):
        validate_row(make_row(**changes))


def test_missing_field_is_named(tmp_path):
    row = make_row()
    del row["val_accuracy"], row["b_simple"]
    with pytest.raises(UsageError, match="lacks field\\(s\\): val_accuracy, b_simple"):
        append_row(tmp_path, row)
    assert not (tmp_path / "results.jsonl").exists()


def test_append_read_roundtrip_numpy_and_nan(tmp_path):
    out = tmp_path / "sweep"  # created on first append
    first = make_row(32, history=[{"epoch": 1, "val_accuracy": 0.5}])
    diverged = make_row(64, status="diverged", diverged=True, train_loss=float("nan"),
                        val_loss=np.float32(np.inf), samples_per_sec=np.float64(123.5),
                        global_batch_size=np.int64(64), steps_to_target=None)
    append_row(out, first)
    append_row(out, diverged)
    rows = read_rows(out)
    assert [r["point_id"] for r in rows] == ["bs=32/seed=0", "bs=64/seed=0"]
    assert rows[0]["history"] == [{"epoch": 1, "val_accuracy": 0.5}]
    assert rows[1]["train_loss"] is None and rows[1]["val_loss"] is None
    assert rows[1]["samples_per_sec"] == 123.5 and rows[1]["global_batch_size"] == 64
    assert done_point_ids(out) == {"bs=32/seed=0", "bs=64/seed=0"}
    # strict JSON on disk: no NaN/Infinity tokens
    for line in (out / "results.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_csv_header_once_and_matches_jsonl(tmp_path):
    for i, batch in enumerate((32, 64, 128)):
        append_row(tmp_path, make_row(batch, optimizer="sgd", history=[{"epoch": 1}]))
    table = read_csv(tmp_path)
    header, body = table[0], table[1:]
    assert header == list(ROW_FIELDS) + ["optimizer"]  # history (a list) stays in jsonl
    assert sum(1 for r in table if r == header) == 1 and len(body) == 3
    col = {name: i for i, name in enumerate(header)}
    assert [r[col["global_batch_size"]] for r in body] == ["32", "64", "128"]
    assert body[0][col["diverged"]] == "false" and body[0][col["b_simple"]] == ""


def test_duplicate_point_is_refused(tmp_path):
    append_row(tmp_path, make_row(32))
    with pytest.raises(UsageError, match="'bs=32/seed=0' is already in"):
        append_row(tmp_path, make_row(32))
    assert len(read_rows(tmp_path)) == 1


def test_crash_between_temp_write_and_replace_keeps_old_files(tmp_path, monkeypatch):
    append_row(tmp_path, make_row(32))
    before = {n: (tmp_path / n).read_bytes() for n in ("results.jsonl", "results.csv")}
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        append_row(tmp_path, make_row(64))
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.jsonl"]
    monkeypatch.setattr(results.os, "replace", real_replace)
    append_row(tmp_path, make_row(64))
    assert done_point_ids(tmp_path) == {"bs=32/seed=0", "bs=64/seed=0"}


def test_kill_between_jsonl_and_csv_is_repaired(tmp_path, monkeypatch):
    append_row(tmp_path, make_row(32))
    real_replace = os.replace

    def replace_jsonl_only(src, dst):
        if str(dst).endswith(".csv"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", replace_jsonl_only)
    with pytest.raises(KeyboardInterrupt):
        append_row(tmp_path, make_row(64))
    monkeypatch.setattr(results.os, "replace", real_replace)
    assert len(read_rows(tmp_path)) == 2 and len(read_csv(tmp_path)) == 1 + 1
    sync_csv(tmp_path)
    assert len(read_csv(tmp_path)) == 1 + 2


def test_read_rows_drops_trailing_partial_line_only(tmp_path):
    good = json.dumps(make_row(32))
    (tmp_path / "results.jsonl").write_text(good + "\n" + good[:40])
    assert len(read_rows(tmp_path)) == 1
    (tmp_path / "results.jsonl").write_text(good[:40] + "\n" + good + "\n")
    with pytest.raises(UsageError, match="results.jsonl:1 is not a JSON object row"):
        read_rows(tmp_path)
    assert read_rows(tmp_path / "nowhere") == [] and done_point_ids(tmp_path / "nowhere") == set()


WRITER = textwrap.dedent("""
    import sys
    from distbatch.measure.results import ROW_FIELDS, append_row, done_point_ids, make_point_id, sync_csv
    out = sys.argv[1]
    sync_csv(out)                      # what `sweep --resume` does first
    done = done_point_ids(out)
    for i in range(1, 100000):
        pid = make_point_id(i, 0)
        if pid in done:
            continue
        row = dict.fromkeys(ROW_FIELDS)
        row.update(point_id=pid, status="ok", global_batch_size=i, per_replica_batch_size=i,
                   replicas=1, backend="single", seed=0, diverged=False, val_accuracy=i / 1e5,
                   history=[{"epoch": e, "val_loss": 1.0 / (e + i)} for e in range(50)])
        append_row(out, row)
""")


def _check_files_consistent(out):
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses
    table = read_csv(out)
    assert table[0] == list(ROW_FIELDS) and table.count(table[0]) == 1
    ids = [r[0] for r in table[1:]]
    jsonl_ids = [r["point_id"] for r in rows]
    # jsonl is renamed first: the CSV equals it or lags it by the last row
    assert ids in (jsonl_ids, jsonl_ids[:-1])
    return jsonl_ids


def test_sigkill_during_appends_loses_and_duplicates_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(0)
    recorded = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
        deadline = time.monotonic() + 30
        while len(read_rows(tmp_path)) < recorded + 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.01)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids = _check_files_consistent(tmp_path)
        assert len(ids) >= recorded + 8
        recorded = len(ids)
        # a resumed writer repairs the CSV and continues without gaps or repeats
        assert ids == [make_point_id(i, 0) for i in range(1, len(ids) + 1)]
    sync_csv(tmp_path)
    assert [r[0] for r in read_csv(tmp_path)[1:]] == [r["point_id"] for r in read_rows(tmp_path)]
