"""Large-batch rules for Adam at 32x the base batch (docs/adaptive_scaling.md, issue #29 item 1).

Adam with its lr tuned at batch 32, then batch 1024 (k = 32) under four rules, several seeds,
the same number of epochs (AdaScale: the same number of BASE-batch epochs, counted in
scale-invariant steps):

    linear         lr x k                                   + gradual warmup over 1/6 of training
    sqrt           lr x sqrt(k)                             + the same warmup
    adaptive-sqrt  Malladi et al. 2022: lr x sqrt(k), 1-beta x k, eps / sqrt(k) (betas capped at 0)
                                                            + the same warmup
    adascale       lr = gain ** 0.5 x schedule(tau), tau += gain, no warmup

Every cell is the real `distbatch train` command in a subprocess (the one written in each row).
One JSON row per run is appended to OUT/rows.jsonl (a rerun skips the runs already there) and
OUT/table.md is rebuilt from the rows: final validation accuracy mean +- sample std over seeds,
its difference to the base batch, optimizer steps, data epochs.

    .venv/bin/python benchmarks/adaptive_scaling.py --workload default --experiment tune --seeds 0
    .venv/bin/python benchmarks/adaptive_scaling.py --workload default --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/adaptive_scaling.py --workload digits --seeds 0,1,2,3,4

`--experiment tune` trains the base batch at each lr of the workload's grid (the evidence for the
tuned lr); `--table-only` rebuilds table.md from OUT/rows.jsonl without training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile

from result_rows import append_row, done_run_ids, run_training  # benchmarks/, beside this script

BIN = os.path.dirname(sys.executable)
BASE_BATCH = 32
RULES = ("linear", "sqrt", "adaptive-sqrt", "adascale")

# `distbatch train` flags of each workload. "default" is what `distbatch sweep` trains when given
# no flags (SWEEP_DEFAULTS in distbatch/measure/sweep.py: MNIST-1D 20k train / 4k val, the conv
# net, 6 epochs, cosine decay, 4 evaluations per epoch), with Adam instead of momentum. "digits" is the conv net
# (Conv2D) on scikit-learn's 8x8 digits (1,438 train / 359 val images), 30 epochs: at batch 1024
# that is one step per epoch. `lr` is the Adam lr picked at batch 32 by `--experiment tune`
# (best final validation accuracy of the grid, seed 0; table in docs/adaptive_scaling.md).
WORKLOADS = {
    "default": {"flags": ["--dataset", "mnist1d", "--model", "convnet", "--epochs", "6",
                          "--decay", "cosine", "--evals-per-epoch", "4"],
                "warmup_epochs": 1.0, "lr": 0.01, "grid": (0.001, 0.003, 0.006, 0.01, 0.02)},
    "digits": {"flags": ["--dataset", "digits", "--model", "convnet", "--epochs", "30",
                         "--decay", "cosine", "--evals-per-epoch", "1"],
               "warmup_epochs": 5.0, "lr": 0.003, "grid": (0.001, 0.003, 0.01)},
}
ROW_KEYS = ("val_accuracy", "val_loss", "train_accuracy", "steps", "epochs", "train_time_s",
            "diverged", "peak_lr", "beta_1", "beta_2", "epsilon", "scaling_capped",
            "adascale_lr_exponent", "adascale_mean_gain", "scale_invariant_steps", "b_simple")


def cells(workload: str, experiment: str, batches: list[int], rules: list[str],
          lr: float | None = None) -> list[dict]:
    """The runs of one seed: id, label, batch, and the `distbatch train` flags."""
    w = WORKLOADS[workload]
    common = [*w["flags"], "--optimizer", "adam", "--base-batch-size", str(BASE_BATCH)]
    if experiment == "tune":
        return [{"id": f"tune_lr{g:g}", "label": f"base batch 32, lr {g:g}", "batch": BASE_BATCH,
                 "rule": "none", "lr": g,
                 "flags": [*common, "--base-lr", f"{g:g}", "--scaling", "none", "--warmup", "none"]}
                for g in w["grid"]]
    lr = w["lr"] if lr is None else lr
    common = [*common, "--base-lr", f"{lr:g}"]
    out = [{"id": "base", "label": "base batch", "batch": BASE_BATCH, "rule": "none", "lr": lr,
            "flags": [*common, "--scaling", "none", "--warmup", "none"]}]
    warmup = ["--warmup", "gradual", "--warmup-epochs", f"{w['warmup_epochs']:g}"]
    for batch in batches:
        for rule in rules:
            flags = [*common, "--scaling", rule, *(["--warmup", "none"] if rule == "adascale" else warmup)]
            out.append({"id": f"{rule}_b{batch}", "label": rule, "batch": batch, "rule": rule,
                        "lr": lr, "flags": flags})
    return out


def train_argv(cell: dict, seed: int, out: str) -> list[str]:
    return [os.path.join(BIN, "distbatch"), "train", "--backend", "single", *cell["flags"],
            "--global-batch-size", str(cell["batch"]), "--seed", str(seed), "--out", out,
            "--overwrite"]


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.jsonl")
    done = done_run_ids(path)
    for seed in args.seeds:
        for cell in cells(args.workload, args.experiment, args.batches, args.rules, args.lr):
            run_id = f"{args.workload}/{cell['id']}/lr{cell['lr']:g}/seed{seed}"
            if run_id in done:
                continue
            scratch = tempfile.mkdtemp(prefix="adaptive_scaling-")
            argv = train_argv(cell, seed, os.path.join(scratch, "run"))
            try:
                s, wall = run_training(argv, os.path.join(scratch, "run"), runner="adaptive_scaling",
                                       run_id=run_id)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            argv[argv.index("--out") + 1] = "OUT"
            row = {"run_id": run_id, "workload": args.workload, "experiment": args.experiment,
                   "cell": cell["id"], "label": cell["label"], "rule": cell["rule"],
                   "global_batch_size": cell["batch"], "k": cell["batch"] / BASE_BATCH,
                   "base_lr": cell["lr"], "seed": seed, "wall_s": round(wall, 2),
                   "command": " ".join(["distbatch", *argv[1:]]),
                   **{k: s.get(k) for k in ROW_KEYS}}
            append_row(path, row)
            print(f"{run_id}: val_acc {row['val_accuracy']}, steps {row['steps']}, {wall:.1f} s",
                  file=sys.stderr, flush=True)


def _ms(values, scale=1.0, fmt="{:.2f}") -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} +- {fmt.format(sd)}"


def _acc(r: dict) -> float:
    return 0.0 if r["diverged"] or r["val_accuracy"] is None else 100 * r["val_accuracy"]


def _hyper(r: dict) -> str:
    if r["rule"] == "adascale":
        return f"gain^{r['adascale_lr_exponent']:g} x {r['base_lr']:g}"
    text = f"{r['peak_lr']:.4g}"
    if r["rule"] == "adaptive-sqrt":
        capped = r.get("scaling_capped") or []
        b1 = f"{r['beta_1']:.3g}" + (" (capped)" if "beta_1" in capped else "")
        b2 = f"{r['beta_2']:.4g}" + (" (capped)" if "beta_2" in capped else "")
        text += f"; b1 {b1}, b2 {b2}, eps {r['epsilon']:.3g}"
    return text


def table(rows: list[dict], workload: str, commands: list[str]) -> str:
    w = WORKLOADS[workload]
    order = list(dict.fromkeys(r["cell"] for r in rows))
    by = {c: [r for r in rows if r["cell"] == c] for c in order}
    base = by.get("base")
    base_mean = statistics.mean(_acc(r) for r in base) if base else None
    lines = [f"Workload `{workload}`: `{' '.join(w['flags'])}`, Adam, base batch {BASE_BATCH}.", "",
             "| rule | batch | lr (and betas, eps) | val accuracy % | vs base (points) | optimizer steps "
             "| data epochs | mean gain | diverged | seeds |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in order:
        rs = by[c]
        accs = [_acc(r) for r in rs]
        delta = "" if c == "base" or base_mean is None else f"{statistics.mean(accs) - base_mean:+.2f}"
        gain = _ms([r.get("adascale_mean_gain") for r in rs]) if rs[0]["rule"] == "adascale" else ""
        lines.append(f"| {rs[0]['label']} | {rs[0]['global_batch_size']} | {_hyper(rs[0])} | {_ms(accs)} "
                     f"| {delta} | {_ms([r['steps'] for r in rs], fmt='{:.0f}')} "
                     f"| {_ms([r['epochs'] for r in rs], fmt='{:.1f}')} | {gain} "
                     f"| {sum(bool(r['diverged']) for r in rs)} | {len(rs)} |")
    lines += ["", f"Machine: {platform.machine()} {platform.system()} {platform.release()}, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}. "
              f"{sum(r['wall_s'] for r in rows) / 60:.1f} min of runs. Commands (in this order):", "",
              *(f"    {c}" for c in commands)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    p.add_argument("--experiment", choices=("main", "tune"), default="main",
                   help="main: the base batch and each rule at --batches; tune: the base batch at "
                        "each lr of the workload's grid")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1024],
                   help="large global batches (default 1024 = 32x)")
    p.add_argument("--rules", type=lambda t: [x for x in t.split(",") if x], default=list(RULES),
                   help=f"rules at each large batch (default {','.join(RULES)})")
    p.add_argument("--lr", type=float, default=None, help="base lr (default: the workload's tuned one)")
    p.add_argument("--out", default=None, help="default benchmarks/results/adaptive_scaling/"
                                                "<date>_<workload>_<experiment>")
    p.add_argument("--table-only", action="store_true", help="rebuild table.md from OUT/rows.jsonl")
    args = p.parse_args(argv)
    bad = [r for r in args.rules if r not in RULES]
    if bad:
        p.error(f"--rules: unknown {bad[0]!r}; choose from {', '.join(RULES)}")
    here = os.path.dirname(os.path.abspath(__file__))
    args.out = args.out or os.path.join(here, "results", "adaptive_scaling",
                                        f"{datetime.date.today():%Y-%m-%d}_{args.workload}_{args.experiment}")
    commands_path = os.path.join(args.out, "commands.txt")  # every invocation that added rows
    if not args.table_only:
        os.makedirs(args.out, exist_ok=True)
        command = " ".join([".venv/bin/python benchmarks/adaptive_scaling.py",
                            *(argv if argv is not None else sys.argv[1:])])
        known = open(commands_path).read().splitlines() if os.path.exists(commands_path) else []
        if command not in known:
            with open(commands_path, "a") as f:
                f.write(command + "\n")
        run(args)
    rows = [json.loads(line) for line in open(os.path.join(args.out, "rows.jsonl")) if line.strip()]
    commands = open(commands_path).read().splitlines() if os.path.exists(commands_path) else []
    text = table(rows, args.workload, commands)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
