"""Scale-out on an emulated cluster link: 2 workers in 2 network namespaces (issue 17).

    sudo PYTHONPATH=. .venv/bin/python benchmarks/scale_out.py run --out runs/scale_out
    .venv/bin/python benchmarks/scale_out.py report --out runs/scale_out

`run` makes two namespaces joined by a veth pair, limits each end with tbf
(`tc qdisc add dev IF root tbf rate R burst 256kb latency 50ms`) at every rate
in --links ("unlimited" = no qdisc), measures the link's bandwidth, and times
the real commands a user runs (`distbatch train ...`, one worker per namespace,
each pinned to its own core with taskset so the two "machines" do not share a
core) at two step counts: throughput = global batch x (S_long - S_short) /
(t_long - t_short) cancels start-up, compilation and the final evaluation.
Variants are interleaved within each repeat; `report` takes medians.

Scaling efficiency = 2-worker throughput / (2 x 1-worker throughput), the
1-worker run being the same command on one pinned core at the per-worker batch
(weak scaling, as Horovod reports it). Each row is appended to rows.jsonl as
soon as it is measured; `report` reads rows only (and fits the model of
docs/scaling.md: t_step = t_compute + 2(N-1)/N x bytes / bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The model (ring all-reduce, engine pipeline form) lives in the library, where `distbatch plan`
# uses it too; re-exported here for report and tests/test_scale_out_model.py.
from distbatch.measure.scaling import ENGINE_HIDDEN, predicted_efficiency  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NS, DEV, IP = ("dbs17b0", "dbs17b1"), ("dbs17v0", "dbs17v1"), ("10.217.9.1", "10.217.9.2")
PEER_PY = Path(os.environ.get("DISTBATCH_PEER_VENV", Path.home() / ".cache/distbatch/peer-venv")) / "bin/python"
PER_WORKER_BATCH = 128
PARAMS_MLP_WIDE = 40 * 2048 + 2048 + 2 * (2048 * 2048 + 2048) + 2048 * 10 + 10  # 8,497,162 (34.0 MB float32)

# variant -> (launcher kind, extra distbatch flags). "db-*" run `distbatch train`.
VARIANTS = {
    "db-hvd":             ("hvd", []),  # defaults: --bucket-mb auto = one all-reduce per tensor
    "db-hvd-onegroup":    ("hvd", ["--bucket-mb", "0"]),  # every gradient in one grouped all-reduce
    "db-hvd-sgd":         ("hvd", ["--optimizer", "sgd"]),  # the peers' optimizer (no momentum)
    "db-hvd-spe4":        ("hvd", ["--steps-per-execution", "4"]),  # host work per call amortised
    "db-hvd-bucket":      ("hvd", ["--bucket-mb", "BUCKET"]),
    "db-hvd-bucket-spe12": ("hvd", ["--bucket-mb", "BUCKET", "--steps-per-execution", "12"]),
    "db-hvd-fp16":        ("hvd", ["--grad-compression", "fp16"]),
    "db-hvd-bucket-fp16": ("hvd", ["--bucket-mb", "BUCKET", "--grad-compression", "fp16"]),
    "db-mw":              ("mw", []),
    "db-mw-bucket":       ("mw", ["--bucket-mb", "BUCKET"]),
    "db-mw-fp16":         ("mw", ["--grad-compression", "fp16"]),
    "db-mw-pack4mb":      ("mw", ["--bytes-per-pack", str(4 << 20)]),
    "hvd-grouped-loop":   ("loop", ["grouped"]),
    "hvd-dgt-tf_keras":   ("loop", ["dgt"]),
    "db-hvd-nofusion":    ("hvd", []),
    "hvd-dgt-nofusion":   ("loop", ["dgt"]),
}
# Environment of a variant's workers (Horovod reads its knobs from the environment).
VARIANT_ENV = {
    "db-hvd-nofusion": {"HOROVOD_FUSION_THRESHOLD": "0"},   # no copy into the fusion buffer
    "hvd-dgt-nofusion": {"HOROVOD_FUSION_THRESHOLD": "0"},
}
# 1-worker distbatch baselines: `distbatch train --backend single` with these flags
BASELINE_FLAGS = {"1w-distbatch": [], "1w-distbatch-sgd": ["--optimizer", "sgd"]}


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()}")
    return r


# -- the emulated link -------------------------------------------------------------------------
def make_link() -> None:
    delete_link()
    for ns, ip in zip(NS, IP):
        sh(["ip", "netns", "add", ns])
        # Horovod 0.28's process-set Gloo context ignores HOROVOD_GLOO_IFACE and binds to the
        # address this machine's hostname resolves to (127.0.0.1 here, which is each
        # namespace's own loopback). `ip netns exec` reads /etc/netns/NS/hosts as /etc/hosts:
        # there the hostname resolves to the namespace's veth address, as on a real host.
        Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        Path(f"/etc/netns/{ns}/hosts").write_text(f"127.0.0.1 localhost\n{ip} {socket.gethostname()}\n")
    sh(["ip", "link", "add", DEV[0], "netns", NS[0], "type", "veth", "peer", "name", DEV[1], "netns", NS[1]])
    for ns, dev, ip in zip(NS, DEV, IP):
        sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])


def delete_link() -> None:
    for ns in NS:
        sh(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def set_rate(rate: str) -> None:
    """tbf on both ends' egress (each direction limited); 'unlimited' removes it."""
    for ns, dev in zip(NS, DEV):
        sh(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        if rate != "unlimited":
            sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", rate, "burst", "256kb", "latency", "50ms"])


def measure_bandwidth(nbytes: int) -> float:
    """Bytes/s of one TCP stream ns0 -> ns1 (receiver's clock, first to last byte)."""
    recv = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, __file__, "_recv", IP[1], "5399"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    sh(["ip", "netns", "exec", NS[0], sys.executable, __file__, "_send", IP[1], "5399", str(nbytes)])
    return float(recv.communicate(timeout=120)[0].split()[-1])


def _recv(ip: str, port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(1)
    c, _ = s.accept()
    buf, total, t0 = bytearray(1 << 20), 0, None
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        t0 = t0 or time.perf_counter()
        total += n
    print(total / (time.perf_counter() - t0))


def _send(ip: str, port: int, nbytes: int) -> None:
    s = socket.create_connection((ip, port))
    chunk = b"\0" * (1 << 20)
    for _ in range(nbytes // len(chunk)):
        s.sendall(chunk)
    s.close()


def _rendezvous(hosts: str) -> None:
    """Horovod's Gloo rendezvous server (what horovodrun --gloo starts), for hosts ip:slots,...
    (benchmarks/plan_check.py runs 2 ranks per namespace)"""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer
    server = RendezvousServer(False)
    port = server.start()
    slots = sum(int(h.rpartition(":")[2]) for h in hosts.split(","))  # every slot a rank
    server.init(get_host_assignments(parse_hosts(hosts), slots))
    print(port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


# -- commands (pure functions) -------------------------------------------------------------------
def train_argv(backend: str, workers: int, steps: int, extra: list[str], out: str) -> list[str]:
    """`distbatch train` as the user runs it: mlp-wide on MNIST-1D, one evaluation at the end."""
    return [str(BIN / "distbatch"), "train", "--backend", backend, "--model", "mlp-wide",
            "--dataset", "mnist1d", "--train-size", "40000", "--val-size", "512",
            "--global-batch-size", str(PER_WORKER_BATCH * workers), "--steps", str(steps),
            "--seed", "1", *extra, "--out", out, "--overwrite"]


def loop_argv(tape: str, steps: int) -> list[str]:
    py = str(PEER_PY) if tape == "dgt" else sys.executable
    return [py, str(ROOT / "benchmarks/hvd_tape_loop.py"), "--tape", tape, "--steps", str(steps),
            "--batch", str(PER_WORKER_BATCH)]


def hvd_env(rank: int, size: int, port: int, hosts: list[str], dev: str) -> dict:
    """The variables horovodrun --gloo gives each worker (horovod/runner/gloo_run.py)."""
    return {"HOROVOD_GLOO_RENDEZVOUS_ADDR": hosts[0], "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
            "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": dev,
            "HOROVOD_HOSTNAME": hosts[rank], "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(size),
            "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "1", "HOROVOD_CROSS_RANK": str(rank),
            "HOROVOD_CROSS_SIZE": str(size)}


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), PATH=f"{BIN}:{env.get('PATH', '')}")
    env.pop("TF_CONFIG", None)
    return env


def run_workers(kind: str, workers: int, argv_of, extra_env=None) -> tuple[float, list[str]]:
    """Start `workers` processes (worker i in namespace i on core i); (wall seconds until all
    exit, each worker's output)."""
    env = {**base_env(), **(extra_env or {})}
    if kind == "loop" and "dgt" in argv_of(0)[2:]:
        env["TF_USE_LEGACY_KERAS"] = "1"
    hosts = list(IP[:workers])
    rdv = None
    if kind in ("hvd", "loop"):
        rdv = subprocess.Popen(["ip", "netns", "exec", NS[0], sys.executable, __file__, "_rendezvous",
                                ",".join(f"{h}:1" for h in hosts)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        port = int(rdv.stdout.readline())
    t0 = time.perf_counter()
    procs = []
    for i in range(workers):
        wenv = dict(env)
        if rdv is not None:
            wenv.update(hvd_env(i, workers, port, hosts, DEV[i]))
        launch = []
        if kind == "mw":
            launch = [str(BIN / "distbatch"), "launch", "multiworker", "--hosts", ",".join(hosts),
                      "--port", "23617", "--task-index", str(i), "--"]
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS[i], "taskset", "-c", str(i), *launch,
                                       *argv_of(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=wenv))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    seconds = time.perf_counter() - t0
    if rdv is not None:
        rdv.stdin.close()
        rdv.wait(timeout=30)
    if any(p.returncode for p in procs):
        raise RuntimeError("a worker failed:\n" + "\n".join(o[-3000:] for o in outs))
    return seconds, outs


def inproc_rate(name: str, outs: list[str], out_dir: Path) -> float | None:
    """The run's own steady-state samples/s, beside the differential one: distbatch's
    summary.json samples_per_sec (its training loop between calls, compile call excluded);
    the tape loop's timed call after its warm-up call."""
    if name.startswith("1w-distbatch") or name.startswith("db-"):
        path = out_dir / (name if name.startswith("1w-") else f"{name}-0") / "summary.json"
        try:
            return float(json.loads(path.read_text())["samples_per_sec"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    m = re.search(r"timed (\d+) steps in ([0-9.]+) s, (\d+) samples/step", outs[0])
    return int(m.group(1)) * int(m.group(3)) / float(m.group(2)) if m and float(m.group(2)) > 0 else None


def time_variant(name: str, steps: int, out_dir: Path, bucket_mb: float, extra_env=None) -> tuple[float, list[str]]:
    if name.startswith("1w-"):  # one worker, one core, per-worker batch
        if name in BASELINE_FLAGS:
            return run_workers("single", 1, lambda i: train_argv("single", 1, steps, BASELINE_FLAGS[name],
                                                                 str(out_dir / name)))
        tape = "dgt" if "dgt" in name else "grouped"
        return run_workers("loop", 1, lambda i: loop_argv(tape, steps))
    kind, extra = VARIANTS[name]
    extra_env = {**VARIANT_ENV.get(name, {}), **(extra_env or {})}
    if kind == "loop":
        return run_workers("loop", 2, lambda i: loop_argv(extra[0], steps), extra_env)
    extra = [str(bucket_mb) if e == "BUCKET" else e for e in extra]
    backend = "horovod" if kind == "hvd" else "multiworker"
    return run_workers(kind, 2, lambda i: train_argv(backend, 2, steps, extra, str(out_dir / f"{name}-{i}")),
                       extra_env)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cmd_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    variants = args.variants.split(",")
    if any("dgt" in v for v in variants) and not PEER_PY.exists():
        print(f"skipping the tf_keras DistributedGradientTape loop: no peer venv at {PEER_PY} "
              "(bash scripts/peer_venv.sh makes one)", file=sys.stderr)
        variants = [v for v in variants if "dgt" not in v]
    baselines = [v for v in variants if v.startswith("1w-")]
    two = [v for v in variants if not v.startswith("1w-")]
    # rows already measured (an interrupted run continues where it stopped)
    done = {(r["link"], r["variant"], r["repeat"], r["steps"]) for r in
            (json.loads(line) for line in open(rows)) if r["kind"] == "time"} if rows.exists() else set()
    make_link()
    try:
        for link in args.links.split(","):
            set_rate(link)
            nbytes = {"100mbit": 24 << 20}.get(link, 256 << 20)
            bw = statistics.median(measure_bandwidth(nbytes) for _ in range(3))
            append_row(rows, {"kind": "link", "link": link, "bytes_per_s": bw})
            print(f"{link}: measured {bw * 8 / 1e6:.0f} Mbit/s", file=sys.stderr, flush=True)
            steps = [int(s) for s in (args.steps_slow if link == "100mbit" else args.steps).split(",")]
            steps_1w = [int(s) for s in args.steps_1w.split(",")] if args.steps_1w else steps
            for r in range(args.repeats):
                todo = two + (baselines if link == args.links.split(",")[0] else [])
                for name in todo:  # interleaved: every variant once per repeat
                    for s in (steps_1w if name.startswith("1w-") else steps):
                        if (link, name, r, s) in done:
                            continue
                        t, outs = time_variant(name, s, out / "runs", args.bucket_mb)
                        row = {"kind": "time", "link": link, "variant": name, "steps": s, "seconds": t,
                               "inproc_samples_per_s": inproc_rate(name, outs, out / "runs"),
                               "repeat": r, "per_worker_batch": PER_WORKER_BATCH,
                               "workers": 1 if name.startswith("1w-") else 2, "bucket_mb": args.bucket_mb}
                        append_row(rows, row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.timeline:
            set_rate(args.timeline_link)
            for name in args.timeline_variants.split(","):
                time_variant(name, int(steps[0]), out / "runs", args.bucket_mb,
                             extra_env={"HOROVOD_TIMELINE": str(out / f"timeline-{args.timeline_link}-{name}.json")})
    finally:
        delete_link()


# -- report (reads rows only) --------------------------------------------------------------------
def throughputs(rows: list[dict]) -> dict:
    """(link, variant) -> median samples/s from differential timing, pairing each repeat's runs."""
    by = {}
    for r in rows:
        if r["kind"] == "time":
            by.setdefault((r["link"], r["variant"], r["repeat"]), {})[r["steps"]] = r
    out = {}
    for (link, variant, _), runs in by.items():
        if len(runs) < 2:
            continue
        lo, hi = min(runs), max(runs)
        dt = runs[hi]["seconds"] - runs[lo]["seconds"]
        samples = (hi - lo) * runs[hi]["per_worker_batch"] * runs[hi]["workers"]
        out.setdefault((link, variant), []).append(samples / dt)
    return {k: statistics.median(v) for k, v in out.items()}


def longest_inproc_rows(rows: list[dict]) -> list[dict]:
    """The timed rows with an in-process rate, of each (link, variant)'s longest run only."""
    timed = [r for r in rows if r["kind"] == "time" and r.get("inproc_samples_per_s")]
    longest = {}
    for r in timed:
        k = (r["link"], r["variant"])
        longest[k] = max(longest.get(k, 0), r["steps"])
    return [r for r in timed if r["steps"] == longest[(r["link"], r["variant"])]]


def inproc_throughputs(rows: list[dict]) -> dict:
    """(link, variant) -> median of the runs' own steady-state samples/s (longer runs only)."""
    out = {}
    for r in longest_inproc_rows(rows):
        out.setdefault((r["link"], r["variant"]), []).append(r["inproc_samples_per_s"])
    return {k: statistics.median(v) for k, v in out.items()}


def paired_efficiencies(rows: list[dict]) -> dict:
    """(link, variant) -> [efficiency of each repeat]: the repeat's in-process 2-worker rate over
    2 x the SAME repeat's 1-worker rate of its baseline (run minutes apart, not hours: on a shared
    machine the 1-worker rate drifts by several % between repeats). Longest runs only."""
    rate, one = {}, {}
    for r in longest_inproc_rows(rows):
        if r["variant"].startswith("1w-"):
            one[(r["variant"], r["repeat"])] = r["inproc_samples_per_s"]
        else:
            rate[(r["link"], r["variant"], r["repeat"])] = r["inproc_samples_per_s"]
    out = {}
    for (link, v, rep), x in sorted(rate.items()):
        b = one.get((baseline_of(v), rep))
        if b:
            out.setdefault((link, v), []).append(x / (2 * b))
    return out


def baseline_of(variant: str) -> str:
    if variant == "hvd-grouped-loop":
        return "1w-hvd-grouped-loop"
    if variant in ("hvd-dgt-tf_keras", "hvd-dgt-nofusion"):
        return "1w-hvd-dgt-tf_keras"
    return "1w-distbatch-sgd" if variant.endswith("-sgd") else "1w-distbatch"


def one_worker_rates(tp: dict) -> dict:
    """1-worker runs use no network: pool them over the links they ran beside."""
    pooled = {}
    for (link, v), rate in tp.items():
        if v.startswith("1w-"):
            pooled.setdefault(v, []).append(rate)
    return {v: statistics.median(r) for v, r in pooled.items()}


def comm_bytes(variant: str) -> float:
    return PARAMS_MLP_WIDE * (2 if "fp16" in variant or "bf16" in variant else 4)


def engine_rate(tp: dict, base: dict, variant: str, calibrate: str) -> float | None:
    """Bytes/s the variant's all-reduce achieves when the wire costs almost nothing (the
    `calibrate` link): gradient bytes / (t_step - t_compute). Its copies, the reduction (for
    fp16 a software half-float sum on CPU) and the engine's threads share the worker's core."""
    b = base.get(baseline_of(variant))
    if (calibrate, variant) not in tp or b is None:
        return None
    t_comm = 2 * PER_WORKER_BATCH / tp[(calibrate, variant)] - PER_WORKER_BATCH / b
    return comm_bytes(variant) / t_comm if t_comm > 0 else None


def cmd_report(args) -> None:
    rows = [json.loads(line) for line in open(Path(args.out) / "rows.jsonl")]
    links = {r["link"]: r["bytes_per_s"] for r in rows if r["kind"] == "link"}
    for title, tp in (("in-process (each run's own steady-state rate; the model below uses these)",
                       inproc_throughputs(rows)),
                      ("differential (whole commands at two lengths)", throughputs(rows))):
        base = one_worker_rates(tp)
        if not base:
            continue
        print(f"## {title}\n\n1-worker (one core): " + ", ".join(
            f"{v} {r:,.0f} samples/s ({PER_WORKER_BATCH / r * 1e3:.1f} ms/step)" for v, r in sorted(base.items())))
        variants = sorted({v for (_, v) in tp if not v.startswith("1w-")})
        shown = {l: bw for l, bw in links.items() if any((l, v) in tp for v in variants)}
        print("\n| 2 workers | " + " | ".join(f"{l} ({shown[l] * 8 / 1e6:.0f} Mbit/s)" for l in shown) + " |")
        print("|---|" + "---|" * len(shown))
        for v in variants:
            cells = []
            for link in shown:
                rate, b = tp.get((link, v)), base.get(baseline_of(v))
                cells.append("-" if rate is None or b is None else f"{rate:,.0f}/s, eff {rate / (2 * b):.2f}")
            print(f"| {v} | " + " | ".join(cells) + " |")
        print()
    paired = paired_efficiencies(rows)
    if paired:
        print("## efficiency per repeat (in-process; each against the same repeat's 1-worker run)\n")
        print("| link | variant | efficiency per repeat | median |\n|---|---|---|---:|")
        for (link, v), effs in paired.items():
            print(f"| {link} | {v} | {', '.join(f'{e:.3f}' for e in effs)} | {statistics.median(effs):.3f} |")
        print()
    tp = inproc_throughputs(rows) or throughputs(rows)
    base = one_worker_rates(tp)
    variants = sorted({v for (_, v) in tp if not v.startswith("1w-")})
    calibrate = "unlimited"
    print("## model vs measured efficiency, 2 workers (in-process rates)\n")
    print("link only: t_step = t_compute + bytes / bandwidth (no overlap; t_compute = the "
          "variant's own 1-worker step; float32 or fp16 bytes)")
    print(f"bottleneck: t_step = t_compute + bytes / min(bandwidth, engine rate), the engine rate "
          f"being what the variant's all-reduce achieved on the {calibrate} link (its copies and "
          f"reduction pipeline with the wire, so the slower of the two sets the pace)")
    print(f"engine: t_step = t_compute + max(wire, engine) + {1 - ENGINE_HIDDEN:g} x min(wire, engine), "
          f"wire = bytes / bandwidth, engine = bytes / engine rate (a two-stage pipeline: the slower "
          f"stage sets the pace, {ENGINE_HIDDEN:g} of the faster one hides behind it)\n")
    print("| link | variant | measured | link only | error | bottleneck | error | engine | error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for link, bw in links.items():
        for v in variants:
            b = base.get(baseline_of(v))
            if (link, v) not in tp or b is None:
                continue
            t_c = PER_WORKER_BATCH / b
            meas = tp[(link, v)] / (2 * b)
            pred = predicted_efficiency(t_c, comm_bytes(v), bw, 2)
            rate = engine_rate(tp, base, v, calibrate)
            cells = [f"{meas:.3f}", f"{pred:.3f}", f"{(meas - pred) / pred * 100:+.0f}%"]
            if rate is None or link == calibrate:
                cells += ["(calibration)" if link == calibrate else "-", ""] * 2
            else:
                for pe in (predicted_efficiency(t_c, comm_bytes(v), min(bw, rate), 2),
                           predicted_efficiency(t_c, comm_bytes(v), bw, 2, engine=rate)):
                    cells += [f"{pe:.3f}", f"{(meas - pe) / pe * 100:+.0f}%"]
            print(f"| {link} | {v} | " + " | ".join(cells) + " |")
    if "1w-distbatch" not in base:
        return
    t_compute = PER_WORKER_BATCH / base["1w-distbatch"]
    rates = {v: engine_rate(tp, base, v, calibrate) for v in variants}
    print(f"\nt_compute (1w-distbatch, batch {PER_WORKER_BATCH}) = {t_compute * 1e3:.1f} ms/step; gradient "
          f"{PARAMS_MLP_WIDE * 4 / 1e6:.1f} MB float32; engine rates on {calibrate}: " + ", ".join(
              f"{v} {r * 8 / 1e9:.2f} Gbit/s" for v, r in rates.items() if r))
    for name, nbytes in (("float32", 4), ("fp16", 2)):
        print(f"\npredicted efficiency (link only), {name} gradients, t_compute {t_compute * 1e3:.0f} ms:")
        print(prediction_table(t_compute, PARAMS_MLP_WIDE * nbytes))


def timeline_overlap(path: str) -> dict:
    """Read a Horovod timeline (Chrome trace, rank 0): per step, when each tensor was enqueued
    (start of NEGOTIATE_ALLREDUCE: its gradient exists, backprop produced it) and when its
    ALLREDUCE ran. Communication that starts before the LAST tensor of the step is enqueued
    ran while backprop was still computing: that is the overlap. An upper bound of it: a
    request is seen (NEGOTIATE begins) only when the background thread runs its next cycle, so
    a gradient that is ready while an earlier all-reduce is still running counts as produced
    when that all-reduce ends (2026-11-27: with one all-reduce per tensor the step's last
    gradients are seen ~150 ms after the first all-reduce started, but backprop after it
    computes for only ~15-20 ms)."""
    text = open(path).read().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {})}
    per = {}
    for e in events:
        if e.get("ph") in ("B", "E") and e.get("pid") in names:
            per.setdefault(names[e["pid"]], []).append(e)
    enq, start, end = {}, {}, {}
    for name, evs in per.items():
        if "gradient_tape" not in name:
            continue  # the initial broadcasts, the evaluation's sums
        depth, top, k_neg, k_ar = 0, None, 0, 0
        for e in evs:  # in file order: B/E nest per tensor
            if e["ph"] == "B":
                if depth == 0:
                    top = e["name"]
                    if top.startswith("NEGOTIATE"):
                        enq.setdefault(k_neg, []).append(e["ts"]); k_neg += 1
                    else:
                        start.setdefault(k_ar, []).append(e["ts"])
                depth += 1
            else:
                depth -= 1
                if depth == 0 and not top.startswith("NEGOTIATE"):
                    end.setdefault(k_ar, []).append(e["ts"]); k_ar += 1
    steps = [k for k in enq if k in start and k in end and len(enq[k]) > 1]
    if not steps:
        return {"tensors": len(per), "steps": 0}
    ahead = [max(0.0, max(enq[k]) - min(start[k])) / 1e3 for k in steps]
    span = [(max(end[k]) - min(start[k])) / 1e3 for k in steps]
    firsts = [min(start[k]) for k in sorted(steps)]
    return {"tensors": len(per), "steps": len(steps), "comm_ms_median": statistics.median(span),
            "comm_before_last_grad_ms_median": statistics.median(ahead),
            "overlap_fraction": statistics.median(a / s for a, s in zip(ahead, span) if s > 0),
            # from one step's first all-reduce to the next one's: the step time as Horovod saw
            # it (the steps around a call boundary of distbatch's loop include that boundary)
            "step_ms": [round((b - a) / 1e3, 1) for a, b in zip(firsts, firsts[1:])]}


def prediction_table(t_compute: float, grad_bytes: float, gbits=(1, 10, 25, 100),
                     workers=(2, 8, 64, 512)) -> str:
    """Markdown table of predicted_efficiency over link speeds (rows) and worker counts."""
    lines = ["| link | " + " | ".join(f"N={n}" for n in workers) + " |",
             "|---|" + "---|" * len(workers)]
    for g in gbits:
        bw = g * 1e9 / 8 * 0.97  # tbf delivered 97% of the nominal rate here
        lines.append(f"| {g} Gbit/s | " + " | ".join(
            f"{predicted_efficiency(t_compute, grad_bytes, bw, n):.2f}" for n in workers) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/scale_out")
    r.add_argument("--links", default="100mbit,1gbit,unlimited")
    r.add_argument("--variants", default="1w-distbatch,1w-hvd-grouped-loop,1w-hvd-dgt-tf_keras,"
                                         + ",".join(VARIANTS))
    r.add_argument("--steps", default="4,12", help="two step counts (differential timing)")
    r.add_argument("--steps-slow", default="2,5", help="step counts on the 100mbit link")
    r.add_argument("--steps-1w", default="", help="step counts of the 1-worker baselines (default: "
                   "--steps); they run ~5x faster per step than 2 workers on a slow link, so give "
                   "them more steps for the same timed difference")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--bucket-mb", type=float, default=4.0)
    r.add_argument("--timeline", action="store_true", help="also one Horovod timeline run")
    r.add_argument("--timeline-link", default="1gbit")
    r.add_argument("--timeline-variants", default="db-hvd-bucket,db-hvd",
                   help="Horovod variants to run once more with HOROVOD_TIMELINE "
                        "(timeline-LINK-VARIANT.json)")
    rp = sub.add_parser("report")
    rp.add_argument("--out", default="runs/scale_out")
    tl = sub.add_parser("timeline", help="overlap seen in a Horovod timeline file")
    tl.add_argument("path")
    for name, nargs in (("_recv", 2), ("_send", 3), ("_rendezvous", 1)):
        q = sub.add_parser(name)
        q.add_argument("a", nargs=nargs)
    a = p.parse_args()
    if a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "report":
        cmd_report(a)
    elif a.cmd == "timeline":
        print(json.dumps(timeline_overlap(a.path), indent=1))
    elif a.cmd == "_recv":
        _recv(a.a[0], int(a.a[1]))
    elif a.cmd == "_send":
        _send(a.a[0], int(a.a[1]), int(a.a[2]))
    else:
        _rendezvous(a.a[0])


if __name__ == "__main__":
    main()
