"""Training-loop speed of this checkout against another one (a regression check).

    python benchmarks/checkout_speed.py --prev DIR --backend mirrored --pairs 8 --out FILE.jsonl

DIR is another distbatch checkout (e.g. `git worktree add /tmp/prev <commit>`). Each pair runs
`distbatch train` of this checkout and of DIR back to back (the same venv, the same flags, the
same .npz), alternating which goes first; each run's own `train_time_s` (summary.json: the
timed training calls, without start-up, compilation, evaluations and checkpoints) is what is
compared. The result is the median over pairs of prev_time / this_time (above 1: this checkout
is faster) with the range, since one pair on a shared 2-core machine moves by +-10%.

Unlike loop_overhead.py's whole-process differentials, start-up and evaluation do not enter,
so fewer steps suffice; it answers only "is the loop itself slower than before".
Run it alone (`cpu-exclusive`): any other load on the machine shows up in the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from benchmarks.loop_overhead import write_data  # noqa: E402
from benchmarks.result_rows import append_row  # noqa: E402


def train_argv(root: str, backend: str, data: str, steps: int, out: str) -> list[str]:
    """`distbatch train` of the checkout at `root` (python -P: the working directory must not
    shadow PYTHONPATH), under `distbatch launch horovod` for horovod."""
    train = [sys.executable, "-P", "-m", "distbatch.cli", "train", "--backend", backend,
             "--dataset", data, "--model", "mlp", "--global-batch-size", "256",
             "--steps", str(steps), "--out", out]
    if backend == "mirrored":
        train += ["--cpu-replicas", "2"]
    if backend == "horovod":
        return [sys.executable, "-P", "-m", "distbatch.cli", "launch", "horovod", "--gloo", "-np",
                "2", "-H", "localhost:2", "--", *train]
    return train


RUN_TIMEOUT_S = 1800  # one `distbatch train` of --steps steps, start-up included


def train_time(root: str, argv: list[str], out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    try:
        subprocess.run(argv, cwd=root, env={**os.environ, "PYTHONPATH": root}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sys.exit(f"checkout_speed: `distbatch train` of {root} did not finish within "
                 f"{RUN_TIMEOUT_S} s; it was stopped")
    with open(os.path.join(out, "summary.json")) as f:
        return float(json.load(f)["train_time_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prev", required=True, help="root of the other distbatch checkout")
    p.add_argument("--backend", choices=("single", "mirrored", "horovod"), default="mirrored")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--out", help="append one JSON row per pair here")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="checkout_speed_")
    data = os.path.join(work, "mnist1d-16384-4096.npz")
    write_data(data, 16384, 4096)
    roots = {"this": HERE, "prev": os.path.abspath(args.prev)}
    ratios = []
    for i in range(args.pairs):
        order = ("this", "prev") if i % 2 == 0 else ("prev", "this")
        t = {name: train_time(roots[name], train_argv(roots[name], args.backend, data, args.steps,
                                                       os.path.join(work, name)),
                              os.path.join(work, name)) for name in order}
        ratios.append(t["prev"] / t["this"])
        row = {"pair": i + 1, "backend": args.backend, "steps": args.steps,
               "train_time_s": t, "prev_over_this": ratios[-1]}
        print(json.dumps(row), flush=True)
        if args.out:
            append_row(args.out, row)
    print(f"{args.backend}: this checkout {statistics.median(ratios):.3f}x the speed of "
          f"{args.prev} (median of {len(ratios)} pairs, range {min(ratios):.3f}-{max(ratios):.3f})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
