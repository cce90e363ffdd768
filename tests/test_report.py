"""Report rebuilt from synthetic rows: table numbers, the recommendation, PNGs, CLI.
(Several scaling rules in one report: tests/test_sweep_answer.py.)"""

import argparse
import os

import numpy as np
import pytest

from distbatch.errors import UsageError
from distbatch.cli.report import add_report_parser
from distbatch.measure.recommend import choose_from_sweep
from distbatch.measure.report import build_report, recommendation_lines, summarize, table_lines
from distbatch.measure.results import ROW_FIELDS, append_row, make_point_id

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (batch, seed) -> (val_acc, train_acc, samples/s, steps_to_target, time_to_target)
MEASURED = {
    (32, 0): (0.90, 0.95, 1000.0, 800, 40.0),
    (32, 1): (0.92, 0.96, 1100.0, 900, 44.0),
    (128, 0): (0.905, 0.93, 3000.0, 220, 12.0),
    (128, 1): (0.915, 0.92, 3400.0, 260, 14.0),
    (512, 0): (0.80, 0.81, 9000.0, None, None),
}


def make_rows(history=True):
    rows = []
    for (batch, seed), (val, train, sps, steps, ttt) in MEASURED.items():
        row = dict.fromkeys(ROW_FIELDS)
        row.update(point_id=make_point_id(batch, seed), status="ok", global_batch_size=batch,
                   per_replica_batch_size=batch, replicas=1, backend="single", seed=seed,
                   val_accuracy=val, train_accuracy=train, generalization_gap=train - val,
                   samples_per_sec=sps, steps_to_target=steps, time_to_target_s=ttt,
                   diverged=False, b_simple=150.0 + seed)
        if history:
            row["history"] = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e,
                               "train_accuracy": train * e / 3, "val_accuracy": val * e / 3}
                              for e in (1, 2, 3)]
        rows.append(row)
    diverged = dict(rows[-1], point_id=make_point_id(512, 1), seed=1, status="diverged",
                    diverged=True, val_accuracy=0.1, train_loss=None, samples_per_sec=1.0)
    return rows + [diverged]


def cell(mean, std, digits):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_table_numbers_match_hand_computation():
    lines = table_lines(summarize(make_rows()))
    by_batch = {int(line.split("|")[1]): line for line in lines[2:]}
    assert sorted(by_batch) == [32, 128, 512]
    for batch in (32, 128):
        vals = [MEASURED[(batch, s)] for s in (0, 1)]
        acc = np.array([v[0] for v in vals]) * 100
        gap = np.array([v[1] - v[0] for v in vals]) * 100
        sps = np.array([v[2] for v in vals])
        steps = np.array([v[3] for v in vals], float)
        ttt = np.array([v[4] for v in vals])
        cells = [c.strip() for c in by_batch[batch].split("|")[1:-1]]
        assert cells == [str(batch), "2", cell(acc.mean(), acc.std(ddof=1), 2),
                         cell(gap.mean(), gap.std(ddof=1), 2), cell(sps.mean(), sps.std(ddof=1), 0),
                         cell(steps.mean(), steps.std(ddof=1), 0), cell(ttt.mean(), ttt.std(ddof=1), 1),
                         "2/2", "0"]
    # 512: one ok run (no std shown), one diverged run left out of the means, target never reached
    cells = [c.strip() for c in by_batch[512].split("|")[1:-1]]
    assert cells == ["512", "2", "80.00", "1.00", "9000", "—", "—", "0/1", "1"]
    assert by_batch[128].count("±") == 5


def test_recommendation_within_tolerance():
    summaries = summarize(make_rows())
    # best accuracy: 128 at 91.0% (32 ties); 128 reaches the target in 240 ± 28 steps against
    # 850 ± 71 at 32: fewest steps, beyond both uncertainties (seed std; histories without steps)
    choice = choose_from_sweep(summaries, tolerance_points=1.0)
    assert (choice.rule, choice.global_batch_size, choice.steps_to_target) == (None, 128, 240.0)
    assert [c.global_batch_size for c in choice.eligible] == [32, 128]  # 512: 80%, not reached
    assert [c.global_batch_size for c in choice.tied] == [128]
    text = "\n".join(recommendation_lines(choice, {None: summaries}, 0.9, 1.0))
    assert text.startswith("**global batch 128**: reaches 90.00% validation accuracy in 240 ± 28 "
                           "optimizer steps and ends at 91.00%")
    # with a strict tolerance only the most accurate batch qualifies
    rows = [dict(r, val_accuracy=r["val_accuracy"] + 0.02) if r["global_batch_size"] == 32 else r
            for r in make_rows()]
    assert choose_from_sweep(summarize(rows), tolerance_points=1.0).global_batch_size == 32
    assert choose_from_sweep(summarize(rows), tolerance_points=3.0).global_batch_size == 128


def test_no_recommendation_when_nothing_reaches_target_or_everything_diverged():
    rows = [dict(r, steps_to_target=None, time_to_target_s=None) for r in make_rows()]
    summaries = summarize(rows)
    assert choose_from_sweep(summaries) is None
    text = recommendation_lines(None, {None: summaries}, 0.9, 1.0)[0]
    assert text.startswith("No rule and batch within 1 point(s) of the best final accuracy "
                           "(91.00%, batch 32) reached 90.00% in every run")
    dead = summarize([dict(r, status="diverged", diverged=True) for r in make_rows()])
    assert choose_from_sweep(dead) is None
    assert recommendation_lines(None, {None: dead}, 0.9, 1.0)[0].startswith("No point finished without diverging")


def test_build_report_from_jsonl_writes_only_inside_out_dir(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    for row in make_rows():
        append_row(out, row)
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    path = build_report(out, target_accuracy=0.9, machine="test box, 2 cores")
    created = {p for p in tmp_path.rglob("*")} - before
    assert path == out / "report.md"
    assert created and all(p.parent == out for p in created)
    names = {p.name for p in created}
    assert names == {"report.md", "accuracy_gap.png", "throughput.png", "steps_to_target.png",
                     "frontier.png", "curves.png"}
    for name in names - {"report.md"}:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    text = path.read_text()
    for name in names - {"report.md"}:
        assert f"]({name})" in text
    assert "Machine: test box, 2 cores." in text and "single (1 replica(s))" in text
    assert "validation accuracy >= 90.00%" in text
    assert text.count("## Recommendation") == 1 and "**global batch 128**" in text
    assert "Shallue et al. 2019" in text and "fixed epoch budget" in text
    # no B_simple trajectories: the median of the final values 150, 151, 150, 151, 150
    assert "**B_crit ≈ 150**" in text and "at the END of 5 run(s)" in text
    assert "\n".join(table_lines(summarize(make_rows()))) in text


def test_missing_values_and_no_history(tmp_path):
    rows = [dict(r, steps_to_target=None, time_to_target_s=None, b_simple=None, samples_per_sec=None)
            for r in make_rows(history=False)]
    path = build_report(tmp_path, rows)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"report.md", "accuracy_gap.png", "throughput.png"}
    text = path.read_text()
    assert "no steps-to-target plot" in text and "B_simple over" not in text
    assert "No target accuracy was recorded" in text


def test_report_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="distbatch")
    add_report_parser(parser.add_subparsers(dest="command"))
    for row in make_rows()[:2]:
        append_row(tmp_path / "s", row)
    args = parser.parse_args(["report", str(tmp_path / "s"), "--target-accuracy", "0.85"])
    assert args.handler(args) == 0
    assert (tmp_path / "s" / "report.md").is_file() and "report.md" in capsys.readouterr().out
    with pytest.raises(UsageError, match="report directory not found: '.*nowhere'"):
        args.handler(parser.parse_args(["report", str(tmp_path / "nowhere")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no results.jsonl"):
        args.handler(parser.parse_args(["report", str(tmp_path / "empty")]))
    with pytest.raises(UsageError, match=r"--target-accuracy must be a fraction in \(0, 1\], got 85.0"):
        args.handler(parser.parse_args(["report", str(tmp_path / "s"), "--target-accuracy", "85"]))
    assert not os.listdir(tmp_path / "empty")
