"""Goyal et al. 2017's large-minibatch table, in miniature, on MNIST-1D.

Goyal, Dollar, Girshick et al., "Accurate, Large Minibatch SGD: Training
ImageNet in 1 Hour" (arXiv:1706.02677), Tables 1-2 / Figure 2: ResNet-50 at
batch 256 vs 8k (k = 32) with the linear scaling rule lr = k * base_lr and 5
epochs of gradual warmup matches the small batch (23.74 vs 23.60 % top-1
error); no warmup (24.84), constant warmup (25.88), no scaling (41.67) and
sqrt scaling (26.22) do not. This script reruns that comparison at small
scale -- base batch 32 vs 32x (1024) and 64x (2048), plus LARS (You et al.
2017, arXiv:1708.03888) -- with several seeds, through the real
``distbatch train`` code path (``distbatch.training.job.train`` with the
TrainConfig the CLI's own parser and ``config_from_args`` build from the flags,
in one process that reuses one backend and one dataset: TensorFlow starts once).

Everything comes from a JSON configuration (benchmarks/configs/goyal_table.json):
``common`` flags, ``seeds``, an optional ``lr_check`` (the runs used to pick
the base lr, on a seed the table does not use) and ``rows`` (one table row
each: id, label, global batch, flags overriding ``common``).

Each finished run is appended as one row to ``<out>/results.jsonl`` (and
``results.csv``) with ``distbatch.measure.results.append_row`` (atomic). Rerunning
skips runs already present, so a killed benchmark resumes where it stopped.
The markdown table (``<out>/table.md``) is rebuilt from the rows only; it
never reruns anything (``--table-only``).

Usage::

    .venv/bin/python benchmarks/goyal_table.py --out runs/goyal_table
    .venv/bin/python benchmarks/goyal_table.py --quick --out /tmp/goyal_quick
    .venv/bin/python benchmarks/goyal_table.py --table-only --out runs/goyal_table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from distbatch.errors import UsageError, require  # noqa: E402

DEFAULT_CONFIG = os.path.join(HERE, "configs", "goyal_table.json")
LR_CHECK = "lrcheck"


# ---------------------------------------------------------------- configuration

def load_config(path: str, *, quick: bool) -> dict:
    """Read the JSON configuration; with ``quick`` apply its ``quick`` overrides."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path!r} is not a readable JSON file: {e}") from None
    for key in ("common", "seeds", "rows"):
        require(key in cfg, f"--config {path!r} lacks the key {key!r}")
    ids = [r["id"] for r in cfg["rows"]]
    require(len(set(ids)) == len(ids), f"--config {path!r} has duplicate row ids: {ids}")
    if quick:
        q = cfg.get("quick", {})
        cfg["common"] = {**cfg["common"], **q.get("common", {})}
        cfg["seeds"] = q.get("seeds", cfg["seeds"][:1])
        cfg["rows"] = [r for r in cfg["rows"] if r["id"] not in q.get("drop_rows", ())]
        if q.get("skip_lr_check"):
            cfg.pop("lr_check", None)
    return cfg


def flags_to_argv(flags: dict) -> list[str]:
    """{"train-size": 10000, "resume": True} -> ["--train-size", "10000", "--resume"]."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is False or value is None:
            continue
        argv.append(f"--{name}")
        if value is not True:
            argv.append(str(value))
    return argv


def plan_runs(cfg: dict) -> list[dict]:
    """Every run of the benchmark, in order: lr check first, then rows x seeds.

    A run is {"run_id", "row_id", "seed", "global_batch_size", "flags"}; run_id
    is the resume key (e.g. ``"a/seed=1"``, ``"lrcheck/bs=32/lars/base_lr=0.5/seed=100"``).
    """
    runs = []
    check = cfg.get("lr_check")
    if check:
        for r in check["runs"]:
            flags = {**cfg["common"], **check.get("flags", {}), **r.get("flags", {})}
            run_id = (f"{LR_CHECK}/bs={r['global_batch_size']}/{flags['optimizer']}/"
                      f"base_lr={flags['base-lr']}/seed={check['seed']}")
            runs.append({"run_id": run_id, "row_id": LR_CHECK, "seed": check["seed"],
                         "global_batch_size": r["global_batch_size"], "flags": flags})
    for seed in cfg["seeds"]:  # seed-major: an interrupted run still has whole seeds of every row
        for row in cfg["rows"]:
            runs.append({"run_id": f"{row['id']}/seed={seed}", "row_id": row["id"], "seed": seed,
                         "global_batch_size": row["global_batch_size"],
                         "flags": {**cfg["common"], **row.get("flags", {})}})
    return runs


def config_for_run(parser: argparse.ArgumentParser, run: dict, out_dir: str):
    """The TrainConfig `distbatch train` would build for this run (quiet)."""
    from distbatch.cli.train import config_from_args
    point = run["run_id"].replace("/", "_").replace("=", "")
    argv = flags_to_argv({**run["flags"], "global-batch-size": run["global_batch_size"],
                          "seed": run["seed"], "out": os.path.join(out_dir, "points", point),
                          "overwrite": True})
    return config_from_args(parser.parse_args(argv), progress=False)


# ---------------------------------------------------------------- running

def train_parser() -> argparse.ArgumentParser:
    from distbatch.cli.train import add_train_args
    p = argparse.ArgumentParser(prog="distbatch train")
    add_train_args(p)
    return p


def run_all(cfg: dict, out_dir: str) -> int:
    """Train every run not yet in ``out_dir/results.jsonl``; returns runs trained."""
    from distbatch.measure import results
    from distbatch.cli.sweep import summary_to_row

    runs = plan_runs(cfg)
    done = results.done_point_ids(out_dir)
    todo = [r for r in runs if r["run_id"] not in done]
    print(f"goyal_table: {len(runs)} runs, {len(runs) - len(todo)} already in {out_dir}",
          file=sys.stderr, flush=True)
    if not todo:
        return 0
    parser = train_parser()
    for r in todo:  # every flag set is checked before the first run trains
        config_for_run(parser, r, out_dir)

    from distbatch.backends import create_backend
    from distbatch.data.datasets import load_dataset
    from distbatch.training.job import train
    common = cfg["common"]
    backend, _ = create_backend(common.get("backend", "single"), cpu_replicas=common.get("cpu-replicas"))
    data = load_dataset(common.get("dataset", "mnist1d"), seed=common.get("data-seed", 0),
                        train_size=common.get("train-size"), val_size=common.get("val-size"))
    started = time.perf_counter()
    for i, r in enumerate(todo):
        config = config_for_run(parser, r, out_dir)
        t0 = time.perf_counter()
        summary, _code = train(config, backend=backend, data=data)
        status = "diverged" if summary.get("diverged") else "ok"
        row = summary_to_row(summary, r["run_id"], status)
        row.update(row_id=r["row_id"], scaling_rule=summary.get("scaling_rule"),
                   warmup=summary.get("warmup"), base_lr=summary.get("base_lr"),
                   lars_eta=summary.get("lars_eta"), run_wall_s=time.perf_counter() - t0,
                   history=None)  # the per-run history stays in points/*/summary.json
        results.append_row(out_dir, row)
        elapsed = time.perf_counter() - started
        acc = row.get("val_accuracy")
        print(f"[{i + 1}/{len(todo)}] {r['run_id']:<40} {status:>8}  val_acc "
              f"{'-' if acc is None else f'{acc:.4f}'}  peak_lr {row['peak_lr']:.4g}  "
              f"{row['run_wall_s']:.1f}s  (elapsed {elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
    results.sync_csv(out_dir)
    return len(todo)


# ---------------------------------------------------------------- table

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _pm(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    m, s = mean_std([v * scale for v in values])
    return f"{m:.2f} ± {s:.2f}"


def make_table(cfg: dict, rows: list[dict]) -> str:
    """Markdown tables (main + lr check) from result rows; accuracies in percent.

    Diverged runs count in the ``diverged`` column and are left out of the
    means (their final accuracy is chance or undefined), as Goyal report
    only converged runs.
    """
    by_row: dict[str, list[dict]] = {}
    for r in rows:
        by_row.setdefault(r.get("row_id"), []).append(r)
    base_ok = [r for r in by_row.get(cfg["rows"][0]["id"], []) if r["status"] == "ok"]
    base_mean = mean_std([r["val_accuracy"] for r in base_ok])[0] * 100 if base_ok else None
    lines = [
        "| row | recipe | global batch | k | peak lr | warmup steps | val acc % (mean ± std) "
        "| Δ vs base (points) | train acc % | gap (train - val) points | runs ok / diverged "
        "| Goyal ResNet-50 top-1 err % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base_batch = cfg["common"].get("base-batch-size", 32)
    for spec in cfg["rows"]:
        got = by_row.get(spec["id"], [])
        ok = [r for r in got if r["status"] == "ok"]
        val = [r["val_accuracy"] for r in ok]
        delta = "-"
        if val and base_mean is not None and spec["id"] != cfg["rows"][0]["id"]:
            delta = f"{mean_std(val)[0] * 100 - base_mean:+.2f}"
        flags = {**cfg["common"], **spec.get("flags", {})}
        opt = flags.get("optimizer", "momentum")
        label = spec["label"]
        if opt != cfg["common"].get("optimizer", "momentum") or flags["base-lr"] != cfg["common"]["base-lr"]:
            label += f" ({opt}, base lr {flags['base-lr']})"
        peak = got[0]["peak_lr"] if got else None
        wsteps = got[0]["warmup_steps"] if got else None
        lines.append(
            f"| {spec['id']} | {label} | {spec['global_batch_size']} "
            f"| {spec['global_batch_size'] / base_batch:g} | {'-' if peak is None else f'{peak:.4g}'} "
            f"| {'-' if wsteps is None else wsteps} | {_pm(val)} | {delta} "
            f"| {_pm([r['train_accuracy'] for r in ok])} | {_pm([r['generalization_gap'] for r in ok])} "
            f"| {len(ok)} / {len(got) - len(ok)} | {spec.get('goyal_top1_err', '')} |")
    checks = by_row.get(LR_CHECK, [])
    if checks:
        lines += ["", "Learning-rate check (one seed not used above, picks `base-lr`):", "",
                  "| run | optimizer | global batch | base lr | peak lr | val acc % | train acc % | status |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in checks:
            acc = r.get("val_accuracy")
            tr = r.get("train_accuracy")
            lines.append(f"| {r['point_id']} | {r.get('optimizer')} | {r['global_batch_size']} "
                         f"| {r.get('base_lr')} | {r['peak_lr']:.4g} "
                         f"| {'-' if acc is None else f'{acc * 100:.2f}'} "
                         f"| {'-' if tr is None else f'{tr * 100:.2f}'} | {r['status']} |")
    return "\n".join(lines) + "\n"


def write_table(cfg: dict, out_dir: str, wall_s: float | None) -> str:
    from distbatch.measure import results
    from distbatch.fileio import atomic_write_json
    rows = results.read_rows(out_dir)
    text = make_table(cfg, rows)
    path = os.path.join(out_dir, "table.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    meta = {"command": " ".join([os.path.relpath(sys.executable)] + sys.argv),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "wall_time_s_this_invocation": wall_s, "runs": len(rows),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if wall_s is not None:  # --table-only keeps the meta of the run that trained
        atomic_write_json(os.path.join(out_dir, "benchmark_meta.json"), meta)
    return path


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="benchmark configuration (JSON)")
    p.add_argument("--out", default="runs/goyal_table", help="results directory (resumable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke version: small data, 2 epochs, one seed, no lr check")
    p.add_argument("--table-only", action="store_true", help="rebuild table.md from the rows; train nothing")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, quick=args.quick)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmark_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        t0 = time.perf_counter()
        if not args.table_only:
            run_all(cfg, args.out)
        path = write_table(cfg, args.out, None if args.table_only else time.perf_counter() - t0)
    except UsageError as e:
        print(f"goyal_table: error: {e}", file=sys.stderr)
        return 2
    print(open(path, encoding="utf-8").read())
    print(f"goyal_table: table at {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
