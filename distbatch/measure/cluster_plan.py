"""Time-to-target on a cluster, predicted from a sweep (`distbatch plan`, distbatch/cli/plan.py).

A sweep gives, per global batch B and scaling rule, the optimizer steps to the target
accuracy (Shallue et al. 2019: steps-to-result); the scale-out model of docs/scaling.md gives
the time of one step on n workers. Their product is the time to the target:

    per-worker batch     b = B / n                      (cells where n does not divide B: none)
    t_step(n, b)         = t_1(b) + t_comm(n)
    t_comm(n)            = 2(n-1)/n x bytes / bandwidth + 2(n-1) x latency x all-reduces a step
    efficiency(n, b)     = t_1(b) / t_step(n, b)        (weak scaling at the per-worker batch)
    time_to_target(n, B) = steps_to_target(B) x t_step(n, B / n)
    cost(n, B)           = n x time_to_target(n, B)     (worker-seconds)

t_1(b) is ONE worker's step time at batch b (measured: the sweep's samples/s on one worker, a
probe, or a file; see :class:`StepTimes`). t_comm is distbatch.measure.scaling's ring model with
its latency term. Steps to the target for a batch the sweep did not measure are interpolated
linearly in log(batch) and log(steps) between the two nearest measured batches that reached it
(cells marked interpolated); a batch above the largest that reached the target, or one that the
sweep measured and that never reached it, is unreached; below the smallest measured batch there
is no estimate.
"""
from __future__ import annotations

import csv
import json
import math
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distbatch.errors import ParameterError, require_param
from distbatch.measure.results import CSV_NAME, JSONL_NAME, finite, is_ok, read_rows, rule_of, summarize_rules
from distbatch.measure.scaling import allreduce_seconds, ring_bytes

UNITS_BIT = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
UNITS_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
# Named links: nominal rate, no added latency (as the tbf links of benchmarks/scale_out.py; give
# "RATE,LATENCY" for a real network's latency).
LINKS = {"100mbit": 100e6, "1gbit": 1e9, "10gbit": 10e9}
LINK_FORMS = '"1gbit", "10gbit", "100mbit", or "BANDWIDTH[,LATENCY]" like "2.5gbit,50us"'
MAX_WORKERS = 1 << 16  # a bound on the grid (and on an arithmetic '...' list)


@dataclass(frozen=True)
class Link:
    """A network link: bytes/s each way and the one-way latency of one message (s)."""

    bandwidth: float
    latency: float = 0.0
    text: str = ""

    def describe(self) -> str:
        return f"{self.bandwidth * 8 / 1e9:g} Gbit/s, latency {self.latency * 1e6:g} us"


def parse_link(text: str) -> Link:
    """'1gbit' | '10gbit' | '100mbit' | 'BANDWIDTH[,LATENCY]' ('2.5gbit,50us', '957mbit,0')."""
    raw = str(text).strip().lower()
    parts = raw.split(",")
    bad = ParameterError(f"{{link}} must be {LINK_FORMS}, got {text!r}", "link")
    if len(parts) > 2:
        raise bad
    if parts[0] in LINKS:
        bits = LINKS[parts[0]]
    else:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(bit|kbit|mbit|gbit|tbit)", parts[0].strip())
        if not m:
            raise bad
        bits = float(m.group(1)) * UNITS_BIT[m.group(2)]
    latency = 0.0
    if len(parts) == 2:
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|ms|us|ns)?", parts[1].strip())
        if not m or (m.group(2) is None and float(m.group(1)) != 0):
            raise bad
        latency = float(m.group(1)) * UNITS_S[m.group(2) or "s"]
    if not (math.isfinite(bits) and bits > 0 and math.isfinite(latency)):
        raise bad
    return Link(bits / 8, latency, str(text))


def parse_workers(text: str) -> list[int]:
    """'1,2,4,8' or '1,2,4,...,64' (the last two before '...' set the step: x2 here, or +k
    when they differ by addition and not by an integer ratio) -> sorted unique worker counts."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = ParameterError(f"{{workers}} must be positive integers, comma-separated (\"1,2,4\" or "
                         f"\"1,2,4,...,64\"), got {text!r}", "workers")
    try:
        if "..." in parts:
            i = parts.index("...")
            head, tail = [int(p) for p in parts[:i]], [int(p) for p in parts[i + 1:]]
            if len(head) < 2 or len(tail) != 1 or parts.count("...") != 1:
                raise bad
            a, b, end = head[-2], head[-1], tail[0]
            if a < 1 or b <= a or end < b or end > MAX_WORKERS:
                raise bad
            counts, x = list(head), b
            while True:
                x = x * (b // a) if b % a == 0 and b // a > 1 else x + (b - a)
                if x > end:
                    break
                counts.append(x)
            if counts[-1] != end:
                raise ParameterError(f"{{workers}} {text!r}: the sequence {head[-2]}, {head[-1]}, ... "
                                     f"does not reach {end}", "workers")
        else:
            counts = [int(p) for p in parts]
    except ParameterError:
        raise
    except ValueError:  # int() of something else
        raise bad from None
    if not counts or any(c < 1 or c > MAX_WORKERS for c in counts):
        raise bad
    return sorted(set(counts))


def parse_batches(text: str) -> list[int]:
    """'64,128,256' -> sorted unique global batches (the grid's columns)."""
    try:
        sizes = sorted({int(p) for p in str(text).split(",") if p.strip()})
    except ValueError:
        sizes = []
    require_param(bool(sizes) and sizes[0] >= 1, f"{{batches}} must be positive integers, "
                  f"comma-separated, got {text!r}", "batches")
    return sizes


# ------------------------------------------------------------------ the sweep's numbers

def read_sweep(directory: str) -> list[dict]:
    """The sweep's rows: results.jsonl (what `distbatch sweep` writes), else results.csv (the
    same rows, e.g. docs/sweep/). ParameterError naming `sweep` when there are none."""
    path = Path(directory)
    require_param(path.is_dir(), f"{{sweep}} {directory!r} is not a directory", "sweep")
    rows = read_rows(path) if (path / JSONL_NAME).is_file() else _csv_rows(path / CSV_NAME)
    require_param(bool(rows), f"{{sweep}} {directory!r} has no result rows ({JSONL_NAME} or "
                  f"{CSV_NAME}); expected a sweep's output directory", "sweep")
    require_param(all(isinstance(r.get("global_batch_size"), int) for r in rows),
                  f"{{sweep}} {directory!r}: a row without an integer global_batch_size", "sweep")
    return rows


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _cell(text: str):
    if text in ("", None):
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class StepsToTarget:
    """Steps to the target per global batch of one rule: mean and std over the seeds that
    reached it; `unreached`: batches the sweep ran where no seed did."""

    rule: str | None
    reached: dict  # batch -> (mean, std, seeds)
    unreached: tuple = ()

    def at(self, batch: int) -> tuple[float | None, str]:
        """(steps, how): how is 'measured', 'interpolated', 'unreached' or 'no estimate'."""
        if batch in self.reached:
            return self.reached[batch][0], "measured"
        if batch in self.unreached:
            return None, "unreached"
        known = sorted(self.reached)
        if not known:
            return None, "unreached"
        if batch > known[-1]:
            return None, "unreached"
        if batch < known[0]:
            return None, "no estimate"
        lo = max(b for b in known if b < batch)
        hi = min(b for b in known if b > batch)
        if any(lo < u < hi for u in self.unreached):
            return None, "unreached"
        w = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
        s = math.exp((1 - w) * math.log(self.reached[lo][0]) + w * math.log(self.reached[hi][0]))
        return s, "interpolated"


def steps_to_target(rows: list[dict]) -> list[StepsToTarget]:
    """One StepsToTarget per scaling rule of the rows (distbatch.measure.results.summarize)."""
    out = []
    for rule, summaries in summarize_rules(rows).items():
        reached = {s.global_batch_size: (s.steps_to_target.mean, s.steps_to_target.std, s.steps_to_target.n)
                   for s in summaries if s.steps_to_target.n}
        unreached = tuple(s.global_batch_size for s in summaries if not s.steps_to_target.n)
        out.append(StepsToTarget(rule, reached, unreached))
    return out


# ------------------------------------------------------------------ one worker's step time

@dataclass(frozen=True)
class StepTimes:
    """One worker's step time (s) at the per-worker batches it was measured at; between them
    linear in the batch, outside them the least-squares line t = a + c x b over all points
    (a >= 0; such cells are marked extrapolated)."""

    seconds: dict  # per-worker batch -> seconds
    source: str

    def at(self, batch: float) -> tuple[float, bool]:
        """(seconds, extrapolated)."""
        pts = sorted(self.seconds.items())
        if batch in self.seconds:
            return self.seconds[batch], False
        if pts[0][0] < batch < pts[-1][0]:
            (b0, t0), (b1, t1) = max(p for p in pts if p[0] < batch), min(p for p in pts if p[0] > batch)
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0), False
        a, c = _line(pts)
        return max(a + c * batch, 1e-9), True


def _line(pts: list) -> tuple[float, float]:
    """Least squares t = a + c x b, with a >= 0 (a fixed cost per step, never negative)."""
    if len(pts) == 1:
        return 0.0, pts[0][1] / pts[0][0]
    n = len(pts)
    mb, mt = sum(b for b, _ in pts) / n, sum(t for _, t in pts) / n
    sbb = sum((b - mb) ** 2 for b, _ in pts)
    c = sum((b - mb) * (t - mt) for b, t in pts) / sbb
    a = mt - c * mb
    if a < 0:  # through the origin instead
        return 0.0, sum(b * t for b, t in pts) / sum(b * b for b, _ in pts)
    return a, c


def step_times_from_sweep(rows: list[dict]) -> StepTimes:
    """t_1(b) = b / samples_per_sec of the sweep's ok one-replica rows at global batch b (mean
    over seeds and rules: the rule changes the learning rate, not the work of a step)."""
    rates: dict = {}
    for r in rows:
        if is_ok(r) and r.get("replicas", 1) == 1 and finite(r.get("samples_per_sec")) and r["samples_per_sec"] > 0:
            rates.setdefault(int(r["global_batch_size"]), []).append(float(r["samples_per_sec"]))
    require_param(bool(rates), "{step_time_from} sweep: the sweep has no one-replica row with "
                  "samples_per_sec; use probe or a file", "step_time_from")
    return StepTimes({b: b / (sum(v) / len(v)) for b, v in rates.items()}, "sweep")


def step_times_from_file(path: str) -> StepTimes:
    """A JSON file {"step_time_s": {"PER_WORKER_BATCH": SECONDS, ...}} (what
    benchmarks/plan_check.py writes), e.g. step times measured under the cluster's core sharing."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        seconds = {int(b): float(t) for b, t in data["step_time_s"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ParameterError(f"{{step_time_from}} {path!r} is not 'sweep', 'probe' or a readable JSON "
                             'file {"step_time_s": {"BATCH": SECONDS}}', "step_time_from") from None
    require_param(bool(seconds) and all(b >= 1 and math.isfinite(t) and t > 0 for b, t in seconds.items()),
                  f"{{step_time_from}} {path!r}: step times must be positive seconds at batches >= 1",
                  "step_time_from")
    return StepTimes(seconds, f"file {path}")


# ------------------------------------------------------------------ gradient bytes

def gradient_bytes(directory: str) -> int:
    """Bytes of the model's weights (float32 gradients of the same size), read from the first
    point's model.keras of the sweep (the layers' variables in its model.weights.h5; BatchNorm's
    moving statistics are counted too, a slight overestimate). ParameterError naming
    `grad_bytes` when the sweep kept no model."""
    import h5py  # h5py (numpy) only when a model file is read: `distbatch --help` loads neither
    for archive in sorted(Path(directory).glob("points/*/model.keras")):
        try:
            with zipfile.ZipFile(archive) as z, z.open("model.weights.h5") as f, h5py.File(f, "r") as h5:
                total = []
                h5["layers"].visititems(lambda _, obj: total.append(obj.size * obj.dtype.itemsize)
                                        if isinstance(obj, h5py.Dataset) else None)
                if total:
                    return int(sum(total))
        except (OSError, KeyError, zipfile.BadZipFile):
            continue
    raise ParameterError(f"{{grad_bytes}}: the sweep {directory!r} kept no points/*/model.keras to "
                         "count the gradient's bytes from; give the bytes", "grad_bytes")


# ------------------------------------------------------------------ the plan

@dataclass
class Cell:
    workers: int
    global_batch: int
    per_worker_batch: float | None
    steps: float | None
    steps_how: str  # measured | interpolated | unreached | no estimate | not divisible
    t_1: float | None = None
    t_comm: float | None = None
    comm_bound: float | None = None  # ring bandwidth term alone: 2(n-1)/n x bytes / bandwidth
    t_step: float | None = None
    efficiency: float | None = None
    time_to_target: float | None = None
    cost: float | None = None
    step_time_extrapolated: bool = False
    marks: list = field(default_factory=list)  # "fastest", "cheapest"


@dataclass
class Plan:
    rule: str | None
    link: Link
    grad_bytes: float
    allreduces_per_step: int
    step_times: str
    cells: list  # of Cell, by global batch then workers

    def as_dict(self) -> dict:
        return {"rule": self.rule, "link": {"bandwidth_bytes_per_s": self.link.bandwidth,
                                            "latency_s": self.link.latency, "text": self.link.text},
                "grad_bytes": self.grad_bytes, "allreduces_per_step": self.allreduces_per_step,
                "step_times": self.step_times, "cells": [asdict(c) for c in self.cells]}


def plan_cell(n: int, batch: int, stt: StepsToTarget, times: StepTimes, link: Link,
              grad_bytes: float, allreduces_per_step: int = 1) -> Cell:
    """One (workers, global batch) cell of the plan (the module docstring's formulas)."""
    if batch % n:
        return Cell(n, batch, None, None, "not divisible")
    b = batch // n
    steps, how = stt.at(batch)
    t_1, extrapolated = times.at(b)
    t_comm = allreduce_seconds(grad_bytes, link.bandwidth, n, latency=link.latency,
                               messages=allreduces_per_step)
    cell = Cell(n, batch, b, steps, how, t_1, t_comm, ring_bytes(grad_bytes, n) / link.bandwidth,
                t_1 + t_comm, t_1 / (t_1 + t_comm), step_time_extrapolated=extrapolated)
    if steps is not None:
        cell.time_to_target = steps * cell.t_step
        cell.cost = n * cell.time_to_target
    return cell


def make_plan(stt: StepsToTarget, times: StepTimes, link: Link, grad_bytes: float,
              workers: list[int], batches: list[int], allreduces_per_step: int = 1) -> Plan:
    """Every (workers, global batch) cell; the fastest (least time) and the cheapest (fewest
    worker-seconds; ties: fewer workers) cells with a time are marked."""
    require_param(grad_bytes > 0, f"{{grad_bytes}} must be > 0, got {grad_bytes}", "grad_bytes")
    require_param(allreduces_per_step >= 1, f"{{allreduces_per_step}} must be >= 1, got "
                  f"{allreduces_per_step}", "allreduces_per_step")
    cells = [plan_cell(n, B, stt, times, link, grad_bytes, allreduces_per_step)
             for B in batches for n in workers]
    timed = [c for c in cells if c.time_to_target is not None]
    if timed:
        min(timed, key=lambda c: (c.time_to_target, c.workers)).marks.append("fastest")
        min(timed, key=lambda c: (c.cost, c.workers)).marks.append("cheapest")
    return Plan(stt.rule, link, grad_bytes, allreduces_per_step, times.source, cells)


MARK = {"interpolated": "~", "unreached": "unreached", "no estimate": "?", "not divisible": "-"}


def format_plan(plan: Plan) -> str:
    """The plan as text: one row per (global batch, workers), marks in the last column."""
    head = (f"rule {plan.rule or 'measured'}; link {plan.link.describe()}; gradient "
            f"{plan.grad_bytes / 1e6:.2f} MB, {plan.allreduces_per_step} all-reduce(s) a step; "
            f"one worker's step time from {plan.step_times}")
    lines = [head, f"{'global':>7} {'workers':>7} {'b/worker':>8} {'steps':>8} {'t_1 ms':>8} "
             f"{'t_step ms':>9} {'eff':>5} {'ring ms':>8} {'time s':>9} {'worker-s':>9}  marks",
             "-" * 100]
    for c in plan.cells:
        if c.t_step is None:
            lines.append(f"{c.global_batch:>7} {c.workers:>7} {'-':>8} {'':>8} {'':>8} {'':>9} "
                         f"{'':>5} {'':>8} {'':>9} {'':>9}  not divisible")
            continue
        steps = "" if c.steps is None else f"{c.steps:.0f}"
        steps += MARK.get(c.steps_how, "") if c.steps_how in ("interpolated",) else ""
        time_s = MARK[c.steps_how] if c.steps is None else f"{c.time_to_target:.1f}"
        cost = "" if c.cost is None else f"{c.cost:.1f}"
        marks = [m.upper() for m in c.marks] + (["t_1 extrapolated"] if c.step_time_extrapolated else [])
        lines.append(f"{c.global_batch:>7} {c.workers:>7} {c.per_worker_batch:>8g} {steps:>8} "
                     f"{c.t_1 * 1e3:>8.2f} {c.t_step * 1e3:>9.2f} {c.efficiency:>5.2f} "
                     f"{c.comm_bound * 1e3:>8.2f} {time_s:>9} {cost:>9}  {', '.join(marks)}")
    for mark in ("fastest", "cheapest"):
        best = [c for c in plan.cells if mark in c.marks]
        if best:
            c = best[0]
            lines.append(f"{mark}: {c.workers} worker(s) at global batch {c.global_batch}: "
                         f"{c.time_to_target:.1f} s, {c.cost:.1f} worker-s")
    lines.append("steps: the sweep's mean steps to the target (~ interpolated in log batch); eff = "
                 "t_1 / t_step; ring ms = 2(n-1)/n x bytes / bandwidth (the all-reduce's bandwidth "
                 "bound; t_step adds 2(n-1) x latency per all-reduce); worker-s = workers x time")
    return "\n".join(lines)



def model_of_sweep(directory: str) -> tuple[str, tuple, int]:
    """(model name, input shape, classes) of the sweep: the name from its config.json, the
    shape and classes from a point's model.keras (its Keras config, read as JSON)."""
    try:
        name = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))["model"]
        archive = next(iter(sorted(Path(directory).glob("points/*/model.keras"))))
        with zipfile.ZipFile(archive) as z:
            layers = json.loads(z.read("config.json"))["config"]["layers"]
        shape = tuple(next(l for l in layers if l["class_name"] == "InputLayer")["config"]["batch_shape"][1:])
        classes = int([l for l in layers if l["config"].get("units")][-1]["config"]["units"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, zipfile.BadZipFile):
        raise ParameterError(f"{{step_time_from}} probe: the sweep {directory!r} has no config.json "
                             "naming its model or no readable points/*/model.keras", "step_time_from") from None
    return name, shape, classes

