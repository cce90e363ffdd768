"""AdaScale vs linear scaling + warmup at a large batch, against the base batch (docs/adascale.md).

The table of Johnson et al. 2020 (AdaScale SGD, table 1) in miniature: for each
workload, the base batch with its own schedule, then S x the base batch with
(a) linear scaling + gradual warmup and (b) AdaScale (no warmup; the length is
the base batch's, counted in scale-invariant steps). Every run is the real
`distbatch train` command in a subprocess; one JSON row per run is appended to
OUT/results.jsonl (a rerun skips finished runs), and OUT/table.md is rebuilt
from the rows: validation accuracy mean +- std over seeds, optimizer steps,
data epochs, training time.

    .venv/bin/python benchmarks/adascale_table.py --workload default --seeds 0,1,2
    .venv/bin/python benchmarks/adascale_table.py --workload goyal --seeds 0,1,2

`--experiment epochs` asks why AdaScale misses on a small data set (docs/adascale.md, "The
Goyal-table workload"): the base batch for its own epochs and for the data epochs AdaScale
passes over (`--long-epochs`, step schedule stretched), AdaScale, and both with the same early
stopping (`--es-metric`, `--es-patience`, best weights restored). It also writes the validation
curve against data epochs and early stopping replayed on each full run's history
(the rule of `--early-stopping-metric`; the trajectory up to a stop is the full run's).

    .venv/bin/python benchmarks/adascale_table.py --experiment epochs --workload goyal --seeds 0,1,2 \
        --out benchmarks/results/adascale_goyal/2026-12-08_data_epochs --points runs/adascale_goyal_epochs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

from result_rows import append_row, done_run_ids, run_training  # benchmarks/, beside this script

BIN = os.path.dirname(sys.executable)

# The README's default sweep recipe (distbatch sweep's defaults) and the Goyal-table benchmark's
# (benchmarks/configs/goyal_table.json), as `distbatch train` flags.
WORKLOADS = {
    "default": {"flags": ["--dataset", "mnist1d", "--model", "convnet", "--epochs", "6",
                          "--base-lr", "0.025", "--base-batch-size", "32", "--decay", "cosine",
                          "--evals-per-epoch", "4"],
                "warmup": ["--warmup", "gradual", "--warmup-epochs", "1"]},
    "goyal": {"flags": ["--dataset", "mnist1d", "--train-size", "10000", "--val-size", "4000",
                        "--model", "mlp", "--epochs", "20", "--base-lr", "0.05",
                        "--base-batch-size", "32", "--decay", "step"],
              "warmup": ["--warmup", "gradual", "--warmup-epochs", "2"]},
}


def _set(flags: list[str], flag: str, value: str) -> list[str]:
    """`flags` with `flag`'s value replaced (appended when absent)."""
    out = list(flags)
    if flag in out:
        out[out.index(flag) + 1] = value
        return out
    return [*out, flag, value]


def _flag(flags: list[str], flag: str) -> str:
    return flags[flags.index(flag) + 1]


def rows_for(workload: str, scale: int, experiment: str = "scaling", long_epochs: float = 54,
             es: tuple[str, int] = ("val_loss", 5), long_lr_factor: float = 0.4) -> list[dict]:
    w = WORKLOADS[workload]
    if experiment == "epochs":  # more data epochs, and the same early stopping for both batches
        base = [*w["flags"], "--warmup", "none"]
        ada = [*w["flags"], "--scaling", "adascale", "--warmup", "none"]
        stop = ["--early-stopping-metric", es[0], "--early-stopping-patience", str(es[1])]
        big = 32 * scale
        return [
            {"id": "base", "label": "base batch 32", "batch": 32, "flags": base},
            {"id": "adascale", "label": f"AdaScale, {scale}x", "batch": big, "flags": ada},
            {"id": "base_long", "label": f"base batch 32, {long_epochs:g} epochs (schedule stretched)",
             "batch": 32, "flags": _set(base, "--epochs", f"{long_epochs:g}")},
            # AdaScale's SDE twin: lr x mean gain / S at the base batch moves each example's
            # update as AdaScale does (lr / batch ratio), over as many data epochs.
            {"id": "base_long_lr", "label": f"base batch 32, {long_epochs:g} epochs, base lr x {long_lr_factor:g}",
             "batch": 32, "flags": _set(_set(base, "--epochs", f"{long_epochs:g}"), "--base-lr",
                                        f"{float(_flag(base, '--base-lr')) * long_lr_factor:.6g}")},
            {"id": f"base_es-{es[0]}-p{es[1]}", "label": f"base batch 32 + early stopping ({es[0]}, patience {es[1]})",
             "batch": 32, "flags": [*base, *stop]},
            {"id": f"adascale_es-{es[0]}-p{es[1]}", "label": f"AdaScale, {scale}x + early stopping ({es[0]}, patience {es[1]})",
             "batch": big, "flags": [*ada, *stop]},
        ]
    if experiment == "goodput":  # fixed batches with AdaScale, and the goodput-adaptive batch
        ada = [*w["flags"], "--scaling", "adascale", "--warmup", "none"]
        rows = [{"id": f"fixed{b}", "label": f"AdaScale, fixed batch {b}", "batch": b, "flags": ada}
                for b in (32 * 2 ** i for i in range(scale.bit_length()))]
        return rows + [{"id": "auto", "label": f"goodput-adaptive batch (max {32 * scale})",
                        "batch": "auto", "flags": [*ada, "--max-global-batch-size", str(32 * scale)]}]
    big = 32 * scale
    return [
        {"id": "base", "label": "base batch 32", "batch": 32, "flags": [*w["flags"], "--warmup", "none"]},
        {"id": "lsw", "label": f"linear + gradual warmup, {scale}x", "batch": big,
         "flags": [*w["flags"], "--scaling", "linear", *w["warmup"]]},
        {"id": "adascale", "label": f"AdaScale, {scale}x", "batch": big,
         "flags": [*w["flags"], "--scaling", "adascale", "--warmup", "none"]},
    ]


def train_argv(row: dict, seed: int, out: str, target: float) -> list[str]:
    return [os.path.join(BIN, "distbatch"), "train", "--backend", "single", *row["flags"],
            "--global-batch-size", str(row["batch"]), "--seed", str(seed),
            "--target-accuracy", str(target), "--out", out, "--overwrite"]


def _defs(args) -> list[dict]:
    """The experiment's rows; with --base-lr the workload's base lr is replaced in every row (a
    row that scales it, base_long_lr, keeps its factor) and the ids and labels say so (the
    same lr offered to every row)."""
    rows = rows_for(args.workload, args.scale, args.experiment, args.long_epochs,
                    (args.es_metric, args.es_patience), args.long_lr_factor)
    if args.base_lr is None:
        return rows
    w_lr = float(_flag(WORKLOADS[args.workload]["flags"], "--base-lr"))
    return [{**r, "id": f"{r['id']}@lr{args.base_lr:g}", "label": f"{r['label']}, base lr {args.base_lr:g}",
             "flags": _set(r["flags"], "--base-lr",
                           f"{args.base_lr * float(_flag(r['flags'], '--base-lr')) / w_lr:.6g}")}
            for r in rows]


def _rows(args) -> list[dict]:
    rows = _defs(args)
    if args.rows:
        unknown = sorted(set(args.rows) - {r["id"] for r in rows})
        if unknown:
            sys.exit(f"adascale_table: --rows: no row {', '.join(unknown)} in --experiment "
                     f"{args.experiment}; expected some of {', '.join(r['id'] for r in rows)}")
        rows = [r for r in rows if r["id"] in args.rows]
    return rows


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = done_run_ids(path)
    for seed in args.seeds:
        for row in _rows(args):
            run_id = f"{args.workload}/{args.experiment}/{row['id']}/S{args.scale}/seed{seed}"
            if run_id in done:
                continue
            out = os.path.join(args.points or os.path.join(args.out, "points"), run_id.replace("/", "_"))
            s, wall = run_training([*args.prefix, *train_argv(row, seed, out, args.target)], out,
                                   runner="adascale_table", run_id=run_id)
            rec = {"run_id": run_id, "row": row["id"], "label": row["label"], "seed": seed,
                   "global_batch_size": row["batch"], "command": " ".join(train_argv(row, seed, out, args.target)[1:]),
                   "wall_s": wall,
                   **{k: s.get(k) for k in ("val_accuracy", "steps", "epochs", "train_time_s",
                                            "steps_to_target", "time_to_target_s", "diverged",
                                            "adascale_mean_gain", "scale_invariant_steps", "b_simple",
                                            "train_accuracy", "train_loss", "val_loss", "best_epoch",
                                            "stopped_epoch", "best_val_loss_epoch")}}
            if args.experiment == "epochs":  # the validation curve, for the replay and the plot table
                rec["history"] = [{k: r.get(k) for k in ("step", "epoch", "val_accuracy", "val_loss",
                                                         "train_loss", "lr")} for r in s["history"]]
            append_row(path, rec)
            print(f"{run_id}: val_acc {rec['val_accuracy']}, steps {rec['steps']}", file=sys.stderr)


def _ms(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} +- {fmt.format(sd)}"


def _command(args) -> str:
    extra = "" if args.base_lr is None else f" --base-lr {args.base_lr:g}"
    extra += (f" --long-epochs {args.long_epochs:g} --long-lr-factor {args.long_lr_factor:g} --es-metric {args.es_metric} --es-patience {args.es_patience}"
             if args.experiment == "epochs" else "")
    return (f"`.venv/bin/python benchmarks/adascale_table.py --experiment {args.experiment} --workload "
            f"{args.workload} --scale {args.scale} --target {args.target:g}{extra} "
            f"--seeds {','.join(map(str, args.seeds))}`")


def _machine() -> str:
    return f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def replay(history: list[dict], metric: str, patience: int) -> dict:
    """Early stopping's rule (Keras's EarlyStopping with restore_best_weights, min_delta 0, as
    `distbatch train --early-stopping-metric` applies it) run over a finished run's evaluations:
    the record whose weights it would restore, with the data epoch at which it would stop. The
    run is the same up to that point: early stopping changes neither the data order nor the lr."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    best, bad, stop = None, 0, history[-1]["epoch"]
    for r in history:
        if best is None or sign * (r[metric] - best[metric]) > 0:
            best, bad = r, 0
            continue
        bad += 1
        if bad >= patience:
            stop = r["epoch"]
            break
    return {**best, "stopped_epoch": stop}


def _at_epoch(history: list[dict], epoch: float) -> dict | None:
    near = min(history, key=lambda r: abs(r["epoch"] - epoch))
    return near if abs(near["epoch"] - epoch) <= 0.5 else None


def epochs_table(args, rows: list[dict]) -> str:
    """Runs, early stopping replayed on the full runs, and the validation curve."""
    defs = _defs(args)
    by = {d["id"]: [r for r in rows if r["row"] == d["id"] and f"/S{args.scale}/" in r["run_id"]
                    and f"/{args.experiment}/" in r["run_id"] and r["seed"] in args.seeds] for d in defs}
    pct = lambda rs, k: _ms([100 * r[k] for r in rs if r.get(k) is not None])  # noqa: E731
    lines = [f"| {args.workload} workload | batch | val accuracy % | train accuracy % | val loss "
             "| optimizer steps | data epochs | restored epoch | mean gain | wall s (with CPU queueing) | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in defs:
        rs = by[d["id"]]
        if rs:
            lines.append(f"| {d['label']} | {d['batch']} | {pct(rs, 'val_accuracy')} | {pct(rs, 'train_accuracy')} "
                         f"| {_ms([r['val_loss'] for r in rs], '{:.3f}')} | {_ms([r['steps'] for r in rs], '{:.0f}')} "
                         f"| {_ms([r['epochs'] for r in rs], '{:.1f}')} | {_ms([r.get('best_epoch') for r in rs], '{:.1f}')} "
                         f"| {_ms([r['adascale_mean_gain'] for r in rs])} | {_ms([r['wall_s'] for r in rs], '{:.0f}')} "
                         f"| {len(rs)} |")
    full = [d for d in defs if "_es" not in d["id"] and by[d["id"]]]
    p = args.es_patience
    lines += ["", f"Early stopping replayed on the full runs' evaluations (one per data epoch; patience {p}, "
              "best weights restored): validation accuracy % at the restored evaluation, and its data epoch.", "",
              "| run | final | val_loss rule | restored at epoch | val_accuracy rule | restored at epoch "
              "| best val accuracy of the run (oracle) | epoch of lowest val loss |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in full:
        rs = by[d["id"]]
        vl = [replay(r["history"], "val_loss", p) for r in rs]
        va = [replay(r["history"], "val_accuracy", p) for r in rs]
        lines.append(f"| {d['label']} | {pct(rs, 'val_accuracy')} | {pct(vl, 'val_accuracy')} "
                     f"| {_ms([r['epoch'] for r in vl], '{:.1f}')} | {pct(va, 'val_accuracy')} "
                     f"| {_ms([r['epoch'] for r in va], '{:.1f}')} "
                     f"| {_ms([100 * max(h['val_accuracy'] for h in r['history']) for r in rs])} "
                     f"| {_ms([min(r['history'], key=lambda h: h['val_loss'])['epoch'] for r in rs], '{:.1f}')} |")
    marks = [1, 2, 3, 5, 8, 11, 15, 20, 25, 30, 35, 40, 45, 50, 54]
    lines += ["", "Validation accuracy % (val loss) against data epochs, mean over seeds:", "",
              "| data epoch | " + " | ".join(d["label"] for d in full) + " |",
              "|---:|" + "---:|" * len(full)]
    for e in marks:
        cells = []
        for d in full:
            pts = [h for h in (_at_epoch(r["history"], e) for r in by[d["id"]]) if h is not None]
            cells.append(f"{_ms([100 * h['val_accuracy'] for h in pts])} ({statistics.mean(h['val_loss'] for h in pts):.3f})"
                         if pts else "")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append(f"\nMachine: {_machine()}. Command: {_command(args)}")
    return "\n".join(lines)


def table(args) -> str:
    rows = [json.loads(line) for line in open(os.path.join(args.out, "results.jsonl")) if line.strip()]
    if args.experiment == "epochs":
        return epochs_table(args, rows)
    t = f"{100 * args.target:g}%"
    lines = [f"| {args.workload} workload | batch | val accuracy % | optimizer steps | data epochs "
             f"| train time s | steps to {t} | time to {t} s | wall s | mean gain | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in _defs(args):
        rs = [r for r in rows if r["row"] == row["id"] and f"/S{args.scale}/" in r["run_id"]
              and f"/{args.experiment}/" in r["run_id"]]
        if not rs:
            continue
        acc = [100 * r["val_accuracy"] if not r["diverged"] else 0.0 for r in rs]
        lines.append(f"| {row['label']} | {row['batch']} | {_ms(acc)} | {_ms([r['steps'] for r in rs], '{:.0f}')} "
                     f"| {_ms([r['epochs'] for r in rs], '{:.1f}')} | {_ms([r['train_time_s'] for r in rs], '{:.1f}')} "
                     f"| {_ms([r['steps_to_target'] for r in rs], '{:.0f}')} "
                     f"| {_ms([r['time_to_target_s'] for r in rs], '{:.1f}')} | {_ms([r['wall_s'] for r in rs], '{:.1f}')} "
                     f"| {_ms([r['adascale_mean_gain'] for r in rs])} | {len(rs)} |")
    lines.append(f"\nMachine: {_machine()}. Command: {_command(args)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    p.add_argument("--scale", type=int, default=32, help="large batch = scale x 32 (default 32)")
    p.add_argument("--experiment", choices=("scaling", "goodput", "epochs"), default="scaling",
                   help="scaling: base vs linear+warmup vs AdaScale at scale x; goodput: AdaScale at "
                        "every fixed batch up to scale x vs the goodput-adaptive batch; epochs: the base "
                        "batch for its own and for --long-epochs data epochs, AdaScale, both with the "
                        "same early stopping")
    p.add_argument("--long-epochs", type=float, default=54,
                   help="epochs: data epochs of the long base-batch row (default 54, AdaScale's at 32x "
                        "on the goyal workload)")
    p.add_argument("--long-lr-factor", type=float, default=0.4,
                   help="epochs: base lr factor of the base_long_lr row (default 0.4: AdaScale's mean "
                        "gain 12.8 / S 32 on the goyal workload)")
    p.add_argument("--es-metric", choices=("val_loss", "val_accuracy"), default="val_loss",
                   help="epochs: early stopping metric of the *_es rows (default val_loss)")
    p.add_argument("--es-patience", type=int, default=5,
                   help="epochs: evaluations without improvement before stopping (default 5)")
    p.add_argument("--rows", type=lambda t: t.split(","), default=None,
                   help="run only these row ids (comma-separated; the table shows every finished row)")
    p.add_argument("--base-lr", type=float, default=None,
                   help="replace every row's base lr (row ids get @lr<value>; default: the workload's)")
    p.add_argument("--prefix", type=str.split, default=[],
                   help="command put before every run, e.g. 'cpu-shared' on a shared machine")
    p.add_argument("--points", default=None,
                   help="directory of the runs' output directories (default OUT/points)")
    p.add_argument("--target", type=float, default=0.7, help="target validation accuracy")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default runs/adascale_<workload>")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/adascale_{args.workload}"
    run(args)
    text = table(args)
    lr = "" if args.base_lr is None else f"_lr{args.base_lr:g}"
    with open(os.path.join(args.out, f"table_{args.experiment}_S{args.scale}{lr}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
