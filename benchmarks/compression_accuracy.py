"""Final accuracy with fp16 gradient compression vs none, on the embedded default (docs/scaling.md).

Issue 17's accuracy target: fp16 compression ends within 0.5 points of the uncompressed
run. Each run is the real command: `distbatch train` with the README sweep's recipe
(benchmarks/adascale_table.py WORKLOADS["default"]: MNIST-1D, conv net, 6 epochs, linear
scaling from lr 0.025 at batch 32, 1 epoch gradual warmup, cosine) on 2 Horovod ranks
(`distbatch launch horovod --gloo -np 2`, where the fp16 all-reduce sums the two ranks'
halves in float16) or any other backend, `--grad-compression none` and `fp16` with the same
seeds. The table gives mean +- std over seeds and the paired difference (same seed: same
initial weights and data order, so only the compression differs).

    .venv/bin/python benchmarks/compression_accuracy.py --batches 128,512 --seeds 0,1,2
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

from adascale_table import BIN, WORKLOADS, _ms

COMPRESSIONS = ("none", "fp16")


def train_argv(backend: str, batch: int, seed: int, compression: str, out: str) -> list[str]:
    w = WORKLOADS["default"]
    argv = [os.path.join(BIN, "distbatch"), "train", "--backend", backend, *w["flags"], *w["warmup"],
            "--scaling", "linear", "--global-batch-size", str(batch), "--seed", str(seed),
            "--grad-compression", compression, "--out", out, "--overwrite"]
    if backend == "horovod":
        return [os.path.join(BIN, "distbatch"), "launch", "horovod", "--gloo", "-np", "2",
                "-H", "localhost:2", "--", *argv]
    if backend == "mirrored":
        return [*argv, "--cpu-replicas", "2"]
    return argv


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = {json.loads(line)["run_id"] for line in open(path) if line.strip()} if os.path.exists(path) else set()
    for seed in args.seeds:
        for batch in args.batches:
            for comp in COMPRESSIONS:  # interleaved: a seed's pair runs back to back
                run_id = f"{args.backend}/B{batch}/{comp}/seed{seed}"
                if run_id in done:
                    continue
                out = os.path.join(args.out, "points", run_id.replace("/", "_"))
                argv = train_argv(args.backend, batch, seed, comp, out)
                t0 = time.perf_counter()
                proc = subprocess.run(argv, capture_output=True, text=True)
                if proc.returncode not in (0, 3):  # 3: diverged, a result too (summary.json written)
                    sys.exit(f"compression_accuracy: {run_id} failed ({proc.returncode}): {proc.stderr[-2000:]}")
                with open(os.path.join(out, "summary.json")) as f:
                    s = json.load(f)
                rec = {"run_id": run_id, "backend": args.backend, "batch": batch, "compression": comp,
                       "seed": seed, "command": " ".join(argv), "wall_s": time.perf_counter() - t0,
                       **{k: s.get(k) for k in ("val_accuracy", "val_loss", "train_accuracy", "steps",
                                                "diverged", "replicas", "workers")}}
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{run_id}: val_acc {rec['val_accuracy']:.4f}", file=sys.stderr, flush=True)


def table(args) -> str:
    rows = [json.loads(line) for line in open(os.path.join(args.out, "results.jsonl")) if line.strip()]
    lines = ["| backend | global batch | none: val accuracy % | fp16: val accuracy % "
             "| fp16 - none, paired (points) | standard error of that mean | max abs paired | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batches:
        acc = {c: {r["seed"]: 100 * r["val_accuracy"] for r in rows if r["batch"] == batch
                   and r["compression"] == c and r["backend"] == args.backend} for c in COMPRESSIONS}
        seeds = sorted(set(acc["none"]) & set(acc["fp16"]))
        if not seeds:
            continue
        diff = [acc["fp16"][s] - acc["none"][s] for s in seeds]
        lines.append(f"| {args.backend} | {batch} | {_ms([acc['none'][s] for s in seeds])} "
                     f"| {_ms([acc['fp16'][s] for s in seeds])} | {_ms(diff)} "
                     f"| {(statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0):.2f} "
                     f"| {max(abs(d) for d in diff):.2f} | {len(seeds)} |")
    lines.append(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}. Command: `.venv/bin/python benchmarks/compression_accuracy.py "
                 f"--backend {args.backend} --batches {','.join(map(str, args.batches))} "
                 f"--seeds {','.join(map(str, args.seeds))}`")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("single", "mirrored", "horovod"), default="horovod")
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[128, 512])
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--out", default="runs/compression_accuracy")
    args = p.parse_args(argv)
    run(args)
    text = table(args)
    with open(os.path.join(args.out, f"table_{args.backend}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
