"""Loop overhead: `distbatch train` exactly as a user runs it, against what they would run instead.

Issue 12, item 4. Every candidate is one whole command, timed from outside:

  distbatch        `distbatch train` at its defaults (TensorBoard, checkpoints at every
                   evaluation, --steps-per-execution auto); horovod through
                   `distbatch launch horovod --gloo -np 2 -H localhost:2 --`
  distbatch_spe1   the same with --steps-per-execution 1 (one step per tf.function call)
  distbatch_xla    the same with --jit-compile on (XLA for the per-replica forward/backward)
  minimal          (a) benchmarks/loop_refs.py minimal / hvd-minimal: a hand-written
                   one-step-per-call tf.function loop under the same strategy
  keras_fit        (b) Keras 3 model.fit, steps_per_execution 1 (Keras's default)
  keras_fit_tuned  (b) the same, tuned: steps_per_execution 32 (--fit-tuned-spe)
  distbatch_prev   `distbatch train` of ANOTHER checkout (--prev DIR, e.g. a git worktree of
                   the last release): the regression check, same flags as distbatch
  hvd_keras        (c) Horovod's documented Keras workflow on tf_keras
                   (hvd.DistributedOptimizer + its callbacks, TF_USE_LEGACY_KERAS=1)
                   in the peer venv of scripts/peer_venv.sh, under its horovodrun

on backends single, mirrored (MirroredStrategy over 2 logical CPU devices: a test of
the distributed path, not a speed-up on one machine) and horovod (2 Gloo ranks), for
the models mlp (overhead-bound), convnet and mlp-wide (3 x Dense 2048, 8.5M parameters:
compute-bound; --models mlp-wide). All train the same
architecture on the same .npz (written once: MNIST-1D, 16384 train / 4096
validation examples), global batch 256, SGD momentum 0.9, with one validation pass
per epoch (64 steps) and after the last step. Learning rate: the references use a
constant 0.4, distbatch's default peak lr (--base-lr 0.05 at batch 32, linearly
scaled to 256, --ref-lr); distbatch runs its default recipe (gradual warmup, step
decay). Without warmup the convnet can stall near chance at 0.4: same work per step.

Differential timing cancels start-up, imports and compilation: each candidate runs at
two lengths S1 < S2 (--steps S1,S2) and

    throughput = (S2 - S1) * global_batch / (wall(S2) - wall(S1))       [samples/s]

Each repeat runs every candidate at both lengths, round robin, the order rotated by
one candidate per repeat (S1/S2 order alternating). Reported per candidate: the
median throughput over repeats, and its ratio to each reference of the same backend
and model, computed per repeat and then medianed (the ratio of medians beside it).
Before timing, each of Horovod's Keras callbacks is tried alone; those that fail
are reported with their error and left out of hvd_keras (on TF 2.21 Horovod 0.28.1
takes `keras.backend` from the `keras` package, which is Keras 3 even with tf_keras:
MetricAverageCallback and the learning-rate callbacks fail, the broadcast works).
Every run must do exactly its steps; Horovod runs must end with equal weights on all
ranks (a checksum), or the run counts as failed.

Every process is one JSON row in OUT/loop_overhead.jsonl (appended); the table is
printed and written to OUT/loop_overhead.md and OUT/loop_overhead_summary.json.
--from-rows re-prints the table of a finished run without running anything.

  .venv/bin/python benchmarks/loop_overhead.py --out bench/loop_overhead        # full, about 1.5 h on 2 cores
  .venv/bin/python benchmarks/loop_overhead.py --steps 50,150 --repeats 1 --models mlp \\
      --out /tmp/loop_smoke                                                      # smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REFS = str(Path(__file__).resolve().with_name("loop_refs.py"))
DEFAULT_PEER = Path.home() / ".cache" / "distbatch" / "peer-venv" / "bin" / "python"
BACKENDS = ("single", "mirrored", "horovod")
MODELS = ("mlp", "convnet", "mlp-wide")  # mlp-wide: 8.5M parameters, the most compute-bound
CANDIDATES = {
    "single": ("distbatch", "distbatch_spe1", "distbatch_xla", "minimal", "keras_fit", "keras_fit_tuned"),
    "mirrored": ("distbatch", "distbatch_spe1", "distbatch_xla", "minimal", "keras_fit", "keras_fit_tuned"),
    "horovod": ("distbatch", "distbatch_spe1", "distbatch_xla", "minimal", "hvd_keras"),
}
REFERENCES = ("minimal", "keras_fit", "keras_fit_tuned", "hvd_keras", "distbatch_prev")
HVD_CALLBACKS = ("broadcast", "metric_average", "lr_warmup", "lr_schedule")  # as in loop_refs


@dataclass(frozen=True)
class Candidate:
    name: str
    backend: str
    model: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.backend}/{self.model}"


@dataclass(frozen=True)
class Setup:
    """Everything a command needs besides the candidate and its length."""
    data: str
    work: str                       # run folders of distbatch (--out)
    python: str                     # the project venv's python (references)
    distbatch: str                  # the project venv's CLI
    peer_python: str | None = None  # the peer venv's python (hvd_keras)
    global_batch: int = 256
    lr: float = 0.4
    ranks: int = 2                  # horovod ranks and mirrored replicas
    fit_tuned_spe: int = 32
    hvd_callbacks: tuple[str, ...] = ("broadcast", "metric_average")
    prev: str | None = None         # distbatch_prev: another checkout's root (PYTHONPATH)


def candidates(models, backends, *, peer: bool, only=None, prev: bool = False) -> list[Candidate]:
    return [Candidate(name, backend, model) for model in models for backend in backends
            for name in CANDIDATES[backend] + (("distbatch_prev",) if prev else ())
            if (peer or name != "hvd_keras") and (only is None or name in only)]


def run_dir(c: Candidate, steps: int, s: Setup) -> str:
    return os.path.join(s.work, f"{c.name}-{c.backend}-{c.model}-{steps}")


def horovod_launch(s: Setup, worker: list[str]) -> list[str]:
    return [s.distbatch, "launch", "horovod", "--gloo", "-np", str(s.ranks),
            "-H", f"localhost:{s.ranks}", "--", *worker]


def command(c: Candidate, steps: int, s: Setup) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of one candidate run of `steps` steps."""
    if c.name.startswith("distbatch"):
        argv = [s.distbatch, "train", "--backend", c.backend, "--dataset", s.data, "--model", c.model,
                "--global-batch-size", str(s.global_batch), "--steps", str(steps),
                "--out", run_dir(c, steps, s)]
        if c.backend == "mirrored":
            argv += ["--cpu-replicas", str(s.ranks)]
        if c.name == "distbatch_spe1":
            argv += ["--steps-per-execution", "1"]
        if c.name == "distbatch_xla":
            argv += ["--jit-compile", "on"]
        env = {}
        if c.name == "distbatch_prev":  # the other checkout's package, through this venv's python
            # -P: the working directory (this checkout's root) must not come before PYTHONPATH
            # on sys.path, or `-m distbatch.cli` imports THIS checkout's package.
            argv = [s.python, "-P", "-m", "distbatch.cli", *argv[1:]]
            env = {"PYTHONPATH": s.prev}
        return (horovod_launch(s, argv) if c.backend == "horovod" else argv), env
    common = ["--data", s.data, "--model", c.model, "--steps", str(steps),
              "--global-batch-size", str(s.global_batch), "--lr", str(s.lr)]
    if c.name == "hvd_keras":
        peer_bin = os.path.dirname(s.peer_python)
        argv = [os.path.join(peer_bin, "horovodrun"), "--gloo", "-np", str(s.ranks),
                "-H", f"localhost:{s.ranks}", s.peer_python, REFS, "hvd-keras", *common,
                "--callbacks", ",".join(s.hvd_callbacks)]
        return argv, {"TF_USE_LEGACY_KERAS": "1"}
    if c.backend == "horovod":
        return horovod_launch(s, [s.python, REFS, "hvd-minimal", *common]), {}
    argv = [s.python, REFS, "minimal" if c.name == "minimal" else "fit", *common, "--strategy", c.backend]
    if c.name.startswith("keras_fit"):
        argv += ["--steps-per-execution", str(s.fit_tuned_spe if c.name == "keras_fit_tuned" else 1)]
    return argv, {}


def throughput(s1: int, s2: int, wall1: float, wall2: float, global_batch: int) -> float | None:
    """Samples/s of the S2 - S1 extra steps; None when the longer run was not slower."""
    if s2 <= s1 or wall2 <= wall1:
        return None
    return (s2 - s1) * global_batch / (wall2 - wall1)


# ------------------------------------------------------------------------------ running

def last_error(log: str) -> str | None:
    """The last "...Error: message" line, a worker's (horovodrun's "[rank]<stderr>:" prefix)
    before the launcher's own."""
    found = re.findall(r"^(\[\d+\]<std\w+>:)?\s*([\w.]*(?:Error|Exception)\b.*)$", log, re.M)
    from_ranks = [msg for prefix, msg in found if prefix]
    messages = from_ranks or [msg for _, msg in found]
    if not messages:
        return None
    msg = messages[-1].strip()
    # TensorFlow's "Graph execution error:" gives its cause on the line before "[[{{node ...}}]]".
    cause = re.findall(r"^(?:\[\d+\]<std\w+>:)?(.+)\n(?:\[\d+\]<std\w+>:)?\s*\[\[\{\{node", log, re.M)
    if msg.endswith(":") and cause:
        msg += " " + cause[-1].strip()
    return msg[:300]


def parse_result(c: Candidate, log: str, out: str) -> dict:
    """Steps run, evaluations, validation accuracy and more, as the program reported them."""
    if c.name.startswith("distbatch"):
        try:
            with open(os.path.join(out, "summary.json")) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return {}
        return {"steps_done": m.get("steps"), "evals": len(m.get("history", [])),
                "val_accuracy": m.get("val_accuracy"), "diverged": m.get("diverged"),
                "steps_per_execution": m.get("steps_per_execution")}
    ranks = [json.loads(line) for line in re.findall(r"LOOP_REFS (\{.*\})", log)]
    if not ranks:
        return {}
    first = min(ranks, key=lambda r: r["rank"])
    sums = [r["weights_sum"] for r in ranks]
    agree = all(abs(x - sums[0]) <= 1e-9 * max(1.0, abs(sums[0])) for x in sums)
    return {"steps_done": first["steps"], "evals": first["evals"], "val_accuracy": first["val_accuracy"],
            "ranks": len(ranks), "ranks_agree": agree, "diverged": first["val_loss"] != first["val_loss"],
            "steps_per_execution": first.get("steps_per_execution", 1), "callbacks": first.get("callbacks")}


def run_one(c: Candidate, steps: int, s: Setup, *, log_path: str, timeout: float) -> dict:
    argv, env = command(c, steps, s)
    out = run_dir(c, steps, s)
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    text = Path(log_path).read_text(errors="replace")
    res = parse_result(c, text, out)
    ok = (rc == 0 and res.get("steps_done") == steps and not res.get("diverged")
          and res.get("ranks_agree", True))
    return {"candidate": c.name, "backend": c.backend, "model": c.model, "steps": steps,
            "wall_s": round(wall, 4), "rc": rc, "ok": ok, **res, "load1_before": load,
            "error": None if ok else (last_error(text) or f"exit {rc}, result {res}"),
            "log": log_path, "argv": argv, "env": env}


def probe_hvd_callbacks(s: Setup, steps: int, log_dir: str, timeout: float) -> dict[str, str | None]:
    """Each Horovod Keras callback alone in a short hvd_keras run: None if it works, else the error."""
    result = {}
    for name in HVD_CALLBACKS:
        c = Candidate("hvd_keras", "horovod", "mlp")
        row = run_one(c, steps, replace(s, hvd_callbacks=(name,)),
                      log_path=os.path.join(log_dir, f"probe-{name}.log"), timeout=timeout)
        result[name] = None if row["ok"] else row["error"]
        print(f"  Horovod Keras callback {name}: {'works' if row['ok'] else 'FAILS: ' + row['error']}",
              flush=True)
    return result


# ------------------------------------------------------------------------------ report

def summarize(rows: list[dict], global_batch: int) -> list[dict]:
    """Per candidate: median throughput and ratios to the references (per repeat, then median).

    A repeat counts when both of its runs succeeded and the longer one took longer."""
    walls: dict[tuple, dict[int, dict[int, float]]] = {}
    info: dict[tuple, dict] = {}
    for r in rows:
        key = (r["candidate"], r["backend"], r["model"])
        walls.setdefault(key, {})
        i = info.setdefault(key, {"runs": 0, "runs_ok": 0, "spe": set(), "errors": []})
        i["runs"] += 1
        if r["ok"]:
            i["runs_ok"] += 1
            walls[key].setdefault(r["repeat"], {})[r["steps"]] = r["wall_s"]
            if r.get("steps_per_execution") is not None:
                i["spe"].add(r["steps_per_execution"])
        elif r.get("error") and r["error"] not in i["errors"]:
            i["errors"].append(r["error"])
    rates = {}
    for key, per_repeat in walls.items():
        rates[key] = {}
        for rep, w in per_repeat.items():
            if len(w) == 2:
                (s1, w1), (s2, w2) = sorted(w.items())
                rate = throughput(s1, s2, w1, w2, global_batch)
                if rate is not None:
                    rates[key][rep] = rate
    table = []
    for key, per_repeat in rates.items():
        name, backend, model = key
        i = info[key]
        med = statistics.median(per_repeat.values()) if per_repeat else None
        row = {"candidate": name, "backend": backend, "model": model, "median_samples_per_s": med,
               "repeats_valid": len(per_repeat), "repeats": len({r["repeat"] for r in rows}),
               "runs_ok": i["runs_ok"], "runs": i["runs"], "steps_per_execution": sorted(i["spe"]),
               "errors": i["errors"]}
        for ref in REFERENCES:
            ref_rates = rates.get((ref, backend, model))
            if not ref_rates or med is None:
                continue
            paired = [per_repeat[k] / ref_rates[k] for k in per_repeat if k in ref_rates]
            row[f"vs_{ref}"] = statistics.median(paired) if paired else None
            row[f"vs_{ref}_of_medians"] = med / statistics.median(ref_rates.values())
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    refs = [r for r in REFERENCES if any(f"vs_{r}" in row for row in table)]
    head = ["candidate", "backend", "model", "steps/call", "median samples/s", "repeats", "runs ok",
            *(f"vs {r}" for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in table:
        ratios = []
        for r in refs:
            v, m = row.get(f"vs_{r}"), row.get(f"vs_{r}_of_medians")
            ratios.append("" if v is None else f"{v:.2f}x ({m:.2f}x)")
        med = row["median_samples_per_s"]
        if med is None:
            med = "runs failed" if row["runs_ok"] < row["runs"] else "no rate: S2 run not slower"
        else:
            med = f"{med:,.0f}"
        cells = [row["candidate"], row["backend"], row["model"],
                 ",".join(str(x) for x in row["steps_per_execution"]) or "-", med,
                 f"{row['repeats_valid']}/{row['repeats']}", f"{row['runs_ok']}/{row['runs']}", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nRatios: median over repeats of the per-repeat ratio (ratio of the medians in brackets), "
                 "against the reference of the same backend and model. steps/call: what each run used "
                 "(distbatch: --steps-per-execution auto's choice).")
    for row in table:
        for err in row["errors"]:
            lines.append(f"- {row['candidate']}/{row['backend']}/{row['model']} failed: {err}")
    return "\n".join(lines)


VERSIONS_CODE = """
import importlib.metadata as m, json, platform
def v(*names):
    for n in names:
        try:
            return m.version(n)
        except m.PackageNotFoundError:
            pass
print(json.dumps({"python": platform.python_version(), "tensorflow": v("tensorflow-cpu", "tensorflow"),
                  "keras": v("keras"), "tf_keras": v("tf-keras"), "horovod": v("horovod")}))
"""


def versions(python: str) -> dict:
    """Package versions of another interpreter's environment (without importing TensorFlow)."""
    try:
        proc = subprocess.run([python, "-c", VERSIONS_CODE], capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


# ------------------------------------------------------------------------------ main

def write_data(path: str, train_size: int, val_size: int) -> None:
    import numpy as np

    from distbatch.data.datasets import load_dataset
    d = load_dataset("mnist1d", train_size=train_size, val_size=val_size)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x_train=d.x_train, y_train=d.y_train, x_val=d.x_val, y_val=d.y_val)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    csv = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    p.add_argument("--models", type=csv, default=("mlp", "convnet"))
    p.add_argument("--backends", type=csv, default=BACKENDS)
    p.add_argument("--steps", type=lambda s: tuple(int(x) for x in s.split(",")), default=(300, 1300),
                   help="the two lengths S1,S2 (default 300,1300)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", type=csv, default=None,
                   help="candidate names to run (default all), e.g. distbatch,distbatch_xla,minimal")
    p.add_argument("--out", help="output folder (required unless --from-rows)")
    p.add_argument("--prev", metavar="DIR", default=None,
                   help="root of another distbatch checkout: adds the candidate distbatch_prev "
                        "(e.g. `git worktree add /tmp/prev <commit>`), the regression check")
    p.add_argument("--peer-python", default=str(DEFAULT_PEER) if DEFAULT_PEER.exists() else None,
                   help=f"the peer venv's python for hvd_keras (default {DEFAULT_PEER} if it exists)")
    p.add_argument("--train-size", type=int, default=16384)
    p.add_argument("--val-size", type=int, default=4096)
    p.add_argument("--fit-tuned-spe", type=int, default=32, help="keras_fit_tuned's steps_per_execution")
    p.add_argument("--ref-lr", type=float, default=0.4,
                   help="the references' constant lr (default 0.4: distbatch's default peak lr at batch 256)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--from-rows", metavar="JSONL", help="print the table of the last run in JSONL; run nothing")
    args = p.parse_args(argv)
    bad = [m for m in args.models if m not in MODELS] + [b for b in args.backends if b not in BACKENDS]
    if bad:
        p.error(f"unknown model/backend {','.join(bad)}; models: {','.join(MODELS)}; backends: {','.join(BACKENDS)}")
    if len(args.steps) != 2 or not 0 < args.steps[0] < args.steps[1]:
        p.error(f"--steps needs two lengths S1,S2 with 0 < S1 < S2, got {args.steps}")
    if not (args.out or args.from_rows):
        p.error("--out is required")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def report(rows: list[dict], header: dict, out: str | None) -> dict:
    table = summarize(rows, header["global_batch"])
    m = header["machine"]
    notes = [f"\nCommand: `{header['command']}`",
             f"Machine: {m['nproc']} CPUs ({m['affinity']} usable), {m['platform']}, Python {m.get('python')}, "
             f"{fmt_versions(m)}; peer venv: {fmt_versions(header.get('peer') or {}) or 'none'}",
             f"Load average (1, 5, 15 min) before {fmt_load(header['load_before'])}, "
             f"after {fmt_load(header.get('load_after'))}",
             f"Steps S1,S2 = {header['steps']}, {header['repeats']} repeat(s), global batch "
             f"{header['global_batch']}, references at constant lr {header['lr_references']}"]
    cb = header.get("hvd_keras_callbacks")
    if cb:
        notes.append(f"hvd_keras ran with callbacks: {', '.join(cb['used']) or 'none'}. Horovod's Keras "
                     "callbacks tried alone on TF 2.21 + tf_keras: " + "; ".join(
                         f"{n} {'works' if e is None else 'FAILS (' + e + ')'}" for n, e in cb["probe"].items()))
    md = markdown(table) + "\n" + "\n".join(notes)
    print("\n" + md, flush=True)
    summary = {**header, "table": table}
    if out:
        Path(out, "loop_overhead.md").write_text(md + "\n")
        Path(out, "loop_overhead_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def fmt_versions(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("tensorflow", "keras", "tf_keras", "horovod") if v.get(k))


def fmt_load(load) -> str:
    return "?" if not load else ", ".join(f"{x:.2f}" for x in load)


def from_rows(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    headers = [r for r in rows if r.get("kind") == "header"]
    if not headers:
        raise SystemExit(f"{path}: no header row")
    header = headers[-1]
    report([r for r in rows if r.get("kind") == "run" and r["bench_id"] == header["bench_id"]],
           {**header, **next((r for r in rows if r.get("kind") == "footer"
                              and r["bench_id"] == header["bench_id"]), {})}, None)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_rows:
        return from_rows(args.from_rows)
    out = os.path.abspath(args.out)
    log_dir, work = os.path.join(out, "logs"), os.path.join(out, "runs")
    os.makedirs(log_dir, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    distbatch = os.path.join(bin_dir, "distbatch")
    if not os.path.exists(distbatch):
        raise SystemExit(f"no distbatch CLI beside {sys.executable}; run this with the project's .venv/bin/python")

    backends = list(args.backends)
    if "horovod" in backends and importlib.util.find_spec("horovod") is None:
        print("skipping backend horovod: horovod is not installed in this venv "
              "(bash scripts/bootstrap.sh setup)", flush=True)
        backends.remove("horovod")
    peer = args.peer_python if "horovod" in backends else None
    if "horovod" in backends and not (peer and os.path.exists(peer)):
        print(f"skipping hvd_keras (Horovod's Keras workflow): no peer venv python "
              f"({peer or DEFAULT_PEER} missing); make it with: bash scripts/peer_venv.sh", flush=True)
        peer = None

    data = os.path.join(out, f"mnist1d-{args.train_size}-{args.val_size}.npz")
    if not os.path.exists(data):
        write_data(data, args.train_size, args.val_size)
    s = Setup(data=data, work=work, python=sys.executable, distbatch=distbatch, peer_python=peer,
              fit_tuned_spe=args.fit_tuned_spe, lr=args.ref_lr, prev=args.prev)
    bench_id = time.strftime("%Y%m%d-%H%M%S")
    jsonl = os.path.join(out, "loop_overhead.jsonl")

    def append(row: dict) -> None:
        with open(jsonl, "a") as f:  # one short write per row: rows stay whole
            f.write(json.dumps({"bench_id": bench_id, **row}) + "\n")

    header = {"kind": "header", "command": shlex.join([sys.executable, *sys.argv]), "bench_id": bench_id,
              "steps": list(args.steps), "repeats": args.repeats, "global_batch": s.global_batch,
              "lr_references": s.lr, "data": data, "train_size": args.train_size, "val_size": args.val_size,
              "machine": {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), **versions(sys.executable)},
              "peer": versions(peer) if peer else None, "load_before": list(os.getloadavg())}
    if peer:
        print("probing Horovod's Keras callbacks on TF 2.21 (tf_keras, peer venv):", flush=True)
        probe_steps = args.train_size // s.global_batch + 1  # crosses an epoch end and a partial epoch
        probe = probe_hvd_callbacks(s, probe_steps, log_dir, args.timeout)
        used = tuple(n for n in s.hvd_callbacks if probe[n] is None)
        s = replace(s, hvd_callbacks=used)
        header["hvd_keras_callbacks"] = {"probe": probe, "used": list(used)}
    append(header)

    cands = candidates(args.models, backends, peer=peer is not None, only=args.only,
                       prev=args.prev is not None)
    print(f"{len(cands)} candidates x {args.repeats} repeats x 2 lengths {args.steps}; rows in {jsonl}",
          flush=True)
    rows = []
    for rep in range(args.repeats):
        k = rep % len(cands)
        for c in cands[k:] + cands[:k]:
            for steps in (args.steps if rep % 2 == 0 else args.steps[::-1]):
                log_path = os.path.join(log_dir, f"{c.name}-{c.backend}-{c.model}-{steps}-r{rep}.log")
                row = {"kind": "run", "repeat": rep,
                       **run_one(c, steps, s, log_path=log_path, timeout=args.timeout)}
                append(row)
                rows.append({"bench_id": bench_id, **row})
                print(f"  r{rep} {c.key:<34} {steps:>6} steps {row['wall_s']:8.2f} s"
                      f"{'' if row['ok'] else '  FAILED: ' + str(row['error'])}", flush=True)
    footer = {"kind": "footer", "load_after": list(os.getloadavg())}
    append(footer)
    report(rows, {**header, **footer}, out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
