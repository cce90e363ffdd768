"""Sweep report: plots and report.md rebuilt from result rows alone (never trains).

Why steps-to-target and not final accuracy: with a fixed EPOCH budget a batch
of B takes N/B steps, so a small batch gets many more parameter updates than a
large one and usually ends more accurate for that reason alone. Shallue et al.
2019 ("Measuring the Effects of Data Parallelism on Neural Network Training",
JMLR 20(112)) therefore compare batch sizes by the number of steps (or the
time) needed to reach a goal validation metric. On log-log axes steps-to-target
first follows perfect scaling (2x batch -> 0.5x steps), then diminishing
returns, then a plateau (maximal data parallelism). McCandlish et al. 2018
(arXiv:1812.06162) predict where the bend lies: the critical batch is about the
gradient noise scale B_simple = tr(Sigma) / |G|^2.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from distbatch.errors import UsageError
from distbatch.fileio import atomic_write
from distbatch.measure.results import JSONL_NAME, STATUSES, read_rows

REPORT_NAME = "report.md"
PLOT_NAMES = {
    "accuracy": "accuracy_gap.png",
    "throughput": "throughput.png",
    "steps": "steps_to_target.png",
    "frontier": "frontier.png",
    "curves": "curves.png",
}


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
    """All seeds of one global batch size. Metrics use status "ok" rows only."""

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


def row_problem(row: dict) -> str | None:
    """What makes a result row unusable for the report (other fields may be missing or null)."""
    batch, seed, history = row.get("global_batch_size"), row.get("seed"), row.get("history")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        return f"global_batch_size must be a positive integer, got {batch!r}"
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return f"seed must be an integer, got {seed!r}"
    if row.get("status", "ok") not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {row.get('status')!r}"
    if history is not None and not (isinstance(history, list)
                                    and all(isinstance(h, dict) for h in history)):
        return f"history must be a list of objects, got {str(history)[:40]!r}"
    return None


def summarize(rows: list[dict]) -> list[BatchSummary]:
    """Group rows by global batch size (ascending) and average over seeds."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(int(row["global_batch_size"]), []).append(row)
    out = []
    for batch in sorted(groups):
        group = groups[batch]
        ok = [r for r in group if r.get("status", "ok") == "ok" and not r.get("diverged")]
        diverged = sum(1 for r in group if r.get("status") == "diverged" or r.get("diverged"))

        def stat(field: str) -> Stat:
            return Stat.of([float(r[field]) for r in ok if _finite(r.get(field))])

        out.append(BatchSummary(
            batch, len(group), len(ok), diverged, sum(1 for r in group if r.get("status") == "oom"),
            stat("val_accuracy"), stat("generalization_gap"), stat("samples_per_sec"),
            stat("steps_to_target"), stat("time_to_target_s")))
    return out


def best_batch_sentence(summaries: list[BatchSummary], tolerance_points: float = 1.0) -> str:
    """Name the batch with the least time-to-target among those whose mean validation
    accuracy is within ``tolerance_points`` percentage points of the best mean."""
    scored = [s for s in summaries if s.val_accuracy.mean is not None]
    if not scored:
        return "No point finished without diverging, so no batch size can be recommended."
    best = max(scored, key=lambda s: s.val_accuracy.mean)
    near = [s for s in scored if s.val_accuracy.mean >= best.val_accuracy.mean - tolerance_points / 100]
    within = (f"within {tolerance_points:g} point(s) of the best validation accuracy "
              f"{100 * best.val_accuracy.mean:.2f}% (batch {best.global_batch_size})")
    timed = [s for s in near if s.time_to_target_s.mean is not None]
    if timed:
        win = min(timed, key=lambda s: s.time_to_target_s.mean)
        return (f"Best batch for time-to-target: **{win.global_batch_size}**, reaching the target in "
                f"{win.time_to_target_s.mean:.1f} s (mean over {win.time_to_target_s.n} seed(s)) with "
                f"validation accuracy {100 * win.val_accuracy.mean:.2f}%, {within}.")
    fast = [s for s in near if s.samples_per_sec.mean is not None]
    tail = ""
    if fast:
        top = max(fast, key=lambda s: s.samples_per_sec.mean)
        tail = (f"; the highest throughput among them is batch {top.global_batch_size} "
                f"({top.samples_per_sec.mean:.0f} samples/s)")
    return (f"No batch {within} reached the target accuracy, so time-to-target names no "
            f"winner{tail}.")


def build_report(
    out_dir: str | os.PathLike,
    rows: list[dict] | None = None,
    *,
    target_accuracy: float | None = None,
    machine: str | None = None,
    critical_batch: float | None = None,
    tolerance_points: float = 1.0,
) -> Path:
    """Write report.md and PNG plots into ``out_dir`` from result rows; return report.md's path.

    ``rows`` defaults to ``out_dir/results.jsonl``. ``critical_batch`` defaults
    to the median ``b_simple`` of the ok rows (None if no row has one). Only
    files inside ``out_dir`` are written, each atomically.
    """
    out = Path(out_dir)
    if rows is None:
        if not (out / JSONL_NAME).is_file():
            raise UsageError(f"no {JSONL_NAME} in {str(out)!r}; run `distbatch sweep --out {out}` first")
        rows = read_rows(out, check=row_problem)
    if not rows:
        raise UsageError(f"no result rows to report in {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    rules = sorted({r["scaling_rule"] for r in rows if isinstance(r.get("scaling_rule"), str)})
    if len(rules) > 1:  # a sweep comparing scaling rules: one full report per rule, and a comparison
        return _compare_rules(out, rows, rules, target_accuracy=target_accuracy, machine=machine,
                              critical_batch=critical_batch, tolerance_points=tolerance_points)
    summaries = summarize(rows)
    if target_accuracy is None:
        target_accuracy = next((r["target_accuracy"] for r in rows if _finite(r.get("target_accuracy"))), None)
    if critical_batch is None:
        noise = [float(r["b_simple"]) for r in rows
                 if r.get("status", "ok") == "ok" and _finite(r.get("b_simple"))]
        critical_batch = statistics.median(noise) if noise else None

    plots = {}
    plots["accuracy"] = _save(out, "accuracy", _plot_accuracy, summaries, target_accuracy)
    plots["throughput"] = _save(out, "throughput", _plot_throughput, summaries)
    if any(s.steps_to_target.mean is not None for s in summaries):
        plots["steps"] = _save(out, "steps", _plot_steps, summaries, critical_batch)
    if any(s.samples_per_sec.mean is not None and s.val_accuracy.mean is not None for s in summaries):
        plots["frontier"] = _save(out, "frontier", _plot_frontier, summaries)
    if any(isinstance(r.get("history"), list) and r["history"] for r in rows):
        plots["curves"] = _save(out, "curves", _plot_curves, rows)

    text = _markdown(rows, summaries, plots, target_accuracy, machine, critical_batch, tolerance_points)
    path = out / REPORT_NAME
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _compare_rules(out: Path, rows: list[dict], rules: list[str], **kwargs) -> Path:
    """report.md: per global batch, each scaling rule's accuracy, optimizer steps and time to
    target side by side; each rule's own report (tables and plots) under scaling/<rule>/."""
    by_rule = {rule: [r for r in rows if r.get("scaling_rule") == rule] for rule in rules}
    subs = {rule: build_report(out / "scaling" / rule, rs, **kwargs) for rule, rs in by_rule.items()}
    summaries = {rule: {s.global_batch_size: s for s in summarize(rs)} for rule, rs in by_rule.items()}
    steps = {rule: {} for rule in rules}
    for rule, rs in by_rule.items():
        for r in rs:
            if r.get("status", "ok") == "ok" and _finite(r.get("steps")):
                steps[rule].setdefault(int(r["global_batch_size"]), []).append(float(r["steps"]))
    batches = sorted({b for s in summaries.values() for b in s})
    head = "| global batch | " + " | ".join(
        f"{rule}: val acc (%) | {rule}: optimizer steps | {rule}: time to target (s)" for rule in rules) + " |"
    lines = ["# distbatch sweep report: scaling rules compared", "",
             f"{len(rows)} point(s); scaling rules {', '.join(rules)}; mean ± sample std over seeds "
             "of the runs that finished. AdaScale's length is the base batch's, counted in "
             "scale-invariant steps, so its optimizer steps differ per batch (docs/adascale.md).", "",
             head, "|---:|" + "---:|" * (3 * len(rules))]
    for b in batches:
        cells = []
        for rule in rules:
            s = summaries[rule].get(b)
            st = Stat.of(steps[rule].get(b, []))
            cells += [_fmt(s.val_accuracy, 100) if s else "—", _fmt(st, 1, 0),
                      _fmt(s.time_to_target_s, 1, 1) if s else "—"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Each rule's full report (per-batch table, plots, best batch):", ""]
    lines += [f"- {rule}: [{path.relative_to(out)}]({path.relative_to(out)})" for rule, path in subs.items()]
    path = out / REPORT_NAME
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    return path


# ------------------------------------------------------------------ markdown

def _fmt(stat: Stat, scale: float = 1.0, digits: int = 2) -> str:
    if stat.mean is None:
        return "—"
    text = f"{stat.mean * scale:.{digits}f}"
    return text + (f" ± {stat.std * scale:.{digits}f}" if stat.n > 1 else "")


def table_lines(summaries: list[BatchSummary]) -> list[str]:
    """The per-batch Markdown table (mean ± sample std over seeds)."""
    lines = ["| global batch | runs | val acc (%) | gap (points) | samples/s | steps to target "
             "| time to target (s) | reached target | diverged |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(
            f"| {s.global_batch_size} | {s.runs} | {_fmt(s.val_accuracy, 100)} "
            f"| {_fmt(s.generalization_gap, 100)} | {_fmt(s.samples_per_sec, 1, 0)} "
            f"| {_fmt(s.steps_to_target, 1, 0)} | {_fmt(s.time_to_target_s, 1, 1)} "
            f"| {s.steps_to_target.n}/{s.ok} | {s.diverged} |")
    return lines


def _markdown(rows, summaries, plots, target, machine, critical, tolerance) -> str:
    backends = sorted({f"{r.get('backend')} ({r.get('replicas')} replica(s))" for r in rows})
    machine = machine or next((r["machine"] for r in rows if isinstance(r.get("machine"), str)), None) \
        or (f"{platform.system()} {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} CPU core(s) (the machine that built this report)")
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    lines = ["# distbatch sweep report", "",
             f"{len(rows)} point(s), global batch sizes "
             f"{', '.join(str(s.global_batch_size) for s in summaries)}, seeds {seeds}. "
             + (f"Target: validation accuracy >= {100 * target:.2f}%." if target is not None
                else "No target accuracy was recorded; steps/time to target come from the rows."),
             "", f"Machine: {machine}. Backends: {', '.join(backends)}.", "",
             "## Results per global batch", "",
             "Mean ± sample standard deviation over seeds of the runs that finished (status ok); "
             "steps and time to target average the runs that reached it (count in \"reached "
             "target\"); diverged runs (loss NaN/inf) are counted, not averaged.", ""]
    lines += table_lines(summaries)
    lines += ["", best_batch_sentence(summaries, tolerance), "",
              "## Why steps-to-target", "",
              "Under a fixed epoch budget (the sweep's default) a batch of B takes N/B steps per "
              "epoch: the smallest batch makes many times more parameter updates than the largest, "
              "and the fixed epoch budget hands it accuracy for that reason alone, not because small "
              "batches generalize better. The fair comparison is the number of steps (or seconds) "
              "needed to reach the same validation target (Shallue et al. 2019, JMLR 20(112)): "
              "with perfect scaling doubling the batch halves the steps; past the critical batch "
              "it stops helping (McCandlish et al. 2018 predict it near the gradient noise scale "
              "B_simple).", ""]
    if critical is not None:
        lines += [f"Predicted critical batch (median B_simple over the runs): {critical:.0f}.", ""]
    captions = {"accuracy": "Validation accuracy and generalization gap vs global batch",
                "throughput": "Throughput vs global batch",
                "steps": "Steps to target vs global batch (log-log) with the perfect-scaling line",
                "frontier": "Throughput vs accuracy, one point per batch",
                "curves": "Per-epoch training curves"}
    lines += ["## Plots", ""]
    for key, name in plots.items():
        lines += [f"![{captions[key]}]({name})", ""]
    if "steps" not in plots:
        lines += ["No run reached the target, so there is no steps-to-target plot.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------- plots

def _save(out: Path, key: str, draw: Callable, *args: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no pyplot, no global backend switch
    draw(fig, *args)
    fig.tight_layout()
    name = PLOT_NAMES[key]
    atomic_write(out / name, lambda f: fig.savefig(f, format="png"))
    return name


def _batch_axis(ax, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("global batch size")
    ax.grid(True, alpha=0.3)


def _series(summaries, field: str, scale: float = 1.0):
    chosen = [s for s in summaries if getattr(s, field).mean is not None]
    return ([s.global_batch_size for s in chosen], [getattr(s, field).mean * scale for s in chosen],
            [getattr(s, field).std * scale for s in chosen])


def _plot_accuracy(fig, summaries, target) -> None:
    acc_ax, gap_ax = fig.subplots(1, 2)
    batches = [s.global_batch_size for s in summaries]
    for ax, field, label in ((acc_ax, "val_accuracy", "validation accuracy (%)"),
                             (gap_ax, "generalization_gap", "train - val accuracy (points)")):
        x, y, err = _series(summaries, field, 100)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
        _batch_axis(ax, batches)
        ax.set_ylabel(label)
    if target is not None:
        acc_ax.axhline(100 * target, color="gray", ls=":", label="target")
        acc_ax.legend()
    acc_ax.set_title("mean ± std over seeds", fontsize=9)


def _plot_throughput(fig, summaries) -> None:
    ax = fig.subplots()
    x, y, err = _series(summaries, "samples_per_sec")
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
    _batch_axis(ax, [s.global_batch_size for s in summaries])
    ax.set_ylabel("training samples / s")


def _plot_steps(fig, summaries, critical) -> None:
    ax = fig.subplots()
    x, y, err = _series(summaries, "steps_to_target")
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="measured")
    batches = [s.global_batch_size for s in summaries]
    anchor_b, anchor_s = x[0], y[0]
    ideal = [anchor_s * anchor_b / b for b in batches if b >= anchor_b]
    ax.plot([b for b in batches if b >= anchor_b], ideal, "k--", lw=1,
            label="perfect scaling (Shallue et al. 2019)")
    if critical is not None:
        ax.axvline(critical, color="tab:red", ls=":", label="B_simple (predicted)")
    _batch_axis(ax, batches)
    ax.set_yscale("log", base=2)
    ax.set_ylabel("steps to target")
    ax.legend(fontsize=8)


def _plot_frontier(fig, summaries) -> None:
    ax = fig.subplots()
    pts = [(s.samples_per_sec.mean, 100 * s.val_accuracy.mean, s.global_batch_size) for s in summaries
           if s.samples_per_sec.mean is not None and s.val_accuracy.mean is not None]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for sps, acc, batch in pts:
        ax.annotate(f"B={batch}", (sps, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier, best = [], -math.inf  # Pareto: no other point is both faster and more accurate
    for sps, acc, _ in sorted(pts, key=lambda p: -p[0]):
        if acc > best:
            frontier.append((sps, acc))
            best = acc
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "k--", lw=1, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training samples / s")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_curves(fig, rows) -> None:
    loss_ax, acc_ax = fig.subplots(1, 2)
    first: dict[int, dict] = {}  # lowest seed of each batch that has a history
    for row in sorted(rows, key=lambda r: (r["global_batch_size"], r.get("seed") or 0)):
        if isinstance(row.get("history"), list) and row["history"]:
            first.setdefault(int(row["global_batch_size"]), row)
    for i, (batch, row) in enumerate(sorted(first.items())):
        color = f"C{i % 10}"
        epochs = [h.get("epoch", j + 1) for j, h in enumerate(row["history"])]
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [h.get(f"{split}_{metric}") for h in row["history"]]
                values = [v if _finite(v) else math.nan for v in values]
                ax.plot(epochs, values, style, color=color,
                        label=f"B={batch} {split}" if metric == "loss" else None)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=6)
    acc_ax.set_title("solid: train, dashed: val", fontsize=9)


# --------------------------------------------------------------------- utils

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
