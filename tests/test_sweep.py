"""`distbatch sweep` end to end: rows, a diverged point that does not stop the
sweep, --resume without duplicates, refusal of a used directory, and the
report rebuilt from rows alone."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

SWEEP = ["sweep", "--model", "mlp", "--train-size", "1100", "--val-size", "64",
         "--batch-sizes", "16,1024", "--steps", "8", "--base-lr", "0.5", "--base-batch-size", "16",
         "--warmup", "none", "--decay", "constant", "--evals-per-epoch", "1"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, dataset_cache):
    out = tmp_path_factory.mktemp("sweep") / "s"
    proc = run_cli([*SWEEP, "--out", str(out)])
    return out, proc


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_row_per_point_and_diverged_point_recorded(sweep_dir):
    out, proc = sweep_dir
    got = {r["global_batch_size"]: r for r in rows(out)}
    assert sorted(got) == [16, 1024]
    assert got[16]["status"] == "ok" and got[16]["diverged"] is False
    # lr 0.5 * 1024/16 = 32 without warmup: the loss goes non-finite; the sweep went on.
    assert got[1024]["status"] == "diverged" and got[1024]["diverged"] is True
    assert got[16]["peak_lr"] == pytest.approx(0.5)
    assert got[1024]["peak_lr"] == pytest.approx(32.0)
    assert got[16]["steps"] == 8 and got[16]["per_replica_batch_size"] == 16
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("point_id,")
    assert "report at" in proc.stderr


@pytest.mark.slow
def test_report_and_hparams_written(sweep_dir):
    out, _ = sweep_dir
    text = (out / "report.md").read_text()
    assert "| 16 |" in text and "| 1024 |" in text
    for png in ("accuracy_gap.png", "throughput.png", "frontier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "HParams config missing"
    assert list((out / "tensorboard" / "bs16_seed0").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_skips_finished_points(sweep_dir):
    out, _ = sweep_dir
    before = (out / "results.jsonl").read_text()
    proc = run_cli([*SWEEP, "--out", str(out), "--resume"])
    assert "2 already done" in proc.stderr
    assert (out / "results.jsonl").read_text() == before


@pytest.mark.slow
def test_used_directory_is_refused(sweep_dir):
    out, _ = sweep_dir
    proc = run_cli([*SWEEP, "--out", str(out)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distbatch: error: --out {str(out)!r} already holds a run (results.jsonl, config.json); "
        "pass --resume to continue it or --overwrite to replace it"]


@pytest.mark.slow
def test_report_rebuilt_from_rows_alone(sweep_dir, tmp_path):
    out, _ = sweep_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.jsonl").write_text((out / "results.jsonl").read_text())
    run_cli(["report", str(copy)])
    assert (copy / "report.md").read_text().split("## Results")[1].split("## Why")[0] == \
        (out / "report.md").read_text().split("## Results")[1].split("## Why")[0]


@pytest.mark.slow
def test_bad_batch_list_is_one_line(tmp_path):
    proc = run_cli(["sweep", "--batch-sizes", "16,abc", "--out", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distbatch: error: --batch-sizes must be comma-separated integers, got '16,abc'"
    assert not (tmp_path / "x").exists()
