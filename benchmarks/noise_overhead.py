"""Overhead of the gradient noise scale: step time with and without --noise-scale.

For each backend (single; mirrored on 2 logical CPUs) one subprocess builds the
model once and compiles TWO train steps from distbatch.training.step.make_train_step on
the same model, data pipeline and global batch: noise_scale off and on, exactly
as the Trainer configures them (several replicas: every step measures, the
per-replica gradient is the small batch; one replica: every --noise-every-th
step, default 1 as the Trainer does, runs the batch as 2 micro-batches). Timed blocks of N steps alternate off/on (so load drift on a
shared machine hits both alike); the result is the median block time of each,
the median of the per-pair ratios on/off, and the ratio of the fastest blocks
(the least disturbed by other processes on a busy machine).

    .venv/bin/python benchmarks/noise_overhead.py --out noise_overhead.json

The timed loop calls the step like the Trainer does (outputs fetched once per
block), after warm-up steps that include compilation.
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


def measure(backend_name: str, args: argparse.Namespace) -> dict:
    """In this process: time blocks of steps with the noise scale off and on."""
    from distbatch.backends import create_backend
    backend, _ = create_backend(backend_name, cpu_replicas=2 if backend_name == "mirrored" else None)
    import keras

    from distbatch.training import pipeline
    from distbatch.data.datasets import load_dataset
    from distbatch.models import build_model
    from distbatch.training.plan import BatchPlan
    from distbatch.training.step import StepOptions, make_train_step

    data = load_dataset(args.dataset, train_size=args.train_size, val_size=256)
    plan = BatchPlan.derive(global_batch_size=args.global_batch_size, replicas=backend.num_replicas,
                            num_train_examples=len(data.x_train))
    keras.utils.set_random_seed(0)
    with backend.scope():
        model = build_model(args.model, data.input_shape, data.num_classes)
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    backend.prepare(model, optimizer)
    # As distbatch.training.trainer.Trainer does: several replicas measure on every step; one replica
    # splits the batch in 2 (a second, slower step function) on every `noise_every`-th step.
    splits = 2 if plan.replicas == 1 else 1
    every = args.noise_every if plan.replicas == 1 else 1
    total = args.warmup_steps + 1 + args.repeats * args.steps_per_repeat
    plain = make_train_step(backend, model, optimizer, plan)
    noisy = make_train_step(backend, model, optimizer, plan,
                            options=StepOptions(noise_scale=True, noise_splits=splits))
    schedules = {"off": lambda i: plain, "on": lambda i: noisy if (i + 1) % every == 0 else plain}
    iterators = {name: iter(backend.distribute(lambda w, L: pipeline.train_dataset(
        data.x_train, data.y_train, plan, seed=0, worker_index=w, local_replicas=L,
        total_steps=total))) for name in schedules}
    counters = {name: 0 for name in schedules}

    def block(name: str, n: int) -> float:
        pick, it = schedules[name], iterators[name]
        t0 = time.perf_counter()
        for _ in range(n):
            out = pick(counters[name])(it)
            counters[name] += 1
        float(out["loss_sum"].numpy())  # wait for the last step
        return (time.perf_counter() - t0) / n

    for name in schedules:
        block(name, args.warmup_steps)
    float(noisy(iterators["on"])["loss_sum"])  # compile the measuring step too
    times = {"off": [], "on": []}
    for r in range(args.repeats):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")  # no fixed first/second bias
        for name in order:
            times[name].append(block(name, args.steps_per_repeat))
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    med_off, med_on = statistics.median(times["off"]), statistics.median(times["on"])
    import tensorflow as tf
    return {"backend": backend_name, "tensorflow": tf.__version__, "replicas": plan.replicas,
            "noise_splits_on": splits, "noise_every": every,
            "model": args.model, "dataset": args.dataset, "global_batch_size": plan.global_batch_size,
            "per_replica_batch_size": plan.per_replica_batch_size,
            "repeats": args.repeats, "steps_per_repeat": args.steps_per_repeat,
            "step_ms_off": 1e3 * med_off, "step_ms_on": 1e3 * med_on,
            "ratio_of_medians": med_on / med_off, "median_ratio": statistics.median(ratios),
            "ratio_of_minimums": min(times["on"]) / min(times["off"]),
            "step_ms_off_all": [1e3 * t for t in times["off"]],
            "step_ms_on_all": [1e3 * t for t in times["on"]]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="single,mirrored")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--train-size", type=int, default=8192)
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9, help="timed blocks per setting (default 9)")
    p.add_argument("--steps-per-repeat", type=int, default=40, help="steps per timed block (default 40)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--noise-every", type=int, default=1,
                   help="one replica: split-batch measurement every N steps (default 1: every "
                        "step, as the Trainer does; its first version used 8)")
    p.add_argument("--out", default="noise_overhead.json", help="JSON output file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print("RESULT " + json.dumps(measure(args.worker, args)), flush=True)
        return 0
    rows = []
    passthrough = list(sys.argv[1:] if argv is None else argv)
    for name in args.backends.split(","):
        # One process per backend: logical CPU devices are fixed once TensorFlow starts.
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--worker", name],
                              capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{'backend':>9} {'replicas':>8} {'batch':>6} {'off ms/step':>12} {'on ms/step':>11} "
          f"{'on/off (medians)':>17} {'median on/off':>14} {'on/off (min)':>13}")
    for r in rows:
        print(f"{r['backend']:>9} {r['replicas']:>8} {r['global_batch_size']:>6} {r['step_ms_off']:>12.3f} "
              f"{r['step_ms_on']:>11.3f} {r['ratio_of_medians']:>17.3f} {r['median_ratio']:>14.3f} "
              f"{r['ratio_of_minimums']:>13.3f}")
    machine = {"platform": platform.platform(), "processor": _cpu_model(),
               "cpus": os.cpu_count(), "python": platform.python_version(),
               "loadavg_at_end": os.getloadavg()}
    machine["tensorflow"] = rows[0].get("tensorflow") if rows else None
    result = {"command": " ".join([os.path.relpath(sys.argv[0])] + passthrough), "machine": machine,
              "rows": rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
