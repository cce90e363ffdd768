"""`distbatch plan`: predicted time to the target accuracy for each (workers, global batch), from
a sweep directory and a link (distbatch.measure.cluster_plan holds the model; docs/plan.md)."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from distbatch.errors import ParameterError, UsageError
from distbatch.fileio import atomic_write_text
from distbatch.measure import cluster_plan as cp

STEP_TIME_FROM = "sweep|probe|FILE"
PROBE_TIMEOUT_S = 600  # one `distbatch bench` child: start-up, compile and 30 short steps


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``distbatch plan``; the handler is ``args.handler``."""
    p = subparsers.add_parser(
        "plan", help="predict time-to-target on 1..N workers from a sweep and a link (never trains)",
        description="Predict the time to the sweep's target accuracy for each (workers, global "
                    "batch): the sweep's steps to the target x one step's time on n workers "
                    "(one worker's step time at the per-worker batch + the ring all-reduce over "
                    "the link). Marks the fastest cell and the cheapest in worker-seconds.")
    p.add_argument("--sweep", required=True, metavar="DIR", help="a `distbatch sweep --out` directory")
    p.add_argument("--workers", default="1,2,4,...,64", metavar="LIST",
                   help='worker counts, e.g. "1,2,4,8" or "1,2,4,...,64" (default)')
    p.add_argument("--link", required=True, metavar="LINK",
                   help='"1gbit", "10gbit", "100mbit" (nominal rate, no added latency) or '
                        '"BANDWIDTH[,LATENCY]" like "2.5gbit,50us"')
    p.add_argument("--batches", default=None, metavar="LIST",
                   help="global batches (default: the sweep's); others get steps interpolated "
                        "in log batch between measured ones")
    p.add_argument("--rule", default=None, help="the sweep's scaling rule to plan (default: every rule)")
    p.add_argument("--step-time-from", default="sweep", metavar=STEP_TIME_FROM,
                   help="one worker's step time per batch: 'sweep' (its samples/s on one worker; "
                        "default), 'probe' (measured now on this machine: `distbatch bench` in a child process) or a "
                        'JSON file {"step_time_s": {"BATCH": SECONDS}}')
    p.add_argument("--grad-bytes", type=float, default=None, metavar="BYTES",
                   help="bytes all-reduced a step (default: the model's weights in the sweep)")
    p.add_argument("--allreduces-per-step", type=int, default=1, metavar="K",
                   help="all-reduce calls a step, each paying the ring's latency 2(n-1) times (1)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(handler=run_plan)
    return p


def validate_plan_args(args: argparse.Namespace):
    """(workers, link, batches) of the flags, checked before any file is read; UsageError
    naming the flag."""
    try:
        workers = cp.parse_workers(args.workers)
        link = cp.parse_link(args.link)
        batches = cp.parse_batches(args.batches) if args.batches is not None else None
        if args.grad_bytes is not None and not (math.isfinite(args.grad_bytes) and args.grad_bytes > 0):
            raise ParameterError(f"{{grad_bytes}} must be a finite number > 0, got {args.grad_bytes:g}",
                                 "grad_bytes")
        if args.allreduces_per_step < 1:
            raise ParameterError(f"{{allreduces_per_step}} must be >= 1, got {args.allreduces_per_step}",
                                 "allreduces_per_step")
    except ParameterError as e:
        raise e.for_flags() from None
    return workers, link, batches


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``distbatch plan``: every error one line naming its flag (exit 2)."""
    workers, link, batches = validate_plan_args(args)
    try:
        rows = cp.read_sweep(args.sweep)
        rules = cp.steps_to_target(rows)
        if args.rule is not None:
            names = [r.rule or "measured" for r in rules]
            if args.rule not in names:
                raise ParameterError(f"{{rule}} {args.rule!r} is not in the sweep; it has "
                                     f"{', '.join(names)}", "rule")
            rules = [r for r in rules if (r.rule or "measured") == args.rule]
        grad_bytes = args.grad_bytes if args.grad_bytes is not None else cp.gradient_bytes(args.sweep)
        grid = batches or sorted({int(r["global_batch_size"]) for r in rows})
        times = step_times(args.step_time_from, args.sweep, rows, workers, grid)
        plans = [cp.make_plan(stt, times, link, grad_bytes, workers, grid, args.allreduces_per_step)
                 for stt in rules]
    except ParameterError as e:
        raise e.for_flags() from None
    print("\n\n".join(cp.format_plan(p) for p in plans))
    if args.json:
        atomic_write_text(args.json, json.dumps({"schema": "distbatch.plan/1", "sweep": args.sweep,
                                                 "plans": [p.as_dict() for p in plans]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def step_times(source: str, sweep: str, rows: list[dict], workers: list[int], grid: list[int]) -> cp.StepTimes:
    if source == "sweep":
        return cp.step_times_from_sweep(rows)
    if source == "probe":
        per_worker = sorted({B // n for B in grid for n in workers if B % n == 0})
        return step_times_from_probe(sweep, per_worker)
    if not source:
        raise UsageError(f"--step-time-from must be {STEP_TIME_FROM}, got {source!r}")
    return cp.step_times_from_file(source)


def probe_argv(model: str, shape: tuple, classes: int, batch: int, json_path: str,
               iters: int = 5, steps_per_iter: int = 5) -> list[str]:
    """`distbatch bench` on one replica at per-worker batch `batch` (the probe's command)."""
    return [sys.executable, "-m", "distbatch.cli", "bench", "--backend", "single", "--model", model,
            "--input-shape", "x".join(str(d) for d in shape), "--num-classes", str(classes),
            "--per-replica-batch-size", str(batch), "--iters", str(iters),
            "--steps-per-iter", str(steps_per_iter), "--warmup-iters", "1", "--quiet", "--json", json_path]


def step_times_from_probe(directory: str, batches: list[int], iters: int = 5, steps_per_iter: int = 5) -> cp.StepTimes:
    """Measure t_1(b) on this machine at each per-worker batch with `distbatch bench` (the real
    distbatch step on random inputs, one replica, SGD; a child process, so the plan's own
    process never loads TensorFlow): the median iteration / steps_per_iter."""
    model, shape, classes = cp.model_of_sweep(directory)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in sorted(set(batches)):
            path = os.path.join(tmp, f"bench_{b}.json")
            try:
                done = subprocess.run(probe_argv(model, shape, classes, b, path, iters, steps_per_iter),
                                      capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise UsageError(f"--step-time-from probe: `distbatch bench` at per-worker batch {b} "
                                 f"did not finish within {PROBE_TIMEOUT_S} s; it was stopped") from None
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UsageError(f"--step-time-from probe: `distbatch bench` at per-worker batch {b} failed: {last}")
            its = sorted(json.loads(Path(path).read_text())["iteration_seconds"])
            seconds[b] = its[len(its) // 2] / steps_per_iter
    return cp.StepTimes(seconds, "probe (distbatch bench's step, one replica, this machine)")
