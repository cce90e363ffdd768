"""Sweep result rows: one per finished (global batch, seed) point.

A sweep directory holds ``results.jsonl`` (the source of truth, read by
a resumed sweep and by the report) and ``results.csv`` (the same rows for
spreadsheets). Rows are appended as points finish and must survive a kill at
any instant, so a resumed sweep neither loses nor duplicates a point.

Why rewrite-and-rename rather than ``O_APPEND``: each append writes the WHOLE
new file to a temp file in the same directory, fsyncs it, and ``os.replace``-s
it over the old one (then fsyncs the directory). ``rename(2)`` is atomic, so a
reader or a crash sees either the old file or the new one, never a half line,
even on power loss (a single ``write`` on an O_APPEND fd survives SIGKILL but
not a crash mid-write, and cannot update the CSV header rule atomically). The
cost, O(rows) per append, is nothing next to training one point.

The two files cannot be renamed together, so jsonl is written first and the
CSV is regenerated from the jsonl rows: a kill between the two renames leaves
the CSV one row short, never ahead and never torn; :func:`sync_csv` (called on
every append, and meant for the start and end of a resumed sweep) repairs it.
One writer per directory (the chief) is assumed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from distbatch.errors import UsageError
from distbatch.fileio import atomic_write_text

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
STATUSES = ("ok", "diverged", "oom")

ROW_FIELDS: tuple[str, ...] = (
    "point_id",
    "status",
    "global_batch_size",
    "per_replica_batch_size",
    "replicas",
    "backend",
    "seed",
    "peak_lr",
    "warmup_steps",
    "epochs",
    "steps",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "generalization_gap",  # train_accuracy - val_accuracy
    "samples_per_sec",
    "wall_time_s",
    "steps_to_target",  # None if the target was never reached
    "time_to_target_s",  # None if the target was never reached
    "diverged",  # True when the loss went NaN/inf; that point stopped, the sweep went on
    "b_simple",  # gradient noise scale tr(Sigma)/|G|^2 (McCandlish et al. 2018), or None
)
_INT_FIELDS = ("global_batch_size", "per_replica_batch_size", "replicas", "seed")


def make_point_id(global_batch_size: int, seed: int, scaling: str | None = None) -> str:
    """The stable key of a sweep point, e.g. ``"bs=256/seed=0"`` (``".../scaling=adascale"``
    when a sweep compares scaling rules), used to resume a sweep."""
    return f"bs={int(global_batch_size)}/seed={int(seed)}" + (f"/scaling={scaling}" if scaling else "")


def validate_row(row: dict) -> dict:
    """Return a JSON-ready copy of ``row`` or raise UsageError naming what is wrong.

    Every name in :data:`ROW_FIELDS` must be present (None allowed where a value
    is unknown); extra keys (e.g. ``history``, ``optimizer``) are kept. NumPy
    scalars become Python numbers and non-finite floats become None: a diverged
    point's NaN loss is recorded by ``status``/``diverged``, and strict JSON has
    no NaN.
    """
    if not isinstance(row, dict):
        raise UsageError(f"a result row must be a dict, got {type(row).__name__}")
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        raise UsageError(f"result row {row.get('point_id')!r} lacks field(s): {', '.join(missing)}")
    clean = {k: _plain(v) for k, v in row.items()}
    if not isinstance(clean["point_id"], str) or not clean["point_id"]:
        raise UsageError(f"point_id must be a non-empty string, got {clean['point_id']!r}")
    if clean["status"] not in STATUSES:
        raise UsageError(f"status must be one of {', '.join(STATUSES)}, got {clean['status']!r}")
    if not isinstance(clean["diverged"], bool):
        raise UsageError(f"diverged must be true or false, got {clean['diverged']!r}")
    for name in _INT_FIELDS:
        value = clean[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise UsageError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                             f"integer, got {value!r}")
    return clean


def append_row(out_dir: str | os.PathLike, row: dict) -> None:
    """Append one finished point to results.jsonl and results.csv, atomically.

    Raises UsageError if the row is malformed or its point_id is already
    recorded (a resumed sweep must skip done points, not repeat them).
    """
    out = Path(out_dir)
    clean = validate_row(row)
    rows = read_rows(out)
    if any(r.get("point_id") == clean["point_id"] for r in rows):
        raise UsageError(f"point {clean['point_id']!r} is already in {out / JSONL_NAME}")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    rows.append(clean)
    atomic_write_text(out / JSONL_NAME, "".join(_json_line(r) for r in rows))
    atomic_write_text(out / CSV_NAME, _csv_text(rows))


def read_rows(out_dir: str | os.PathLike,
              check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Rows of results.jsonl in order ([] if there is no file).

    A final line without its newline that does not parse is dropped (it can only
    come from a foreign writer; ours never leaves one); a bad line elsewhere is
    an error naming the line number, and so is a row for which ``check(row)``
    returns a problem. Two rows of one point_id are refused, naming both lines:
    averaged into the report, a copied row would weigh that point twice, and which
    copy is right only the user can tell.
    """
    path = Path(out_dir) / JSONL_NAME
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, first_line = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines):  # trailing partial line, no newline after it
                break
            raise UsageError(f"{path}:{number} is not a JSON object row: {line[:80]!r}") from None
        problem = check(row) if check else None
        if problem:
            raise UsageError(f"{path}:{number}: {problem}; fix or delete that row")
        _refuse_duplicate(path, number, row.get("point_id"), first_line)
        rows.append(row)
    return rows


# ------------------------------------------------------------- rows -> statistics

@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of ``n`` values."""

    mean: float | None
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        if not values:
            return cls(None, 0.0, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                   len(values))


@dataclass(frozen=True)
class BatchSummary:
    """All seeds of one global batch size (of one scaling rule). Metrics use status "ok" rows only.

    ``steps_resolution``: the largest gap, over the runs that reached the target, between the
    evaluation that first saw the target and the one before it: the crossing lies somewhere in
    that gap, so steps-to-target is known to within it. ``b_simple_at_target``: B_simple read
    on each run's trajectory at the step it first reached the target.
    """

    global_batch_size: int
    runs: int
    ok: int
    diverged: int
    oom: int
    val_accuracy: Stat
    generalization_gap: Stat
    samples_per_sec: Stat
    steps_to_target: Stat  # over the ok runs that reached the target
    time_to_target_s: Stat
    rule: str | None = None
    steps_resolution: int | None = None
    b_simple_at_target: Stat = Stat(None, 0.0, 0)


def rule_of(row: dict) -> str | None:
    """The row's scaling rule (None for rows that do not record one)."""
    rule = row.get("scaling_rule")
    return rule if isinstance(rule, str) and rule else None


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and not row.get("diverged")


def target_resolution(row: dict) -> int | None:
    """Steps between the evaluation at which the row first reached its target
    (``steps_to_target``) and the evaluation before it (step 0 when there is none); None when
    the history does not record the evaluations' steps."""
    reached, history = row.get("steps_to_target"), row.get("history")
    if not finite(reached):
        return None
    steps = [h.get("step") for h in history or [] if isinstance(h, dict) and finite(h.get("step"))]
    if not steps:
        return None  # evaluations without their step: the interval is unknown
    before = [s for s in steps if s < reached]
    return int(reached - (max(before) if before else 0))


def value_at_step(trajectory, step: float) -> float | None:
    """A ``[[step, value], ...]`` trajectory read at ``step``, linearly interpolated between the
    recorded points (the last point before ``step`` when it is past the end; None when the
    trajectory is empty or starts after ``step``)."""
    points = sorted((float(p[0]), float(p[1])) for p in trajectory or []
                    if isinstance(p, (list, tuple)) and len(p) == 2 and finite(p[0]) and finite(p[1]))
    if not points or not finite(step) or step < points[0][0]:
        return None
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def b_simple_at_target(row: dict) -> float | None:
    """B_simple on the row's trajectory at the step it first reached the target (the row's own
    ``b_simple_at_target`` when it records one)."""
    if finite(row.get("b_simple_at_target")):
        return float(row["b_simple_at_target"])
    if not finite(row.get("steps_to_target")):
        return None
    return value_at_step(row.get("b_simple_trajectory"), row["steps_to_target"])


def summarize(rows: list[dict], rule: str | None = None) -> list[BatchSummary]:
    """Group rows by global batch size (ascending) and average over seeds."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(int(row["global_batch_size"]), []).append(row)
    out = []
    for batch in sorted(groups):
        group = groups[batch]
        ok = [r for r in group if is_ok(r)]
        diverged = sum(1 for r in group if r.get("status") == "diverged" or r.get("diverged"))

        def stat(field: str) -> Stat:
            return Stat.of([float(r[field]) for r in ok if finite(r.get(field))])

        gaps = [g for g in (target_resolution(r) for r in ok) if g is not None]
        at_target = [v for v in (b_simple_at_target(r) for r in ok) if v is not None]
        out.append(BatchSummary(
            batch, len(group), len(ok), diverged, sum(1 for r in group if r.get("status") == "oom"),
            stat("val_accuracy"), stat("generalization_gap"), stat("samples_per_sec"),
            stat("steps_to_target"), stat("time_to_target_s"), rule,
            max(gaps) if gaps else None, Stat.of(at_target)))
    return out


def summarize_rules(rows: list[dict]) -> dict[str | None, list[BatchSummary]]:
    """:func:`summarize` per scaling rule, rules in the order they first appear."""
    by_rule: dict[str | None, list[dict]] = {}
    for row in rows:
        by_rule.setdefault(rule_of(row), []).append(row)
    return {rule: summarize(rs, rule) for rule, rs in by_rule.items()}


def _refuse_duplicate(path: Path, number: int, point_id, first_line: dict) -> None:
    """UsageError when `point_id` was already recorded on an earlier line of `path`."""
    if not isinstance(point_id, str):
        return
    if point_id in first_line:
        raise UsageError(f"{path} lines {first_line[point_id]} and {number} both record point {point_id!r}; "
                         "expected one row per point: delete one of the two lines")
    first_line[point_id] = number


def done_point_ids(out_dir: str | os.PathLike) -> set[str]:
    """point_ids already recorded, which a resumed sweep skips."""
    return {r["point_id"] for r in read_rows(out_dir) if isinstance(r.get("point_id"), str)}


def sync_csv(out_dir: str | os.PathLike) -> None:
    """Rewrite results.csv from results.jsonl if they differ (after a kill between the two renames)."""
    out = Path(out_dir)
    rows = read_rows(out)
    if not rows:
        return
    text = _csv_text(rows)
    csv_path = out / CSV_NAME
    if not csv_path.is_file() or csv_path.read_text(encoding="utf-8") != text:
        atomic_write_text(csv_path, text)


def csv_columns(rows: Iterable[dict]) -> list[str]:
    """ROW_FIELDS, then extra scalar keys in first-seen order (lists/dicts such as history stay in jsonl)."""
    columns = list(ROW_FIELDS)
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, (list, dict)):
                columns.append(key)
    return columns


# ------------------------------------------------------------------ internals

def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / tf scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _json_line(row: dict) -> str:
    return json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n"


def _csv_text(rows: list[dict]) -> str:
    columns = csv_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _remove_stale_temps(out: Path) -> None:
    # A SIGKILL between mkstemp and os.replace leaves a dot-file; one writer per
    # directory means any such file is dead.
    for name in (JSONL_NAME, CSV_NAME):
        for stale in out.glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
