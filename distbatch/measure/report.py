"""Sweep report: plots and report.md rebuilt from result rows alone (never trains).

One report for the whole sweep, whatever the number of scaling rules: every plot has one
line per rule, a point that never reached the target is drawn as an 'x' at the top of the
steps axis, and the report names ONE rule and global batch (distbatch.measure.recommend.
choose_from_sweep) with its uncertainty, and one critical-batch estimate.

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

import os
import platform
import statistics
from pathlib import Path

from distbatch.errors import UsageError
from distbatch.fileio import atomic_write
from distbatch.measure.recommend import CriticalBatch, SweepChoice, choose_from_sweep
from distbatch.measure.recommend import critical_batch as estimate_critical_batch
from distbatch.measure.recommend import step_time, steps_uncertainty
# Stat, BatchSummary and summarize moved to results.py; still importable from here.
from distbatch.measure.report_plots import NOT_REACHED, PLOT_NAMES, save_plot  # noqa: F401
from distbatch.measure.results import (JSONL_NAME, STATUSES, BatchSummary, Stat, finite,  # noqa: F401
                                       is_ok, read_rows, rule_of, summarize, summarize_rules)

REPORT_NAME = "report.md"


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


def label(rule: str | None) -> str:
    """A rule's name in plots and tables ("measured" for rows that do not record one)."""
    return rule or "measured"


def build_report(
    out_dir: str | os.PathLike,
    rows: list[dict] | None = None,
    *,
    target_accuracy: float | None = None,
    machine: str | None = None,
    critical_batch: float | None = None,
    tolerance_points: float = 1.0,
    part_of: str | None = None,
) -> Path:
    """Write report.md and PNG plots into ``out_dir`` from result rows; return report.md's path.

    ``rows`` defaults to ``out_dir/results.jsonl``. ``critical_batch`` replaces the predicted
    critical batch (default: B_simple at the target, distbatch.measure.recommend.critical_batch).
    A sweep of several scaling rules also gets one detail page per rule under
    ``scaling/<rule>/`` (its table and plots; ``part_of`` names the combined report, which
    alone holds the recommendation). Only files inside ``out_dir`` are written, each atomically.
    """
    out = Path(out_dir)
    if rows is None:
        if not (out / JSONL_NAME).is_file():
            raise UsageError(f"no {JSONL_NAME} in {str(out)!r}; expected the directory of a sweep "
                             "(distbatch sweep, or distbatch.measure.sweep.run_sweep)")
        rows = read_rows(out, check=row_problem)
    if not rows:
        raise UsageError(f"no result rows to report in {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    by_rule = summarize_rules(rows)
    if target_accuracy is None:
        target_accuracy = next((r["target_accuracy"] for r in rows if finite(r.get("target_accuracy"))), None)
    crit = estimate_critical_batch(rows, by_rule)
    if critical_batch is not None:
        crit = CriticalBatch(critical_batch, "given", 0, crit.per_rule, crit.fitted)
    choice = None if part_of else choose_from_sweep(
        [c for cells in by_rule.values() for c in cells], tolerance_points=tolerance_points)

    data = plot_data(by_rule, target_accuracy, crit, choice)
    plots = {"accuracy": save_plot(out, "accuracy", data["accuracy"]),
             "throughput": save_plot(out, "throughput", data["throughput"])}
    if any(s["steps"] for s in data["steps"]["series"].values()):
        plots["steps"] = save_plot(out, "steps", data["steps"])
    if any(s["sps"] for s in data["frontier"]["series"].values()):
        plots["frontier"] = save_plot(out, "frontier", data["frontier"])
    if any(isinstance(r.get("history"), list) and r["history"] for r in rows):
        plots["curves"] = save_plot(out, "curves", rows)

    if len(by_rule) > 1 and not part_of:
        for rule in by_rule:
            build_report(out / "scaling" / str(rule), [r for r in rows if rule_of(r) == rule],
                         target_accuracy=target_accuracy, machine=machine,
                         critical_batch=critical_batch, tolerance_points=tolerance_points,
                         part_of="../../" + REPORT_NAME)
    text = _markdown(rows, by_rule, plots, target_accuracy, machine, crit, choice,
                     tolerance_points, part_of)
    path = out / REPORT_NAME
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


# ------------------------------------------------------------------ plot data

def plot_data(by_rule: dict, target: float | None, crit: CriticalBatch,
              choice: SweepChoice | None) -> dict:
    """What every plot draws, as plain numbers (one series per scaling rule), so the tests
    check the data rather than pixels."""
    def series(cells, field, scale=1.0):
        chosen = [c for c in cells if getattr(c, field).mean is not None]
        return ([c.global_batch_size for c in chosen], [getattr(c, field).mean * scale for c in chosen],
                [getattr(c, field).std * scale for c in chosen])

    target_text = f"{100 * target:.2f}% validation accuracy" if target is not None else "the target"
    acc, steps, thr, front = {}, {}, {}, {}
    not_reached, time_not_reached, fits = {}, {}, {}
    for rule, cells in by_rule.items():
        name = label(rule)
        b, v, e = series(cells, "val_accuracy", 100)
        gb, g, ge = series(cells, "generalization_gap", 100)
        acc[name] = {"batch": b, "val": v, "val_err": e, "gap_batch": gb, "gap": g, "gap_err": ge}
        b, s, e = series(cells, "steps_to_target")
        steps[name] = {"batch": b, "steps": s, "err": e}
        not_reached[name] = [c.global_batch_size for c in cells if c.steps_to_target.n == 0]
        b, s, e = series(cells, "samples_per_sec")
        tb, t, te = series(cells, "time_to_target_s")
        thr[name] = {"batch": b, "sps": s, "err": e, "time_batch": tb, "time": t, "time_err": te}
        time_not_reached[name] = not_reached[name]
        pts = [(c.samples_per_sec.mean, 100 * c.val_accuracy.mean, c.global_batch_size) for c in cells
               if c.samples_per_sec.mean is not None and c.val_accuracy.mean is not None]
        front[name] = {"sps": [p[0] for p in pts], "acc": [p[1] for p in pts], "batch": [p[2] for p in pts]}
        fit = crit.fitted.get(rule)
        if fit:
            bc, smin, batches = fit
            grid = list(batches)  # drawn over the batches it was fitted to
            fits[name] = {"b_crit": bc, "batch": grid, "steps": [smin * (1 + bc / x) for x in grid]}
    batches = sorted({c.global_batch_size for cells in by_rule.values() for c in cells})
    reached = [(c.global_batch_size, c.steps_to_target.mean) for cells in by_rule.values() for c in cells
               if c.steps_to_target.mean is not None]
    ideal = {"batch": [], "steps": []}
    if reached:  # perfect scaling from the smallest batch that reached the target
        b0 = min(b for b, _ in reached)
        s0 = statistics.fmean(s for b, s in reached if b == b0)
        ideal = {"batch": [b for b in batches if b >= b0], "steps": [s0 * b0 / b for b in batches if b >= b0]}
    rec = None
    if choice is not None:
        rec = {"label": label(choice.rule), "batch": choice.global_batch_size,
               "steps": choice.steps_to_target}
    return {
        "batches": batches,
        "accuracy": {"title": "Final validation accuracy (mean ± std over seeds)", "batches": batches,
                     "series": acc, "target": None if target is None else 100 * target,
                     "target_label": f"target {target_text}" if target is not None else None},
        "steps": {"title": f"Optimizer steps to {target_text}", "batches": batches, "series": steps,
                  "not_reached": not_reached, "not_reached_label": f"{NOT_REACHED} within the budget",
                  "ideal": ideal, "fits": fits, "critical_batch": crit.predicted,
                  "recommended": rec},
        "throughput": {"title": "Throughput on this machine", "batches": batches, "series": thr,
                       "time_title": f"Time to {target_text}\n(s; noisy between identical runs, never used for the pick)",
                       "not_reached": time_not_reached},
        "frontier": {"title": "Throughput vs final accuracy", "series": front},
    }


# ------------------------------------------------------------------ markdown

def _fmt(stat: Stat, scale: float = 1.0, digits: int = 2) -> str:
    if stat.mean is None:
        return "—"
    text = f"{stat.mean * scale:.{digits}f}"
    return text + (f" ± {stat.std * scale:.{digits}f}" if stat.n > 1 else "")


def table_lines(summaries: list[BatchSummary]) -> list[str]:
    """The per-batch Markdown table of one rule (mean ± sample std over seeds)."""
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


def _cell(c) -> str:
    return f"{c.rule} at {c.global_batch_size}" if c.rule else f"batch {c.global_batch_size}"


def _pick(rule: str | None, batch: int) -> str:
    return f"{rule} at global batch {batch}" if rule else f"global batch {batch}"


def _steps(c) -> str:
    u = steps_uncertainty(c)
    return f"{c.steps_to_target.mean:.0f}" + (f" ± {u:.0f}" if u else "")


def recommendation_lines(choice: SweepChoice | None, by_rule: dict, target: float | None,
                         tolerance: float) -> list[str]:
    """The report's one answer: rule and batch, how it was chosen, and how sure it is."""
    goal = f"{100 * target:.2f}%" if target is not None else "the target"
    cells = [c for cs in by_rule.values() for c in cs]
    if choice is None:
        finished = [c for c in cells if c.val_accuracy.mean is not None]
        if not finished:
            return ["No point finished without diverging, so nothing can be recommended.", ""]
        best = max(finished, key=lambda c: c.val_accuracy.mean)
        return [f"No rule and batch within {tolerance:g} point(s) of the best final accuracy "
                f"({100 * best.val_accuracy.mean:.2f}%, {_cell(best)}) reached {goal} in every "
                "run, so the sweep recommends nothing: train longer or lower the target.", ""]
    pick = next(c for c in choice.tied if c.rule == choice.rule
                and c.global_batch_size == choice.global_batch_size)
    best = max((c for c in cells if c.val_accuracy.mean is not None), key=lambda c: c.val_accuracy.mean)
    smallest = min((c for c in choice.eligible), key=lambda c: (c.global_batch_size, c.steps_to_target.mean))
    times = [c.time_to_target_s.mean for c in cells if c.time_to_target_s.mean is not None]
    lines = [f"**{_pick(choice.rule, choice.global_batch_size)}**: reaches {goal} "
             f"validation accuracy in {_steps(pick)} optimizer steps and ends at "
             f"{100 * choice.val_accuracy:.2f}% (best: {100 * best.val_accuracy.mean:.2f}%, "
             f"{_cell(best)})."
             + (f" That is {smallest.steps_to_target.mean / choice.steps_to_target:.1f}x fewer steps "
                f"than {_cell(smallest)}, for {_examples(pick) / _examples(smallest):.1f}x its "
                "training examples (steps x batch): the price of fewer steps (McCandlish et al. "
                "2018)." if smallest is not pick else ""), "",
             "How it was chosen (distbatch.measure.recommend.choose_from_sweep): on final accuracy "
             "and optimizer steps to the target, which do not depend on how busy the machine was. "
             "Time to the target is shown but never decides: the seconds of one device"
             + (f" ({min(times):.1f}-{max(times):.1f} s here)" if times else "")
             + " move as much between identical runs as between batches.", "",
             f"1. Eligible: every run finished and reached {goal}, with mean final accuracy "
             f"within {tolerance:g} point(s) of the best: "
             + ", ".join(_cell(c) for c in choice.eligible) + ".",
             "2. Fewest steps to the target, and every eligible cell that differs from it by no "
             "more than the two cells' uncertainties (each the larger of its seed-to-seed std and "
             "the evaluation interval that brackets the crossing): "
             + ", ".join(f"{_cell(c)} ({_steps(c)})" for c in choice.tied) + "."]
    if choice.throughput_used:
        lines.append("3. Time per step (batch / samples/s) separated them by more than its "
                     "seed-to-seed spread; the slower ones were dropped.")
    elif len(choice.tied) > 1:
        lines.append("3. Time per step did not separate them: "
                     + ("one seed, so its spread is not measured." if choice.seeds < 2 else
                        "the differences are within the measured seed-to-seed spread."))
    lines += [f"{4 if len(choice.tied) > 1 else 3}. The smallest global batch among them (the fewest "
              "examples and replicas for the same steps): "
              f"**{_pick(choice.rule, choice.global_batch_size)}**.", "",
              "Uncertainty: " + _uncertainty(choice, pick, cells), ""]
    timed = [(c, step_time(c)) for c in choice.eligible if c.steps_to_target.mean is not None]
    timed = [(c, c.steps_to_target.mean * t[0]) for c, t in timed if t]
    if timed:
        quick, t_quick = min(timed, key=lambda ct: ct[1])
        t_pick = next((t for c, t in timed if c is pick), None)
        if t_pick is not None:
            lines += [f"For information, on this machine alone steps x batch / samples/s predicts "
                      f"{t_pick:.1f} s to the target for the pick" + ("." if quick is pick else
                                         f" and {t_quick:.1f} s for {_cell(quick)}: one device's "
                                         "throughput grows slower than the batch, so there smaller "
                                         "batches finish sooner. Fewer steps pay off when the batch "
                                         "is spread over replicas whose step time stays about "
                                         "constant."), ""]
    return lines


def _examples(c) -> float:
    return c.steps_to_target.mean * c.global_batch_size


def _uncertainty(choice: SweepChoice, pick, cells) -> str:
    others = [c for c in choice.tied if c is not pick]
    parts = []
    if others:
        batches = sorted({c.global_batch_size for c in choice.tied})
        parts.append(f"the steps of {', '.join(_cell(c) for c in others)} cannot be told from the "
                     f"fewest, so global batches {batches[0]}-{batches[-1]} are indistinguishable "
                     "on this sweep's evidence.")
    else:
        parts.append("no other eligible cell is within the uncertainty of the fewest steps.")
    if choice.seeds < 2:
        parts.append("With one seed the seed-to-seed spread is not measured: only the evaluation "
                     "interval bounds steps-to-target, and steps-to-target of identical runs with "
                     "other seeds can differ by more (measure it with more seeds).")
    largest = max(c.global_batch_size for c in cells)
    if choice.global_batch_size == largest:
        parts.append(f"{largest} is the largest batch swept: a larger one may need fewer steps still.")
    near = [c for c in cells if c not in choice.eligible and c.val_accuracy.mean is not None
            and c.steps_to_target.n and c.val_accuracy.mean >= choice.best_val_accuracy
            - (choice.tolerance_points + 1) / 100]
    if near:
        parts.append("Just outside the accuracy tolerance (within one more point): "
                     + ", ".join(f"{_cell(c)} ({100 * c.val_accuracy.mean:.2f}%)" for c in near) + ".")
    return " ".join(parts)


def critical_lines(crit: CriticalBatch, by_rule: dict, rows: list[dict]) -> list[str]:
    """The critical-batch section: one estimate, how it was made, and per rule for stability."""
    if crit.predicted is None and not any(crit.fitted.values()):
        return ["No run measured the gradient noise scale and no rule reached the target at 3 or "
                "more batches, so there is no critical-batch estimate."]
    lines = []
    named = {r: v for r, (v, _, _) in crit.per_rule.items() if v is not None}
    base = next((int(r["base_batch_size"]) for r in rows if finite(r.get("base_batch_size"))), None)
    how = {"base": f"read on each run's trajectory at the step it first reached the target, over "
                   f"the {crit.runs} run(s) at the base batch {base}, where every scaling rule "
                   "trains identically (same lr, same steps), so the estimate does not depend on "
                   "the rule",
           "reached": f"read on each run's trajectory at the step it first reached the target, "
                      f"over the {crit.runs} run(s) that reached it (the base batch was not swept, "
                      "so these runs follow different rules and paths)",
           "end": f"at the END of {crit.runs} run(s): no run reached the target or the rows keep no "
                  "trajectory. The final value grows as the loss falls, so it says how far each "
                  "run trained more than where the critical batch is, and it differs between rules",
           "given": "as given to the report"}
    if crit.predicted is not None:
        lines.append(f"Predicted from the gradient noise scale: **B_crit ≈ {crit.predicted:.0f}**, "
                     f"the median B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018) "
                     f"{how[crit.source]}.")
        if len(named) > 1:
            lines.append("From each rule's rows alone: " + ", ".join(
                f"{label(r)} {v:.0f}" for r, v in named.items()) + ".")
    fitted = {r: f for r, f in crit.fitted.items() if f}
    if fitted:
        parts = []
        for rule, (bc, smin, batches) in fitted.items():
            if bc >= batches[-1] * 999:
                value = f"above {batches[-1]} (steps still halve per doubling)"
            elif bc <= batches[0] / 999:
                value = f"below {batches[0]} (steps do not fall with the batch)"
            else:
                value = f"{bc:.0f}"
            parts.append(f"{label(rule)} {value} (S_min {smin:.0f}, batches {batches[0]}-{batches[-1]})")
        lines += ["", "Measured from the steps to the target: S(B) = S_min (1 + B_crit / B) fitted "
                      "by least squares on log S to the batches that reached it: " + "; ".join(parts)
                  + ". Each rule's fit describes that rule's steps (a rule that fails at large "
                    "batches has fewer points)."]
    table = ["", "| rule | global batch | B_simple at the target | B_simple at the end |", "|---|---:|---:|---:|"]
    shown = False
    for rule, cells in by_rule.items():
        for c in cells:
            ends = Stat.of([float(r["b_simple"]) for r in rows if rule_of(r) == rule and is_ok(r)
                            and r.get("global_batch_size") == c.global_batch_size and finite(r.get("b_simple"))])
            if c.b_simple_at_target.mean is None and ends.mean is None:
                continue
            shown = True
            table.append(f"| {label(rule)} | {c.global_batch_size} | {_fmt(c.b_simple_at_target, 1, 0)} "
                         f"| {_fmt(ends, 1, 0)} |")
    if shown:
        lines += table + ["", "Why not the final B_simple: it grows as the loss falls, so a run's "
                              "final value says how far it trained. Runs that collapse end early "
                              "with a small value, runs that keep training end with a large one; "
                              "the median of the final values therefore differs between rules on "
                              "the same model. Read at the target, every run is at the same "
                              "accuracy."]
    return lines


def _markdown(rows, by_rule, plots, target, machine, crit, choice, tolerance, part_of) -> str:
    backends = sorted({f"{r.get('backend')} ({r.get('replicas')} replica(s))" for r in rows})
    machine = machine or next((r["machine"] for r in rows if isinstance(r.get("machine"), str)), None) \
        or (f"{platform.system()} {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} CPU core(s) (the machine that built this report)")
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    batches = sorted({c.global_batch_size for cells in by_rule.values() for c in cells})
    rules = [label(r) for r in by_rule]
    named = ", ".join(r for r in by_rule if r)
    lines = ["# distbatch sweep report" + (f": {rules[0]}" if part_of else ""), "",
             f"{len(rows)} point(s), " + (f"scaling rule(s) {named}, " if named else "")
             + "global batch sizes "
             f"{', '.join(map(str, batches))}, seeds {seeds}. "
             + (f"Target: validation accuracy >= {100 * target:.2f}%." if target is not None
                else "No target accuracy was recorded; steps/time to target come from the rows."),
             "", f"Machine: {machine}. Backends: {', '.join(backends)}.", ""]
    if part_of:
        lines += [f"One rule of a sweep that compares scaling rules: the recommendation, the "
                  f"critical batch and the plots of every rule together are in [the sweep's "
                  f"report]({part_of}).", ""]
    else:
        lines += ["## Recommendation", ""] + recommendation_lines(choice, by_rule, target, tolerance)
        lines += ["## Critical batch", ""] + critical_lines(crit, by_rule, rows) + [""]
    lines += ["## Results per global batch", "",
              "Mean ± sample standard deviation over seeds of the runs that finished (status ok); "
              "steps and time to target average the runs that reached it (count in \"reached "
              "target\"); diverged runs (loss NaN/inf) are counted, not averaged.", ""]
    for rule, cells in by_rule.items():
        if len(by_rule) > 1:
            lines += [f"### {label(rule)}", ""]
        lines += table_lines(cells) + [""]
    if len(by_rule) > 1:
        lines += _compared_lines(rows, by_rule)
    lines += ["## Why steps-to-target", "",
              "Under a fixed epoch budget (the sweep's default) a batch of B takes N/B steps per "
              "epoch: the smallest batch makes many times more parameter updates than the largest, "
              "and the fixed epoch budget hands it accuracy for that reason alone, not because small "
              "batches generalize better. The fair comparison is the number of steps (or seconds) "
              "needed to reach the same validation target (Shallue et al. 2019, JMLR 20(112)): "
              "with perfect scaling doubling the batch halves the steps; past the critical batch "
              "it stops helping (McCandlish et al. 2018 predict it near the gradient noise scale "
              "B_simple).", ""]
    captions = {"accuracy": "Final validation accuracy and generalization gap vs global batch, one line per rule",
                "throughput": "Throughput and time to target vs global batch, one line per rule",
                "steps": "Steps to target vs global batch (log-log), one line per rule; x: not reached",
                "frontier": "Throughput vs accuracy, one point per rule and batch",
                "curves": "Training curves, one panel row per rule"}
    lines += ["## Plots", ""]
    for key, name in plots.items():
        lines += [f"![{captions[key]}]({name})", ""]
    if "steps" not in plots:
        lines += ["No run reached the target, so there is no steps-to-target plot.", ""]
    if len(by_rule) > 1 and not part_of:
        lines += ["Each rule's own page (its table, plots and training curves):", ""]
        lines += [f"- {label(r)}: [scaling/{r}/{REPORT_NAME}](scaling/{r}/{REPORT_NAME})" for r in by_rule]
        lines.append("")
    return "\n".join(lines)


def _compared_lines(rows, by_rule) -> list[str]:
    """Per global batch, each rule's accuracy, optimizer steps and steps to the target."""
    rules = list(by_rule)
    cells = {rule: {c.global_batch_size: c for c in cs} for rule, cs in by_rule.items()}
    steps: dict = {rule: {} for rule in rules}
    for r in rows:
        if is_ok(r) and finite(r.get("steps")):
            steps[rule_of(r)].setdefault(int(r["global_batch_size"]), []).append(float(r["steps"]))
    batches = sorted({b for cs in cells.values() for b in cs})
    head = "| global batch | " + " | ".join(
        f"{label(r)}: val acc (%) | {label(r)}: optimizer steps | {label(r)}: steps to target"
        for r in rules) + " |"
    lines = ["## Side by side: scaling rules compared", "",
             "AdaScale's length is the base batch's, counted in scale-invariant steps, so its "
             "optimizer steps differ per batch (docs/adascale.md).", "",
             head, "|---:|" + "---:|" * (3 * len(rules))]
    for b in batches:
        out = []
        for rule in rules:
            c = cells[rule].get(b)
            out += [_fmt(c.val_accuracy, 100) if c else "—", _fmt(Stat.of(steps[rule].get(b, [])), 1, 0),
                    (_fmt(c.steps_to_target, 1, 0) if c.steps_to_target.n else NOT_REACHED) if c else "—"]
        lines.append(f"| {b} | " + " | ".join(out) + " |")
    return lines + [""]


# --------------------------------------------------------------------- plots
