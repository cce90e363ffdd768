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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

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


def rows_for(workload: str, scale: int, experiment: str = "scaling") -> list[dict]:
    w = WORKLOADS[workload]
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


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(path):
        done = {json.loads(line)["run_id"] for line in open(path) if line.strip()}
    for seed in args.seeds:
        for row in rows_for(args.workload, args.scale, args.experiment):
            run_id = f"{args.workload}/{args.experiment}/{row['id']}/S{args.scale}/seed{seed}"
            if run_id in done:
                continue
            out = os.path.join(args.out, "points", run_id.replace("/", "_"))
            t0 = time.perf_counter()
            proc = subprocess.run(train_argv(row, seed, out, args.target), capture_output=True, text=True)
            if proc.returncode not in (0, 3):
                sys.exit(f"adascale_table: {run_id} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            rec = {"run_id": run_id, "row": row["id"], "label": row["label"], "seed": seed,
                   "global_batch_size": row["batch"], "command": " ".join(train_argv(row, seed, out, args.target)[1:]),
                   "wall_s": time.perf_counter() - t0,
                   **{k: s.get(k) for k in ("val_accuracy", "steps", "epochs", "train_time_s",
                                            "steps_to_target", "time_to_target_s", "diverged",
                                            "adascale_mean_gain", "scale_invariant_steps", "b_simple")}}
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{run_id}: val_acc {rec['val_accuracy']}, steps {rec['steps']}", file=sys.stderr)


def _ms(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} +- {fmt.format(sd)}"


def table(args) -> str:
    rows = [json.loads(line) for line in open(os.path.join(args.out, "results.jsonl")) if line.strip()]
    t = f"{100 * args.target:g}%"
    lines = [f"| {args.workload} workload | batch | val accuracy % | optimizer steps | data epochs "
             f"| train time s | steps to {t} | time to {t} s | wall s | mean gain | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows_for(args.workload, args.scale, args.experiment):
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
    lines.append(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}. Command: `.venv/bin/python benchmarks/adascale_table.py "
                 f"--experiment {args.experiment} --workload {args.workload} --scale {args.scale} --target {args.target:g} --seeds {','.join(map(str, args.seeds))}`")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    p.add_argument("--scale", type=int, default=32, help="large batch = scale x 32 (default 32)")
    p.add_argument("--experiment", choices=("scaling", "goodput"), default="scaling",
                   help="scaling: base vs linear+warmup vs AdaScale at scale x; goodput: AdaScale at "
                        "every fixed batch up to scale x vs the goodput-adaptive batch")
    p.add_argument("--target", type=float, default=0.7, help="target validation accuracy")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default runs/adascale_<workload>")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/adascale_{args.workload}"
    run(args)
    text = table(args)
    with open(os.path.join(args.out, f"table_{args.experiment}_S{args.scale}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
