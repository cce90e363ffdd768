"""The sweep report's plots: one line per scaling rule, drawn from report.plot_data's plain
numbers (the tests check those numbers, not pixels). Points that never reached the target are
marked at the top of their axis, labelled "not reached within the budget"; the target is
named in each title and legend."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distbatch.fileio import atomic_write
from distbatch.measure.results import finite, rule_of

PLOT_NAMES = {
    "accuracy": "accuracy_gap.png",
    "throughput": "throughput.png",
    "steps": "steps_to_target.png",
    "frontier": "frontier.png",
    "curves": "curves.png",
}
NOT_REACHED = "not reached"


def save_plot(out: Path, key: str, data: Any) -> str:
    """Draw plot `key` from `data` (plot_data's entry; the rows for "curves") into out/NAME;
    returns NAME."""
    # matplotlib: only here, and only when a report is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rules = len({rule_of(r) for r in data}) if key == "curves" else 1
    size = {"steps": (8.0, 4.4), "throughput": (8.0, 4.2),
            "curves": (6.4, 2.8 * max(1, rules))}.get(key, (6.4, 4.2))
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no pyplot, no global backend switch
    DRAW[key](fig, data)
    fig.tight_layout()
    name = PLOT_NAMES[key]
    atomic_write(out / name, lambda f: fig.savefig(f, format="png"))
    return name


def _colors(names) -> dict:
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _batch_axis(ax, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("global batch size")
    ax.grid(True, alpha=0.3)


def _mark_not_reached(ax, batches: list[int], color: str, text: str) -> None:
    """An 'x' at the top of the axis for each batch that never reached the target."""
    if not batches:
        return
    top = ax.get_ylim()[1]
    ax.scatter(batches, [top] * len(batches), marker="x", s=60, color=color, clip_on=False,
               label=text, zorder=5)


def _lines(ax, data: dict, colors: dict, x: str, y: str, err: str) -> None:
    """One line with error bars per rule: series[name][x], [y], [err]."""
    for name, s in data["series"].items():
        ax.errorbar(s[x], s[y], yerr=s[err], marker="o", capsize=3, color=colors[name], label=name)


def _draw_accuracy(fig, data: dict) -> None:
    acc_ax, gap_ax = fig.subplots(1, 2)
    colors = _colors(data["series"])
    _lines(acc_ax, data, colors, "batch", "val", "val_err")
    _lines(gap_ax, data, colors, "gap_batch", "gap", "gap_err")
    for ax, ylabel in ((acc_ax, "validation accuracy (%)"), (gap_ax, "train - val accuracy (points)")):
        _batch_axis(ax, data["batches"])
        ax.set_ylabel(ylabel)
    if data["target"] is not None:
        acc_ax.axhline(data["target"], color="gray", ls=":", label=data["target_label"])
    acc_ax.legend(fontsize=7)
    acc_ax.set_title(data["title"], fontsize=8)


def _draw_throughput(fig, data: dict) -> None:
    sps_ax, time_ax = fig.subplots(1, 2)
    colors = _colors(data["series"])
    _lines(sps_ax, data, colors, "batch", "sps", "err")
    _lines(time_ax, data, colors, "time_batch", "time", "time_err")
    _batch_axis(sps_ax, data["batches"])
    _batch_axis(time_ax, data["batches"])
    sps_ax.set_ylabel("training samples / s")
    sps_ax.set_title(data["title"], fontsize=9)
    time_ax.set_ylabel("seconds")
    time_ax.set_title(data["time_title"], fontsize=8)
    for name in data["series"]:
        _mark_not_reached(time_ax, data["not_reached"].get(name, []), colors[name],
                          f"{name}: {NOT_REACHED}")
    sps_ax.legend(fontsize=7)
    time_ax.legend(fontsize=7)


def _draw_steps(fig, data: dict) -> None:
    ax = fig.subplots()
    colors = _colors(data["series"])
    for name, s in data["series"].items():
        ax.errorbar(s["batch"], s["steps"], yerr=s["err"], marker="o", capsize=3,
                    color=colors[name], label=name)
        fit = data["fits"].get(name)
        if fit:
            ax.plot(fit["batch"], fit["steps"], ":", color=colors[name], lw=1,
                    label=f"{name}: S_min(1 + B_crit/B), B_crit {fit['b_crit']:.0f}")
    ideal = data["ideal"]
    if ideal["batch"]:
        ax.plot(ideal["batch"], ideal["steps"], "k--", lw=1, label="perfect scaling (Shallue et al. 2019)")
    if data["critical_batch"] is not None:
        ax.axvline(data["critical_batch"], color="tab:red", ls=":",
                   label=f"B_simple at the target ({data['critical_batch']:.0f})")
    rec = data["recommended"]
    if rec is not None and rec["steps"] is not None:
        ax.scatter([rec["batch"]], [rec["steps"]], s=160, facecolors="none", edgecolors="black",
                   zorder=6, label=f"recommended: {rec['label']} at {rec['batch']}")
    _batch_axis(ax, data["batches"])
    ax.set_yscale("log", base=2)
    ax.set_ylabel("optimizer steps")
    ax.set_title(data["title"], fontsize=9)
    for name in data["series"]:
        _mark_not_reached(ax, data["not_reached"].get(name, []), colors[name],
                          f"{name}: {data['not_reached_label']}")
    ax.legend(fontsize=6)


def _draw_frontier(fig, data: dict) -> None:
    ax = fig.subplots()
    colors = _colors(data["series"])
    for name, s in data["series"].items():
        pts = sorted(zip(s["sps"], s["acc"], s["batch"]), key=lambda p: -p[0])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors[name], label=name)
        for sps, acc, batch in pts:
            ax.annotate(f"B={batch}", (sps, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
        frontier, best = [], -math.inf  # Pareto: no other point is both faster and more accurate
        for sps, acc, _ in pts:
            if acc > best:
                frontier.append((sps, acc))
                best = acc
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "--", color=colors[name], lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training samples / s")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(data["title"] + " (dashed: each rule's frontier)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _draw_curves(fig, rows) -> None:
    """Training curves of the lowest seed of each batch, one row of panels per rule."""
    rules = sorted({rule_of(r) for r in rows}, key=str)
    axes = fig.subplots(len(rules), 2, squeeze=False)
    for (loss_ax, acc_ax), rule in zip(axes, rules):
        first: dict[int, dict] = {}
        for row in sorted((r for r in rows if rule_of(r) == rule),
                          key=lambda r: (r["global_batch_size"], r.get("seed") or 0)):
            if isinstance(row.get("history"), list) and row["history"]:
                first.setdefault(int(row["global_batch_size"]), row)
        for i, (batch, row) in enumerate(sorted(first.items())):
            color = f"C{i % 10}"
            epochs = [h.get("epoch", j + 1) for j, h in enumerate(row["history"])]
            for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
                for split, style in (("train", "-"), ("val", "--")):
                    values = [h.get(f"{split}_{metric}") for h in row["history"]]
                    values = [v if finite(v) else math.nan for v in values]
                    ax.plot(epochs, values, style, color=color,
                            label=f"B={batch} {split}" if metric == "loss" else None)
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
        loss_ax.legend(fontsize=5)
        acc_ax.set_title(f"{rule or 'the rule'}: solid train, dashed val", fontsize=8)


DRAW = {"accuracy": _draw_accuracy, "throughput": _draw_throughput, "steps": _draw_steps,
        "frontier": _draw_frontier, "curves": _draw_curves}
