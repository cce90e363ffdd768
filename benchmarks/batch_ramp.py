"""The batch-size ramp against the fixed base batch, fixed AdaScale 32x and the goodput-adaptive
"auto" batch, on the README's default workload (docs/batch_ramp.md).

    .venv/bin/python benchmarks/batch_ramp.py --seeds 0,1,2 \\
        --out benchmarks/results/batch_ramp/2026-12-08_default_ramp_vs_fixed

Every run is the real `distbatch train` command in a subprocess on one device; one JSON row
per run is appended to OUT/results.jsonl (a rerun skips finished runs) and OUT/table.md is
rebuilt from the rows: validation accuracy and optimizer steps, mean +- std over seeds, data
epochs, training time; the ramp's batch trajectory per seed.
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

# The README's default sweep workload (distbatch/measure/sweep.py SWEEP_DEFAULTS: MNIST-1D, conv
# net, base lr 0.025 at batch 32, cosine decay, 6 epochs, 4 evaluations per epoch), as
# benchmarks/adascale_table.py's "default" workload gives it; no warmup (at the base batch the
# sweep's warmup is flat: it starts at the base lr).
DEFAULT = ["--dataset", "mnist1d", "--model", "convnet", "--epochs", "6", "--base-lr", "0.025",
           "--base-batch-size", "32", "--decay", "cosine", "--evals-per-epoch", "4",
           "--warmup", "none"]


def rows(scale: int) -> list[dict]:
    big = 32 * scale
    return [
        {"id": "base", "label": "fixed base batch 32", "batch": "32", "flags": [*DEFAULT]},
        {"id": "ramp", "label": f"ramp 32 -> <= {big}, factor 1 (largest <= B_simple)",
         "batch": "ramp", "factor": 1.0,
         "flags": [*DEFAULT, "--scaling", "linear", "--max-global-batch-size", str(big)]},
        {"id": "ramp_f2", "label": f"ramp 32 -> <= {big}, factor 2 (largest <= 2 x B_simple)",
         "batch": "ramp", "factor": 2.0,
         "flags": [*DEFAULT, "--scaling", "linear", "--max-global-batch-size", str(big)]},
        {"id": "adascale", "label": f"AdaScale, fixed {scale}x ({big})", "batch": str(big),
         "flags": [*DEFAULT, "--scaling", "adascale"]},
        {"id": "auto", "label": f"goodput-adaptive auto (max {big})", "batch": "auto",
         "flags": [*DEFAULT, "--scaling", "adascale", "--max-global-batch-size", str(big)]},
    ]


# A row with "factor" runs the CLI with batch_ramp.RAMP_FACTOR set to it (the library constant;
# there is no flag for it).
FACTOR_CLI = ("import sys; import distbatch.training.batch_ramp as r; r.RAMP_FACTOR = {f}; "
              "from distbatch.cli import main; sys.exit(main(sys.argv[1:]))")


def train_argv(row: dict, seed: int, out: str, target: float) -> list[str]:
    cli = ([sys.executable, "-c", FACTOR_CLI.format(f=row["factor"])] if "factor" in row
           else [os.path.join(BIN, "distbatch")])
    return [*cli, "train", "--backend", "single", *row["flags"],
            "--global-batch-size", row["batch"], "--seed", str(seed),
            "--target-accuracy", str(target), "--out", out, "--overwrite"]


KEYS = ("val_accuracy", "steps", "epochs", "train_time_s", "wall_time_s", "steps_to_target",
        "time_to_target_s", "diverged", "adascale_mean_gain", "scale_invariant_steps", "b_simple",
        "batch_trajectory", "batch_ramp")


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = done_run_ids(path)
    for seed in args.seeds:
        for row in rows(args.scale):
            if args.rows and row["id"] not in args.rows:
                continue
            run_id = f"{row['id']}/seed{seed}"
            if run_id in done:
                continue
            out = os.path.join(args.points or os.path.join(args.out, "points"), run_id.replace("/", "_"))
            argv = train_argv(row, seed, out, args.target)
            s, wall = run_training([*args.prefix, *argv], out, runner="batch_ramp", run_id=run_id)
            rec = {"run_id": run_id, "row": row["id"], "label": row["label"], "seed": seed,
                   "command": " ".join(argv[1:]), "command_wall_s": wall,
                   **{k: s.get(k) for k in KEYS},
                   "segments": [{k: g.get(k) for k in ("start_epoch", "global_batch_size", "steps",
                                                       "b_simple", "b_noise", "lr_factor")}
                                for g in s.get("segments", [])]}
            append_row(path, rec)
            print(f"{run_id}: val {rec['val_accuracy']:.4f}, {rec['steps']} steps, "
                  f"{rec['epochs']} epochs", flush=True)
    write_table(args.out, args.scale)


def _ms(values, fmt="{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} +- {fmt.format(sd)}"


def write_table(out: str, scale: int) -> str:
    recs = [json.loads(line) for line in open(os.path.join(out, "results.jsonl")) if line.strip()]
    base = [r for r in recs if r["row"] == "base"]
    base_acc = statistics.mean(r["val_accuracy"] for r in base) if base else None
    base_steps = statistics.mean(r["steps"] for r in base) if base else None
    lines = ["| | seeds | val accuracy % | vs base (points) | optimizer steps | steps vs base | "
             "data epochs | train time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows(scale):
        rs = [r for r in recs if r["row"] == row["id"]]
        if not rs:
            continue
        acc = statistics.mean(r["val_accuracy"] for r in rs)
        steps = statistics.mean(r["steps"] for r in rs)
        d_acc = f"{(acc - base_acc) * 100:+.2f}" if base_acc is not None else "-"
        d_steps = f"{(steps / base_steps - 1) * 100:+.0f}%" if base_steps else "-"
        lines.append(f"| {row['label']} | {len(rs)} | {_ms([r['val_accuracy'] * 100 for r in rs])} | "
                     f"{d_acc} | {_ms([r['steps'] for r in rs], '{:.0f}')} | {d_steps} | "
                     f"{_ms([r['epochs'] for r in rs])} | {_ms([r['train_time_s'] for r in rs], '{:.1f}')} |")
    lines += ["", "Batch trajectories ([start step, global batch] per change) and B_simple at each "
              "epoch end:", ""]
    for r in recs:
        if r["row"] in ("ramp", "ramp_f2", "auto"):
            traj = r.get("batch_trajectory") or []
            changes = [t for i, t in enumerate(traj) if i == 0 or t[1] != traj[i - 1][1]]
            noise = [round(g.get("b_simple") or g.get("b_noise") or 0, 1) for g in r["segments"]]
            lines.append(f"- {r['row']} seed {r['seed']}: {changes}; noise scale {noise}")
    lines += ["", f"Machine: {platform.machine()}, {platform.python_version()}; one device "
              "(--backend single). Commands: the `command` of each row in results.jsonl."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--scale", type=int, default=32, help="max batch = 32 x SCALE (default 32)")
    p.add_argument("--target", type=float, default=0.975, help="target accuracy for steps_to_target")
    p.add_argument("--rows", type=lambda s: s.split(","), default=None,
                   help="only these rows (base, ramp, ramp_f2, adascale, auto)")
    p.add_argument("--out", default="benchmarks/results/batch_ramp/2026-12-08_default_ramp_vs_fixed")
    p.add_argument("--points", default=None, help="where the runs' directories go (default OUT/points)")
    p.add_argument("--prefix", type=lambda s: s.split(), default=[],
                   help="a command to run each training under, e.g. 'cpu-shared'")
    p.add_argument("--table-only", action="store_true", help="rebuild table.md from results.jsonl")
    args = p.parse_args(argv)
    if args.table_only:
        write_table(args.out, args.scale)
    else:
        run(args)


if __name__ == "__main__":
    main()
