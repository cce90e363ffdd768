"""Check `distbatch plan` against measured 2- and 4-worker runs over an emulated link (issue 29, item 4).

    cpu-shared    .venv/bin/python benchmarks/plan_check.py sweep    --out DIR
    cpu-exclusive .venv/bin/python benchmarks/plan_check.py steptime --out DIR --batch 256 --repeat R
    cpu-exclusive .venv/bin/python benchmarks/plan_check.py run      --out DIR --batch 256 --workers 2 --repeat R
    .venv/bin/python benchmarks/plan_check.py report --out DIR

(as root: `run` makes network namespaces). What each step does:

- `sweep`: `distbatch sweep` of the check's recipe (mlp-wide on MNIST-1D, 34.0 MB of float32
  gradients, SGD with momentum, linear scaling from 0.025 at 32, 1 warmup epoch, cosine, 4
  epochs of 10,000 examples, target 60% validation accuracy, 3 seeds): steps to the target per
  global batch.
- `steptime`: one worker's step time t_1(b) under the cluster's core sharing, measured with the
  command a user runs (`distbatch train --backend single`, its in-process samples_per_sec):
  b = B/2 alone on one core (taskset -c 0) for 2 workers, which get a core each; b = B/4 as
  TWO processes on the same core at once for 4 workers, which run 2 ranks per core (2 ranks in
  each of the 2 namespaces, a namespace's ranks pinned to its one core).
- `run`: B over n = 2 or 4 Horovod ranks (Gloo) in two network namespaces joined by a veth pair
  limited by tbf (benchmarks/scale_out.py's link), seed = the repeat (0, 1, 2: the sweep's
  seeds), the same recipe (all 4 epochs: `train` has no flag to stop at the target); the chief's summary.json gives the measured
  time to the target (time_to_target_s: training time until the evaluation that first saw the
  target; evaluations and the compiling first step are not in it) and steps_to_target.
  The ring over ranks 0-1 | 2-3 crosses the link once each way, so each direction carries
  2(n-1)/n x bytes a step, as with one rank per machine.
- `report`: runs `distbatch plan --sweep DIR/sweep --workers n --link <measured bandwidth>
  --step-time-from <the steptime file for n>` and compares its time to the target at B with the
  median measured one (medians over repeats); writes report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_out as so  # noqa: E402  (the emulated link: namespaces, tbf, bandwidth, Horovod env)

BIN = Path(sys.executable).parent
# The check's recipe, every flag explicit so that `distbatch sweep` and `distbatch train` (whose
# defaults differ: base lr, warmup cap, evaluations) run the same thing.
RECIPE = ["--model", "mlp-wide", "--dataset", "mnist1d", "--train-size", "10000", "--val-size", "1000",
          "--target-accuracy", "0.6", "--evals-per-epoch", "4", "--optimizer", "momentum",
          "--base-lr", "0.025", "--base-batch-size", "32", "--scaling", "linear", "--warmup", "gradual",
          "--warmup-epochs", "1", "--decay", "cosine"]
EPOCHS = ["--epochs", "4"]  # the sweep's and the runs' budget (train has no stop-at-target flag)
SEEDS = 3


def append(out: Path, row: dict) -> None:
    so.append_row(out / "rows.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row})


def rows(out: Path) -> list[dict]:
    path = out / "rows.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def cmd_sweep(a) -> None:
    argv = [str(BIN / "distbatch"), "sweep", *RECIPE, *EPOCHS, "--no-noise-scale", "--batch-sizes", a.batches,
            "--seeds", str(SEEDS), "--out", str(a.out / "sweep")]
    print(" ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def train_argv(backend: str, batch: int, seed: int, out: str, extra=()) -> list[str]:
    return [str(BIN / "distbatch"), "train", "--backend", backend, *RECIPE, "--global-batch-size", str(batch),
            "--seed", str(seed), *extra, "--out", out, "--overwrite"]


def cmd_steptime(a) -> None:
    """t_1(B/2) alone on core 0, t_1(B/4) as two processes sharing core 0."""
    env = so.base_env()
    for n, procs in ((2, 1), (4, 2)):
        b = a.batch // n
        outs = [str(a.out / "runs" / f"steptime_b{b}_p{procs}_r{a.repeat}_{i}") for i in range(procs)]
        # a fixed step count (no target): the step's time does not depend on the lr
        ps = [subprocess.Popen(["taskset", "-c", "0", *train_argv("single", b, a.repeat, o,
                                                                   ["--steps", str(a.steps)])],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for o in outs]
        for p in ps:
            if p.wait(timeout=900):
                raise RuntimeError(p.stderr.read()[-2000:])
        sps = [json.loads((Path(o) / "summary.json").read_text())["samples_per_sec"] for o in outs]
        row = {"kind": "steptime", "workers": n, "per_worker_batch": b, "processes_per_core": procs,
               "repeat": a.repeat, "steps": a.steps, "samples_per_sec": sps,
               "step_time_s": statistics.fmean(b / s for s in sps)}
        append(a.out, row)
        print(json.dumps(row), flush=True)


def cmd_run(a) -> None:
    n, per_ns = a.workers, a.workers // 2
    so.make_link()
    try:
        so.set_rate(a.link)
        if not any(r["kind"] == "link" and r["link"] == a.link for r in rows(a.out)):
            bw = statistics.median(so.measure_bandwidth(256 << 20) for _ in range(3))
            append(a.out, {"kind": "link", "link": a.link, "bytes_per_s": bw})
        env = so.base_env()
        hosts = [so.IP[i // per_ns] for i in range(n)]
        rdv = subprocess.Popen(["ip", "netns", "exec", so.NS[0], sys.executable, so.__file__, "_rendezvous",
                                ",".join(f"{ip}:{per_ns}" for ip in so.IP)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        port = int(rdv.stdout.readline())
        outs = [str(a.out / "runs" / f"run_B{a.batch}_n{n}_r{a.repeat}_{i}") for i in range(n)]
        procs = []
        t0 = time.perf_counter()
        for i in range(n):
            ns = i // per_ns
            wenv = {**env, **so.hvd_env(i, n, port, hosts, so.DEV[ns]),
                    "HOROVOD_LOCAL_RANK": str(i % per_ns), "HOROVOD_LOCAL_SIZE": str(per_ns),
                    "HOROVOD_CROSS_RANK": str(ns), "HOROVOD_CROSS_SIZE": "2"}
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", so.NS[ns], "taskset", "-c", str(ns),
                 *train_argv("horovod", a.batch, a.repeat, outs[i], EPOCHS)],
                env=wenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        texts = [p.communicate(timeout=1500)[0] for p in procs]
        wall = time.perf_counter() - t0
        rdv.stdin.close()
        rdv.wait(timeout=30)
        if any(p.returncode for p in procs):
            raise RuntimeError("a worker failed:\n" + "\n".join(t[-2000:] for t in texts))
    finally:
        so.delete_link()
    s = json.loads((Path(outs[0]) / "summary.json").read_text())
    row = {"kind": "run", "link": a.link, "workers": n, "global_batch": a.batch, "repeat": a.repeat,
           "seed": a.repeat, "wall_s": wall, **{k: s.get(k) for k in (
               "steps_to_target", "time_to_target_s", "samples_per_sec", "train_time_s", "steps",
               "val_accuracy")}}
    append(a.out, row)
    print(json.dumps(row), flush=True)


def plan_for(out: Path, n: int, batch: int, link_bps: float) -> dict:
    """`distbatch plan` for n workers with the step time measured under n's core sharing."""
    times = [r for r in rows(out) if r["kind"] == "steptime" and r["workers"] == n]
    b = batch // n
    t = statistics.median(r["step_time_s"] for r in times if r["per_worker_batch"] == b)
    path = out / f"step_time_n{n}.json"
    path.write_text(json.dumps({"step_time_s": {str(b): t}, "from": f"benchmarks/plan_check.py steptime, "
                                f"median of {len(times)} repeats"}) + "\n")
    argv = [str(BIN / "distbatch"), "plan", "--sweep", str(out / "sweep"), "--workers", str(n),
            "--batches", str(batch), "--link", f"{link_bps * 8 / 1e6:.1f}mbit", "--step-time-from", str(path),
            "--json", str(out / f"plan_n{n}.json")]
    text = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    cell = json.loads((out / f"plan_n{n}.json").read_text())["plans"][0]["cells"][0]
    return {"argv": argv, "text": text, "cell": cell}


def fmt(values: list[float], digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} +- {sd:.{digits}f}"


def cmd_report(a) -> None:
    rs = rows(a.out)
    link = {r["link"]: r["bytes_per_s"] for r in rs if r["kind"] == "link"}
    lines = ["| workers | global batch | link | steps to target (sweep, seeds 0-2) | measured steps (per repeat) "
             "| t_step predicted (ms) | t_step measured (ms) | predicted time to target (s) | measured (s, per repeat) "
             "| measured median (s) | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = []
    for n in sorted({r["workers"] for r in rs if r["kind"] == "run"}):
        for batch in sorted({r["global_batch"] for r in rs if r["kind"] == "run" and r["workers"] == n}):
            runs = [r for r in rs if r["kind"] == "run" and r["workers"] == n and r["global_batch"] == batch]
            ln = runs[0]["link"]
            p = plan_for(a.out, n, batch, link[ln])
            c = p["cell"]
            meas = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
            steps = [r["steps_to_target"] for r in runs]
            t_meas = [r["global_batch"] / r["samples_per_sec"] * 1e3 for r in runs if r["samples_per_sec"]]
            med = statistics.median(meas) if meas else None
            err = f"{(med - c['time_to_target']) / c['time_to_target'] * 100:+.1f}%" if med and c["time_to_target"] else "-"
            lines.append(f"| {n} | {batch} | {ln} ({link[ln] * 8 / 1e6:.0f} Mbit/s) | {c['steps']:.0f} | "
                         f"{', '.join(map(str, steps))} | {c['t_step'] * 1e3:.1f} | {fmt(t_meas)} | "
                         f"{c['time_to_target']:.1f} | {', '.join(f'{m:.1f}' for m in meas)} | "
                         f"{med:.1f} | {err} |" if med else "")
            detail += [f"### {n} workers, global batch {batch}", "", "    " + " ".join(p["argv"]), "",
                       *("    " + line for line in p["text"].splitlines()), ""]
    steptimes = [r for r in rs if r["kind"] == "steptime"]
    st = ["| per-worker batch | processes on the core | step time per repeat (ms) | mean +- std (ms) |",
          "|---|---|---|---|"]
    for key in sorted({(r["per_worker_batch"], r["processes_per_core"]) for r in steptimes}):
        v = [r["step_time_s"] * 1e3 for r in steptimes if (r["per_worker_batch"], r["processes_per_core"]) == key]
        st.append(f"| {key[0]} | {key[1]} | {', '.join(f'{x:.1f}' for x in v)} | {fmt(v)} |")
    text = "\n".join(["# plan check", "", *lines, "", "## one worker's step time (steptime)", "", *st, "",
                      "## the plans", "", *detail])
    (a.out / "report.md").write_text(text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "steptime", "run", "report"):
        q = sub.add_parser(name)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--batch", type=int, default=256)
        q.add_argument("--batches", default="128,256,512")
        q.add_argument("--workers", type=int, default=2, choices=(2, 4))
        q.add_argument("--repeat", type=int, default=0)
        q.add_argument("--steps", type=int, default=120)
        q.add_argument("--link", default="1gbit")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    {"sweep": cmd_sweep, "steptime": cmd_steptime, "run": cmd_run, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
